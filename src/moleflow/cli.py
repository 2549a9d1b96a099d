"""``moleflow`` command line: train, eval, predict, demo, config (DESIGN.md contracts)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from moleflow.config import ConfigError, MoleFlowConfig, apply_overrides, dump_yaml, load_config
from moleflow.data import parse_limits, resolve_tasks
from moleflow.features.cache import default_workers

log = logging.getLogger("moleflow")

DEMO_TASKS = ("synthetic:stripes", "synthetic:disc", "elpv:mono", "elpv:poly")
DEMO_OVERRIDES = ("train.epochs=8",)
DEMO_LIMITS = (60, 80)  # per-task train / test images in the demo (deterministic subsample)


def _setup_logging(run_dir: Path | None, verbose: bool) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        handlers=handlers,
        force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _config(source: str, overrides: list[str]) -> MoleFlowConfig:
    return apply_overrides(load_config(source), overrides)


def _train(
    cfg: MoleFlowConfig,
    specs: list[str],
    data_root: str | None,
    out: Path,
    limits=None,
    progress: bool = True,
    workers: int = 0,
    feature_cache: Path | None = None,
) -> dict:
    from moleflow.experiment import ContinualExperiment
    from moleflow.report import format_summary_table, write_report

    tasks = resolve_tasks(specs, data_root, limits)
    exp = ContinualExperiment(cfg, out, progress=progress, num_workers=workers, feature_cache=feature_cache)
    start = time.perf_counter()
    results = exp.run(tasks, specs, limits, data_root)
    write_report(out, results, _examples(exp))
    print(format_summary_table(results))
    print(f"\nrun directory: {out}  ({time.perf_counter() - start:.0f} s)  report: {out / 'report.md'}")
    return results


def _examples(exp) -> dict:
    """A few test images per task with their final routed anomaly maps, for the report."""
    from moleflow.report import TaskExamples
    from moleflow.scoring import anomaly_maps

    out = {}
    size = exp.eval_size
    for name, es in exp.eval_sets.items():
        final = exp.final_scores[name]
        anomalous = np.flatnonzero(es.labels == 1)[:3].tolist()
        normal = np.flatnonzero(es.labels == 0)[:1].tolist()
        picks = anomalous + normal
        maps = anomaly_maps(final.scored.patch_scores[picks], (size, size), exp.cfg.scoring.smoothing_sigma).numpy()
        out[name] = TaskExamples(
            task=name,
            images=[_resize_image(es.samples[i].load_image(), size) for i in picks],
            maps=list(maps),
            masks=[None if es.masks is None else es.masks[i] for i in picks],
            labels=[int(es.labels[i]) for i in picks],
            scores=final.scored.image_scores.numpy(),
            all_labels=es.labels,
            threshold=exp.thresholds.get(name),
        )
    return out


def _resize_image(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config(args.config, args.set)
    limits = parse_limits(args.limits)  # bad options fail before anything is written
    out = Path(args.out)
    _setup_logging(out, args.verbose)
    _train(
        cfg,
        [s for spec in args.tasks for s in spec.split(",") if s],
        args.data,
        out,
        progress=not args.no_progress,
        workers=args.workers,
        limits=limits,
        feature_cache=args.feature_cache,
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _setup_logging(out, args.verbose)
    cfg = _config("offline", list(DEMO_OVERRIDES) + args.set)
    log.info(
        "demo: offline preset, tasks %s, at most %d train / %d test images per task",
        ", ".join(DEMO_TASKS),
        *DEMO_LIMITS,
    )
    _train(cfg, list(DEMO_TASKS), None, out, limits=DEMO_LIMITS, progress=not args.no_progress)
    return 0


def _load_run(run_dir: Path):
    from moleflow.checkpoint import load_all, load_thresholds
    from moleflow.features.extractor import FeatureExtractor

    cfg = load_config(run_dir / "config.yaml")
    model, router = load_all(cfg, run_dir / "checkpoints")
    thresholds = load_thresholds(cfg, run_dir / "checkpoints", router.tasks)
    return cfg, FeatureExtractor(cfg.model.backbone), model, router, thresholds


def cmd_eval(args: argparse.Namespace) -> int:
    from moleflow.evaluation.protocol import AccuracyMatrix
    from moleflow.experiment import METRICS, ContinualExperiment, write_json_atomic
    from moleflow.report import format_summary_table, write_report

    run_dir = Path(args.run_dir)
    _setup_logging(None, args.verbose)
    cfg, extractor, model, router, thresholds = _load_run(run_dir)
    recorded = json.loads((run_dir / "tasks.json").read_text())
    specs = {t["name"]: t["spec"] for t in recorded["tasks"]}
    exp = ContinualExperiment(cfg, run_dir, progress=not args.no_progress)
    exp.extractor, exp.model, exp.router, exp.thresholds = extractor, model, router, thresholds
    exp.trainer.model, exp.trainer.router = model, router
    previous = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").exists() else {}
    limits = tuple(recorded["limits"]) if recorded.get("limits") else None
    if None in specs.values():
        raise ValueError(f"{run_dir / 'tasks.json'} records no task specs (run made from Python?); cannot rebuild tests")
    tasks = resolve_tasks(list(specs.values()), args.data or recorded.get("data_root"), limits)
    for task in tasks:
        exp.eval_sets[task.name] = exp.prepare_eval_set(task)
    # earlier rows of the accuracy matrices cannot be recomputed (those states are gone): keep them
    for key, mats in (("metrics", exp.routed), ("metrics_oracle", exp.oracle)):
        for m in METRICS:
            rows = previous.get(key, {}).get(m, {}).get("matrix", [])[:-1]
            mats[m] = AccuracyMatrix.from_rows(rows) if rows else AccuracyMatrix()
    exp.evaluate_all()
    results = {**previous, **exp.results()}
    results["timing"] = {
        **previous.get("timing", {}),
        "inference_ms_per_image": results["timing"]["inference_ms_per_image"],
    }
    write_json_atomic(results, run_dir / "results.json")
    write_report(run_dir, results, _examples(exp))
    print(format_summary_table(results))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from moleflow.data.io import IMAGE_EXTENSIONS, read_image
    from moleflow.features.cache import CachedFeatures
    from moleflow.inference import score_features
    from moleflow.scoring import anomaly_maps
    from moleflow.visualize import save_prediction_figure

    _setup_logging(None, args.verbose)
    run_dir = Path(args.run_dir)
    cfg, extractor, model, router, thresholds = _load_run(run_dir)
    paths: list[Path] = []
    for item in map(Path, args.images):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such image or directory")
    out_dir = Path(args.out or run_dir / "predictions")
    rows = []
    for path in paths:
        image = read_image(path)
        feats = extractor.extract([image])
        cached = CachedFeatures(feats.patches, feats.context if model.scale_context is not None else None, feats.pooled)
        scored = score_features(model, router, cached, cfg.scoring)
        task = router.tasks[int(scored.task_index[0])]
        score = float(scored.image_scores[0])
        threshold = thresholds.get(task)
        verdict = "unknown" if threshold is None else ("ANOMALOUS" if score > threshold else "normal")
        amap = anomaly_maps(scored.patch_scores, image.shape[:2], cfg.scoring.smoothing_sigma)[0].numpy()
        heatmap = out_dir / f"{path.stem}_heatmap.png"
        vmax = max(threshold or float(amap.max()), float(amap.max()))
        save_prediction_figure(
            image,
            amap,
            heatmap,
            f"{path.name}: {task}, score {score:.2f} -> {verdict}",
            vmin=float(np.percentile(amap, 1)),
            vmax=vmax,
        )
        rows.append(
            {
                "image": str(path),
                "task": task,
                "score": score,
                "threshold": threshold,
                "verdict": verdict,
                "heatmap": str(heatmap),
            }
        )
        print(
            f"{path}\ttask={task}\tscore={score:.3f}\tthreshold={threshold if threshold is None else round(threshold, 3)}"
            f"\t{verdict}\t{heatmap}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "predictions.json").write_text(json.dumps(rows, indent=2))
    return 0


def _analyze(argv: list[str]) -> int:
    from moleflow.analysis.command import main as analyze_main

    return analyze_main(argv)


def _bench(argv: list[str]) -> int:
    from moleflow.perf import main as bench_main

    return bench_main(argv)


def cmd_config(args: argparse.Namespace) -> int:
    print(dump_yaml(_config(args.config, args.set)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moleflow", description="Continual image anomaly detection (MoLE-Flow)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, with_set=True):
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")
        if with_set:
            sp.add_argument(
                "--set",
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help="override a config value, e.g. --set train.epochs=20 (repeatable)",
            )

    t = sub.add_parser("train", help="learn tasks in order, evaluate after each, write a run directory")
    t.add_argument("config", help="preset (paper, v5, offline) or YAML file")
    t.add_argument("--tasks", nargs="+", required=True, help="SPEC[,SPEC...] (see README)")
    t.add_argument("--out", required=True)
    t.add_argument("--data", help="root directory for bare category names")
    t.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="image-decoding worker processes, overlapping with the backbone (default: CPUs / 4, at most 4)",
    )
    t.add_argument(
        "--limits",
        metavar="TRAIN,TEST",
        help="at most TRAIN training and TEST test images per task (deterministic subsample, both test classes kept)",
    )
    t.add_argument("--feature-cache", type=Path, help="directory that keeps extracted backbone features between runs")
    common(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="re-evaluate all learned tasks of a run, rewrite results.json")
    e.add_argument("run_dir")
    e.add_argument("--data")
    common(e, with_set=False)
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("predict", help="routed task, score, verdict and heatmap per image")
    r.add_argument("run_dir")
    r.add_argument("images", nargs="+")
    r.add_argument("--out")
    common(r, with_set=False)
    r.set_defaults(func=cmd_predict)

    d = sub.add_parser("demo", help="offline end-to-end demo on synthetic and ELPV tasks")
    d.add_argument("--out", default="runs/demo")
    common(d)
    d.set_defaults(func=cmd_demo)

    sub.add_parser("bench", help="speed and memory measurements: moleflow bench [--quick] [--json PATH]")
    sub.add_parser("analyze", help="the paper's analyses: moleflow analyze {interaction,order,lora,dia,growth,routing}")

    c = sub.add_parser("config", help="print the resolved config")
    c.add_argument("config", nargs="?", default="offline")
    common(c)
    c.set_defaults(func=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own argument parser (moleflow.perf)
        return _bench(argv[1:])
    if argv[:1] == ["analyze"]:  # its own argument parser (moleflow.analysis.command)
        return _analyze(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        log.debug("error", exc_info=True)
        print(f"moleflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moleflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
