"""Routing only, on the six real tasks: which routing feature / metric sends each test image to its task.

    python benchmarks/routing_study.py [--config offline] [--set k=v ...] [--limits TRAIN,TEST] [--out FILE.json]

No flow is trained: the router's prototypes depend on the backbone features only. Prototypes are built from
each task's fit share (the detector's calibration hold-out removed, as in ``quality_sweep.py``); every test
image is routed among all six.
Features come from (and go to) the same on-disk cache as ``quality_sweep.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from moleflow.config import RouterConfig, apply_overrides, load_config, replace, to_dict
from moleflow.data.spec import parse_limits, resolve_tasks
from moleflow.experiment import ContinualExperiment
from moleflow.routing import PrototypeAccumulator, Router
from moleflow.training import routing_features

sys.path.insert(0, str(Path(__file__).parent))
from quality_sweep import six_tasks, split_holdout  # noqa: E402

VARIANTS: dict[str, RouterConfig] = {
    "patch_mean / mahalanobis / oas": RouterConfig(feature="patch_mean", metric="mahalanobis", shrinkage="oas"),
    "patch_mean / mahalanobis / oas / pooled": RouterConfig(
        feature="patch_mean", metric="mahalanobis", shrinkage="oas", covariance="pooled"
    ),
    "patch_moments / mahalanobis / oas": RouterConfig(feature="patch_moments", metric="mahalanobis", shrinkage="oas"),
    "patch_moments / mahalanobis / oas / pooled": RouterConfig(
        feature="patch_moments", metric="mahalanobis", shrinkage="oas", covariance="pooled"
    ),
    "patch_mean / euclidean": RouterConfig(feature="patch_mean", metric="euclidean"),
    "backbone_pooled / mahalanobis / oas": RouterConfig(feature="backbone_pooled", metric="mahalanobis", shrinkage="oas"),
    "backbone_pooled / mahalanobis / oas / pooled": RouterConfig(
        feature="backbone_pooled", metric="mahalanobis", shrinkage="oas", covariance="pooled"
    ),
    "patch_gaussian / oas": RouterConfig(feature="patch_gaussian", shrinkage="oas"),
}


def build_router(exp: ContinualExperiment, rcfg: RouterConfig, train: dict) -> Router:
    router = Router(rcfg)
    for name, feats in train.items():
        acc = PrototypeAccumulator()
        for batch in feats.batches(64):
            acc.update(routing_features(exp.model, batch, rcfg.feature))
        router.add(name, *acc.finalize(rcfg.covariance_reg, rcfg.shrinkage))
    return router


def evaluate(exp: ContinualExperiment, router: Router, test: dict) -> dict:
    names = list(test)
    confusion = [[0] * len(names) for _ in names]
    for j, feats in enumerate(test.values()):
        for batch in feats.batches(64):
            for t in router.route(routing_features(exp.model, batch, router.cfg.feature)).tolist():
                confusion[j][t] += 1
    correct = sum(confusion[j][j] for j in range(len(names)))
    total = sum(map(sum, confusion))
    per_task = {n: confusion[j][j] / max(1, sum(confusion[j])) for j, n in enumerate(names)}
    return {"accuracy": correct / total, "per_task": per_task, "confusion": confusion}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="offline")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--limits", default=None)
    p.add_argument("--shared", default="../shared")
    p.add_argument("--feature-cache", default="runs/feature_cache_quality")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = apply_overrides(load_config(args.config), args.set)
    # extract with the backbone's final-layer feature too (the backbone_pooled variants route on it; a
    # preset that routes on the patches skips it), the patches are the same
    cfg = replace(cfg, router=replace(cfg.router, feature="backbone_pooled"))
    resolved = resolve_tasks(six_tasks(Path(args.shared)), limits=parse_limits(args.limits))
    tasks = [split_holdout(t, cfg.calibration.holdout)[0] for t in resolved]
    exp = ContinualExperiment(
        cfg, Path("runs/routing_study"), progress=False, feature_cache=Path(args.feature_cache), overwrite=True
    )
    train = {t.name: exp.extract(t.train, t.name) for t in tasks}
    test = {t.name: exp.extract(t.test, t.name) for t in tasks}
    rows = {}
    print(f"backbone: {to_dict(cfg.model.backbone)}")
    print("| router | accuracy | " + " | ".join(train) + " |")
    print("|---|---|" + "---|" * len(train))
    for label, rcfg in VARIANTS.items():
        with torch.no_grad():
            rows[label] = evaluate(exp, build_router(exp, rcfg, train), test)
        r = rows[label]
        cells = " | ".join(f"{100 * v:.1f}" for v in r["per_task"].values())
        print(f"| {label} | {100 * r['accuracy']:.1f} | {cells} |", flush=True)
    if args.out:
        payload = {"backbone": to_dict(cfg.model.backbone), "variants": rows}
        Path(args.out).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
