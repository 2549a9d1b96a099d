"""Benchmark: the offline preset learning hazelnut_toy -> mpdd_metal_plate -> elpv mono -> elpv poly,
next to a non-continual PatchCore baseline (task id given) on the same backbone, layers and input size, with
PatchCore's stride-8 patches (3x3 averaged, the stride-16 layer upsampled) and a 10 % coreset.

    python benchmarks/continual_offline.py --out runs/bench_offline [--shared ../shared] [--set k=v ...]

Writes the run directory of the continual run plus ``baseline.json`` and ``benchmark.md`` (the
tables quoted in docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from moleflow.atomic import write_json_atomic
from moleflow.baselines.patchcore import PATCHCORE_CORESET, PatchCoreScorer, patchcore_backbone
from moleflow.config import apply_overrides, preset, replace
from moleflow.data import resolve_task
from moleflow.evaluation.protocol import METRIC_NAMES
from moleflow.evaluation.task_metrics import task_metrics
from moleflow.experiment import ContinualExperiment
from moleflow.report import format_summary_table, pct
from moleflow.scoring import anomaly_maps

log = logging.getLogger("benchmark")


def task_specs(shared: Path) -> list[str]:
    return [
        f"hazelnut={shared / 'datasets/hazelnut_toy/hazelnut'}",
        f"mpdd_metal_plate={shared / 'datasets/mpdd_metal_plate/metal_plate'}",
        "elpv_mono=elpv:mono",
        "elpv_poly=elpv:poly",
    ]


def patchcore_baseline(exp: ContinualExperiment, tasks, coreset_ratio: float) -> dict:
    """Per-task PatchCore (task id given) on the run's backbone, layers and input size with PatchCore's own
    patches (``patchcore_backbone``: the finest layer's grid, 3x3 local averaging)."""
    out = {}
    size = exp.eval_size
    backbone = patchcore_backbone(exp.cfg.model.backbone)
    pc = exp
    if backbone != exp.cfg.model.backbone:
        model = replace(exp.cfg.model, backbone=backbone, scale_context=None)
        pc = ContinualExperiment(replace(exp.cfg, model=model), exp.run_dir / "patchcore", progress=False)
    for task in tasks:
        start = time.perf_counter()
        train = pc.extract(task.train, f"baseline features {task.name}")
        scorer = PatchCoreScorer(coreset_ratio=coreset_ratio).fit(train.patches)
        es = pc.eval_sets[task.name] if pc is exp else pc.prepare_eval_set(task)
        patch = scorer.score(es.features.patches)
        maps = None if es.masks is None else anomaly_maps(patch, (size, size), 4.0).numpy()  # PatchCore's sigma = 4
        image_scores = scorer.image_scores(es.features.patches).numpy()
        values: dict = task_metrics(image_scores, es.labels, maps, es.masks).values  # all metrics, None where n/a
        values["seconds"] = time.perf_counter() - start
        out[task.name] = {k: (None if v is None or not np.isfinite(v) else float(v)) for k, v in values.items()}
        log.info("patchcore %s: %s", task.name, out[task.name])
    return out


def markdown(results: dict, baseline: dict, command: str) -> str:
    metrics = [m for m in METRIC_NAMES if m in results["metrics"]]  # the newer metrics once results carry them
    lines = [
        f"Command: `{command}`",
        "",
        f"Environment: {results['environment']}",
        "",
        "| task | " + " | ".join(f"{m} routed | {m} oracle | {m} PatchCore" for m in metrics) + " |",
        "|---|" + "---|---|---|" * len(metrics),
    ]
    for j, task in enumerate(results["tasks"]):
        cells = []
        for m in metrics:
            cells += [
                pct(results["metrics"][m]["final"][j]),
                pct(results["metrics_oracle"][m]["final"][j]),
                pct(baseline[task].get(m)),
            ]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| metric | final mean routed | forgetting routed | final mean oracle |",
        "|---|---|---|---|",
    ]
    for m in metrics:
        r, o = results["metrics"][m], results["metrics_oracle"][m]
        lines.append(f"| {m} | {pct(r['final_mean'])} | {pct(r['forgetting'])} | {pct(o['final_mean'])} |")
    t = results["timing"]
    lines += [
        "",
        f"Routing accuracy: {pct(results['routing']['accuracy'])} %, confusion {results['routing']['confusion']}",
        "",
        "| task | feature s | train s | PatchCore s |",
        "|---|---|---|---|",
    ]
    for j, task in enumerate(results["tasks"]):
        lines.append(
            f"| {task} | {t['feature_seconds'][j]:.1f} | {t['train_seconds'][j]:.1f} | {baseline[task]['seconds']:.1f} |"
        )
    lines.append(f"\nInference (extraction + routing + scoring): {t['inference_ms_per_image']:.1f} ms/image")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/bench_offline")
    p.add_argument("--shared", default="../shared")
    p.add_argument("--coreset", type=float, default=PATCHCORE_CORESET)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = apply_overrides(preset("offline"), args.set)
    specs = task_specs(Path(args.shared))
    tasks = [resolve_task(s) for s in specs]
    out = Path(args.out)
    exp = ContinualExperiment(cfg, out, progress=False)
    results = exp.run(tasks, specs)
    baseline = patchcore_baseline(exp, tasks, args.coreset)
    write_json_atomic(baseline, out / "baseline.json")
    command = "python benchmarks/continual_offline.py " + " ".join(
        [f"--out {args.out}", f"--coreset {args.coreset}"] + [f"--set {s}" for s in args.set]
    )
    (out / "benchmark.md").write_text(markdown(results, baseline, command))
    print(format_summary_table(results))
    print((out / "benchmark.md").read_text())


if __name__ == "__main__":
    main()
