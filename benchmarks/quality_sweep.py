"""Quality sweep: MoLE-Flow learning the six real tasks continually, next to a faithful PatchCore.

    python benchmarks/quality_sweep.py --out runs/quality/NAME [--config offline|FILE.yaml] [--set k=v ...]
        [--limits TRAIN,TEST] [--seed N] [--full-matrix] [--no-patchcore] [--tasks SPEC ...]

Tasks (default, in this order): hazelnut_toy, mpdd_metal_plate, elpv mono, elpv poly, magnetic_tile,
bsd_pitting (``--shared`` holds ``datasets/``). Every task's training normals are split as the lifecycle
product splits them: sorted, every 5th image (positions 4, 9, 14, ...) is held out for calibration and
early stopping, the other 80 % train the flow. ``--limits`` subsamples each task first (deterministic).

Backbone features are cached on disk per (backbone config, image set) under ``--feature-cache``, so later
runs with the same backbone skip extraction; PatchCore results are cached there as well (keyed by its
feature config, the image sets and the coreset ratio).

By default only the final row of the accuracy matrices is evaluated (oracle results cannot change after
a task is learned, the base and earlier task parts being frozen; routed ones change only through routing);
``--full-matrix`` runs the whole protocol (every task after every task) and reports forgetting.

The PatchCore baseline (task id given, fitted on the same 80 % split) uses the MoLE-Flow run's backbone,
layers and input size on the stride of the finest layer with 3x3 local averaging and a 10 % coreset
(``moleflow.baselines.patchcore.patchcore_backbone``): the same features as the MoLE-Flow run whenever
that run uses ``model.backbone.grid=finest``.

``--rescore RUN_DIR``: no training; the models of an earlier sweep run are loaded and evaluated again under
its config plus ``--set`` overrides of the ``scoring`` and ``router`` sections (the router is rebuilt from
the stored prototypes), e.g. to measure the smoothing sigma or top-k without retraining.

Writes ``results.json`` (the continual run), ``patchcore.json``, ``summary.json`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from moleflow.baselines.patchcore import PATCHCORE_CORESET, PatchCoreScorer, patchcore_backbone
from moleflow.checkpoint import load_all
from moleflow.config import apply_overrides, load_config, to_dict
from moleflow.data.base import TaskData
from moleflow.data.spec import parse_limits, resolve_tasks
from moleflow.evaluation import metrics as M
from moleflow.experiment import ContinualExperiment, EvalSet, samples_digest, write_json_atomic
from moleflow.features.cache import CachedFeatures, cache_fingerprint
from moleflow.report import pct
from moleflow.scoring import anomaly_maps
from moleflow.training import ContinualTrainer, TaskTrainingReport

log = logging.getLogger("quality_sweep")
METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")
HOLDOUT_EVERY = 5
PATCHCORE_SIGMA = 4.0  # PatchCore's Gaussian (pixels of the input image)


def six_tasks(shared: Path) -> list[str]:
    d = shared / "datasets"
    return [
        f"hazelnut_toy={d / 'hazelnut_toy/hazelnut'}",
        f"mpdd_metal_plate={d / 'mpdd_metal_plate/metal_plate'}",
        "elpv_mono=elpv:mono",
        "elpv_poly=elpv:poly",
        f"magnetic_tile={d / 'magnetic_tile/magnetic_tile'}",
        f"bsd_pitting={d / 'bsd_pitting/bsd_pitting'}",
    ]


def split_holdout(task: TaskData, every: int = HOLDOUT_EVERY) -> tuple[TaskData, tuple]:
    """(task with the 80 % fit share as its training set, the held-out 20 %): sorted by file (or sample
    name), positions ``every-1, 2*every-1, ...`` are held out."""
    ordered = sorted(task.train, key=lambda s: str(getattr(s, "image_path", None) or s.name))
    held = tuple(s for i, s in enumerate(ordered) if i % every == every - 1)
    fit = tuple(s for i, s in enumerate(ordered) if i % every != every - 1)
    return dataclasses.replace(task, train=fit), held


class ValidatingTrainer(ContinualTrainer):
    """Passes each task's held-out features to ``learn_task`` and keeps the training reports."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.validation: dict[str, CachedFeatures] = {}
        self.reports: dict[str, TaskTrainingReport] = {}

    def learn_task(self, task, features, progress=True, validation=None) -> TaskTrainingReport:
        held = self.validation.get(task)
        held = held.to(self.device) if validation is None and held is not None else validation
        report = super().learn_task(task, features, progress=progress, validation=held)
        self.reports[task] = report
        return report


class HeldOutExperiment(ContinualExperiment):
    """The continual protocol with held-out normals per task (early stopping, validation NLL)."""

    def __init__(self, cfg, run_dir, held_out: dict[str, tuple], *, final_only: bool, **kwargs) -> None:
        super().__init__(cfg, run_dir, **kwargs)
        self.trainer = ValidatingTrainer(self.model, self.router, cfg, self.device)
        self.held_out, self.final_only, self.num_tasks = held_out, final_only, 0
        self.fit_counts: dict[str, int] = {}

    def learn(self, task: TaskData) -> None:
        self.fit_counts[task.name] = len(task.train)
        if self.held_out.get(task.name):
            self.trainer.validation[task.name] = self.extract(self.held_out[task.name], f"features {task.name}/held")
        super().learn(task)

    def evaluate_all(self) -> None:
        if not self.final_only or len(self.model.tasks) == self.num_tasks:
            super().evaluate_all()

    def run(self, tasks, specs=None, limits=None, data_root=None) -> dict:
        self.num_tasks = len(tasks)
        return super().run(tasks, specs, limits, data_root)


# ----------------------------------------------------------------------------- PatchCore


def patchcore_task(exp: ContinualExperiment, task: TaskData, coreset: float, seed: int) -> dict:
    """Fit PatchCore on ``task.train`` (features of ``exp``'s backbone) and score its test set."""
    start = time.perf_counter()
    train = exp.extract(task.train, f"patchcore features {task.name}/train")
    es: EvalSet = exp.prepare_eval_set(task)
    scorer = PatchCoreScorer(coreset_ratio=coreset, seed=seed).fit(train.patches.float())
    fit_seconds = time.perf_counter() - start
    test = es.features.patches.float()
    values: dict[str, float | None] = {"image_auroc": M.image_auroc(scorer.image_scores(test).numpy(), es.labels)}
    if es.masks is not None:
        size = (exp.eval_size, exp.eval_size)
        maps = anomaly_maps(scorer.score(test), size, PATCHCORE_SIGMA).numpy()
        values.update(
            pixel_auroc=M.pixel_auroc(maps, es.masks), pixel_ap=M.pixel_ap(maps, es.masks), aupro=M.aupro(maps, es.masks)
        )
    clean = {k: (None if v is None or not np.isfinite(v) else float(v)) for k, v in values.items()}
    return {**clean, "fit_seconds": fit_seconds, "seconds": time.perf_counter() - start, "bank": len(scorer.memory_bank)}


def patchcore_all(cfg, tasks: list[TaskData], cache: Path, coreset: float, seed: int, out: Path) -> dict:
    """PatchCore per task on the faithful feature config; results cached under ``cache``."""
    backbone = patchcore_backbone(cfg.model.backbone)
    pc_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone=backbone, scale_context=None))
    exp = ContinualExperiment(pc_cfg, out / "patchcore_run", progress=False, feature_cache=cache)
    results = {}
    for task in tasks:
        key = {
            "features": cache_fingerprint(backbone),
            "train": samples_digest(task.train),
            "test": samples_digest(task.test),
            "coreset": coreset,
            "seed": seed,
            "sigma": PATCHCORE_SIGMA,
        }
        path = cache / f"patchcore-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.json"
        if path.exists():
            results[task.name] = json.loads(path.read_text())["result"]
        else:
            results[task.name] = patchcore_task(exp, task, coreset, seed)
            write_json_atomic({"key": key, "result": results[task.name]}, path)
        log.info("patchcore %s: %s", task.name, {k: round(v, 4) for k, v in results[task.name].items() if v is not None})
    return {"backbone": to_dict(backbone), "coreset": coreset, "tasks": results}


# ----------------------------------------------------------------------------- summary


def training_rows(exp: HeldOutExperiment) -> dict[str, dict]:
    rows = {}
    for name, report in exp.trainer.reports.items():
        n_fit = exp.fit_counts[name]
        rows[name] = {
            "train_seconds": report.seconds,
            "epochs_run": len(report.epoch_losses),
            "best_epoch": report.best_epoch,
            "validation_nll": report.validation_nll,
            "fit_images": n_fit,
            "train_seconds_per_300": 300.0 * report.seconds / max(1, n_fit),
        }
    return rows


def summarise(results: dict, patchcore: dict | None, training: dict[str, dict], args, cfg) -> dict:
    rows = {}
    for j, name in enumerate(results["tasks"]):
        rows[name] = {
            "routed": {m: results["metrics"][m]["final"][j] for m in METRICS},
            "oracle": {m: results["metrics_oracle"][m]["final"][j] for m in METRICS},
            "patchcore": None if patchcore is None else {m: patchcore["tasks"][name].get(m) for m in METRICS},
            **training[name],
            "patchcore_seconds": None if patchcore is None else patchcore["tasks"][name]["seconds"],
        }
    return {
        "command": args.command,
        "config_source": args.config,
        "overrides": args.set,
        "seed": args.seed,
        "limits": args.limits,
        "config": to_dict(cfg),
        "tasks": rows,
        "routing": results["routing"],
        "forgetting_routed": {m: results["metrics"][m]["forgetting"] for m in METRICS},
        "forgetting_oracle": {m: results["metrics_oracle"][m]["forgetting"] for m in METRICS},
        "environment": results["environment"],
        "patchcore_backbone": None if patchcore is None else patchcore["backbone"],
    }


def markdown(summary: dict) -> str:
    head = "| task | " + " | ".join(f"{m} routed / oracle / PatchCore" for m in METRICS) + " | epochs | train s (per 300) |"
    lines = [f"Command: `{summary['command']}`", "", head, "|---|" + "---|" * (len(METRICS) + 2)]
    for name, row in summary["tasks"].items():
        cells = []
        for m in METRICS:
            pc = row["patchcore"][m] if row["patchcore"] else None
            cells.append(f"{pct(row['routed'][m])} / {pct(row['oracle'][m])} / {pct(pc)}")
        cells.append(f"{row['epochs_run']}" + (f" (best {row['best_epoch'] + 1})" if row["best_epoch"] is not None else ""))
        cells.append(f"{row['train_seconds']:.0f} ({row['train_seconds_per_300']:.0f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    means = []
    for m in METRICS:
        vals = [(r["routed"][m], r["patchcore"][m] if r["patchcore"] else None) for r in summary["tasks"].values()]
        vals = [(a, b) for a, b in vals if a is not None]
        mean_r = sum(a for a, _ in vals) / len(vals) if vals else None
        pcs = [b for _, b in vals if b is not None]
        mean_p = sum(pcs) / len(pcs) if pcs and len(pcs) == len(vals) else None
        means.append(f"{pct(mean_r)} / – / {pct(mean_p)}")
    lines.append("| **mean** | " + " | ".join(means) + " | | |")
    r = summary["routing"]
    lines += ["", f"Routing accuracy: {pct(r['accuracy'])} %, confusion {r['confusion']}"]
    f = summary["forgetting_routed"]
    if any(v is not None for v in f.values()):
        lines.append("Forgetting (routed): " + ", ".join(f"{m} {pct(v)}" for m, v in f.items()))
        lines.append("Forgetting (oracle): " + ", ".join(f"{m} {pct(v)}" for m, v in summary["forgetting_oracle"].items()))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="offline", help="preset name or YAML file")
    p.add_argument("--set", action="append", default=[], help="dotted.key=value override (repeatable)")
    p.add_argument("--limits", default=None, help="TRAIN,TEST images per task before the 80/20 split")
    p.add_argument("--seed", type=int, default=0, help="train.seed (the base flow's initialisation and the data order)")
    p.add_argument("--shared", default="../shared")
    p.add_argument("--tasks", nargs="*", default=None, help="task SPECs (default: the six real tasks)")
    p.add_argument("--feature-cache", default="runs/feature_cache_quality")
    p.add_argument("--full-matrix", action="store_true", help="evaluate every task after every task (forgetting)")
    p.add_argument("--no-patchcore", action="store_true")
    p.add_argument("--coreset", type=float, default=PATCHCORE_CORESET)
    p.add_argument("--rescore", default=None, help="RUN_DIR of an earlier sweep run: evaluate its models again")
    args = p.parse_args(argv)
    args.command = "python benchmarks/quality_sweep.py " + " ".join(argv) if argv else ""
    return args


def rescore(args, held: dict, fit_tasks: list[TaskData], out: Path, cache: Path):
    """Load the models of the sweep run ``args.rescore`` and evaluate them under its config + ``--set``."""
    run = Path(args.rescore)
    run_cfg = load_config(run / "config.yaml")
    cfg = apply_overrides(run_cfg, args.set)
    if to_dict(cfg.model) != to_dict(run_cfg.model) or to_dict(cfg.train) != to_dict(run_cfg.train):
        raise SystemExit(f"--rescore {run}: only scoring.* and router.* may be overridden (the models are not retrained)")
    model, router = load_all(run_cfg, run / "checkpoints")
    router.cfg = cfg.router
    exp = HeldOutExperiment(cfg, out, held, final_only=True, progress=False, feature_cache=cache)
    exp.model, exp.router, exp.num_tasks = model.to(exp.device), router, len(fit_tasks)
    for task in fit_tasks:
        exp.eval_sets[task.name] = exp.prepare_eval_set(task)
    exp.evaluate_all()
    previous = json.loads((run / "summary.json").read_text())["tasks"]
    keys = ("train_seconds", "epochs_run", "best_epoch", "validation_nll", "fit_images", "train_seconds_per_300")
    return cfg, exp.results(), {name: {k: row[k] for k in keys} for name, row in previous.items()}


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    limits = parse_limits(args.limits)
    specs = args.tasks or six_tasks(Path(args.shared))
    tasks = resolve_tasks(specs, limits=limits)
    splits = [split_holdout(t) for t in tasks]
    fit_tasks, held = [s[0] for s in splits], {s[0].name: s[1] for s in splits}
    out, cache = Path(args.out), Path(args.feature_cache)
    out.mkdir(parents=True, exist_ok=True)
    if args.rescore:
        cfg, results, training = rescore(args, held, fit_tasks, out, cache)
        write_json_atomic(results, out / "results.json")
    else:
        cfg = apply_overrides(load_config(args.config), [*args.set, f"train.seed={args.seed}"])
        torch.manual_seed(args.seed)
        exp = HeldOutExperiment(cfg, out, held, final_only=not args.full_matrix, progress=False, feature_cache=cache)
        results = exp.run(fit_tasks, specs, limits)
        training = training_rows(exp)
    patchcore = None if args.no_patchcore else patchcore_all(cfg, fit_tasks, cache, args.coreset, 0, out)
    if patchcore is not None:
        write_json_atomic(patchcore, out / "patchcore.json")
    summary = summarise(results, patchcore, training, args, cfg)
    write_json_atomic(summary, out / "summary.json")
    (out / "summary.md").write_text(markdown(summary))
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
