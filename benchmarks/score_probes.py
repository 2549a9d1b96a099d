"""Scoring probes on a trained six-product run, no retraining (docs/QUALITY_STUDY.md).

    python benchmarks/score_probes.py logdet RUN --out DIR [--weights 0,0.5,1.25,1.5] [quality_sweep options]
    python benchmarks/score_probes.py memory-bank RUN --out DIR [--weights 0.3,0.5,0.7] [--only TASK,...]

``RUN`` is a run directory of the six-product benchmark (``benchmarks/six_products.sh``, ``--limits 300,400``).

``logdet``: the patch score ``0.5 |z|^2 - a log|det J|`` for each weight ``a`` (1 is the likelihood, the
default score), one ``quality_sweep.py --rescore RUN --no-patchcore`` per weight into ``DIR/a<weight>``;
routed, threshold-free metrics only (the thresholds were calibrated under the default score).

``memory-bank``: the flow's patch scores summed with a PatchCore's (10 % coreset of the same fit share, on
its stride-8 features), each standardised by the mean and spread of its own patch scores on the
product's held-out normals; the flow's map is upsampled to PatchCore's grid, and ``w`` weighs PatchCore
(image score: the same sum of the standardised image scores). Task id given. Writes ``DIR/memory_bank.json``.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quality_sweep import BENCHMARK_NAMES, METRICS, PATCHCORE_SIGMA, six_tasks  # noqa: E402


def weighted_score(weight: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``z (B, H, W, D)``, ``logdet (B, H, W)`` -> ``0.5 |z|^2 - weight * logdet`` ``(B, H, W)``."""

    def score(z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
        return 0.5 * z.pow(2).sum(dim=-1) - weight * logdet

    return score


def logdet_probe(args: argparse.Namespace) -> None:
    import moleflow.inference as inference

    default = inference.patch_scores
    for weight in args.weights:
        inference.patch_scores = weighted_score(weight)  # score_features looks the score up at call time
        argv = ["--rescore", str(args.run), "--out", str(args.out / f"a{weight:g}"), "--limits", args.limits,
                "--shared", str(args.shared), "--feature-cache", str(args.feature_cache), "--no-patchcore",
                "--tasks", *args.tasks]  # fmt: skip
        sys.argv = [str(HERE / "quality_sweep.py"), *argv]
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        finally:
            inference.patch_scores = default


def _metrics(image: torch.Tensor, maps: torch.Tensor | None, eval_set, size: int) -> dict[str, float | None]:
    from moleflow.evaluation.task_metrics import task_metrics
    from moleflow.scoring import anomaly_maps

    full = None if eval_set.masks is None else anomaly_maps(maps, (size, size), PATCHCORE_SIGMA).numpy()
    values = task_metrics(image.numpy(), eval_set.labels, full, eval_set.masks).values
    return {
        k: None if values.get(k) is None or not np.isfinite(values[k]) else round(100 * float(values[k]), 1) for k in METRICS
    }


def memory_bank_probe(args: argparse.Namespace) -> None:
    from moleflow.baselines.patchcore import PatchCoreScorer, patchcore_backbone
    from moleflow.config import replace
    from moleflow.data.spec import parse_limits, resolve_tasks
    from moleflow.experiment import ContinualExperiment
    from moleflow.scoring import aggregate
    from moleflow.sources import holdout_split

    tasks = resolve_tasks(args.tasks, limits=parse_limits(args.limits))
    exp = ContinualExperiment.open(args.run, progress=False, feature_cache=args.feature_cache, check_calibration=False)
    cfg, detector = exp.cfg, exp.detector
    pc_cfg = replace(cfg, model=replace(cfg.model, backbone=patchcore_backbone(cfg.model.backbone), scale_context=None))
    pc_exp = ContinualExperiment(pc_cfg, args.out / "patchcore_run", progress=False, feature_cache=args.feature_cache)
    results = {}
    for task in tasks:
        if args.only and task.name not in args.only:
            continue
        fit, held = holdout_split(task.train, cfg.calibration.holdout)
        index = detector.router.tasks.index(task.name)

        def flow(feats, index=index):  # (N, h, w) flow patch scores of the product, task id given
            return detector.score(feats, torch.full((len(feats),), index, dtype=torch.long)).patch_scores

        eval_set = exp.prepare_eval_set(task)
        flow_test, flow_held = flow(eval_set.features), flow(exp.extract(list(held), "held-out normals"))
        scorer = PatchCoreScorer(coreset_ratio=0.1, seed=0).fit(pc_exp.extract(list(fit), "patchcore fit").patches.float())
        pc_test = scorer.score(pc_exp.prepare_eval_set(task).features.patches.float())  # (N, H, W)
        pc_held = scorer.score(pc_exp.extract(list(held), "patchcore held-out").patches.float())

        def up(s: torch.Tensor, grid=tuple(pc_test.shape[1:])) -> torch.Tensor:
            return F.interpolate(s[:, None], size=grid, mode="bilinear", align_corners=False)[:, 0]

        def standard(s: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
            return (s - normals.mean()) / normals.std()

        flow_map, pc_map = standard(up(flow_test), up(flow_held)), standard(pc_test, pc_held)
        flow_img = standard(aggregate(flow_test, "top_k", 3), aggregate(flow_held, "top_k", 3))
        pc_img = standard(pc_test.flatten(1).amax(1), pc_held.flatten(1).amax(1))
        size = exp.eval_size
        rows = {
            "flow": _metrics(aggregate(flow_test, "top_k", 3), flow_test, eval_set, size),
            "patchcore": _metrics(pc_test.flatten(1).amax(1), pc_test, eval_set, size),
        }
        for w in args.weights:
            rows[f"w{w:g}"] = _metrics((1 - w) * flow_img + w * pc_img, (1 - w) * flow_map + w * pc_map, eval_set, size)
        results[task.name] = rows
        print(task.name, json.dumps(rows), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory_bank.json").write_text(json.dumps(results, indent=1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("probe", choices=("logdet", "memory-bank"))
    p.add_argument("run", type=Path, help="run directory of the six-product benchmark")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--weights", type=lambda s: [float(v) for v in s.split(",")], default=None)
    p.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared")
    p.add_argument("--feature-cache", type=Path, default=Path("runs/feature_cache"))
    p.add_argument("--limits", default="300,400")
    p.add_argument("--tasks", nargs="+", default=None, help="NAME=SOURCE specs (default: the six products)")
    p.add_argument("--only", type=lambda s: s.split(","), default=None, help="memory-bank: these products only")
    args = p.parse_args(argv)
    args.tasks = args.tasks or six_tasks(args.shared, BENCHMARK_NAMES)
    if args.probe == "logdet":
        args.weights = args.weights or [0.0, 0.5, 1.25, 1.5]
        logdet_probe(args)
    else:
        args.weights = args.weights or [0.3, 0.5, 0.7]
        memory_bank_probe(args)


if __name__ == "__main__":
    main()
