"""Routing accuracy of the prototype router on the benchmark's four real tasks, per covariance estimator.

    python benchmarks/routing_check.py [--shared ../shared]

Extracts the offline backbone's routing features of every train and test image once, then builds the
prototypes with each estimator/metric and routes every test image (no flow needed: routing only
depends on the backbone features).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from moleflow.config import RouterConfig, preset
from moleflow.data import resolve_task
from moleflow.features.cache import extract_features
from moleflow.features.extractor import FeatureExtractor
from moleflow.features.positional import positional_encoding_2d
from moleflow.routing import PrototypeAccumulator, Router


def patch_mean(feats) -> torch.Tensor:
    n, h, w, d = feats.patches.shape
    return (feats.patches + positional_encoding_2d(h, w, d)).mean(dim=(1, 2))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shared", default="../shared")
    args = p.parse_args()
    shared = Path(args.shared)
    specs = [
        f"hazelnut={shared / 'datasets/hazelnut_toy/hazelnut'}",
        f"mpdd_metal_plate={shared / 'datasets/mpdd_metal_plate/metal_plate'}",
        "elpv:mono",
        "elpv:poly",
    ]
    cfg = preset("offline")
    extractor = FeatureExtractor(cfg.model.backbone)
    train, test = [], []
    for spec in specs:
        task = resolve_task(spec)
        for split, store in ((task.train, train), (task.test, test)):
            feats = extract_features(extractor, split, need_context=False, progress=False)
            store.append({"patch_mean": patch_mean(feats), "backbone_pooled": feats.pooled})
    print("| feature | metric | shrinkage | routing accuracy | per task |")
    print("|---|---|---|---|---|")
    for feature in ("patch_mean", "backbone_pooled"):
        for metric, shrinkage in (("mahalanobis", "none"), ("mahalanobis", "oas"), ("euclidean", "none")):
            router = Router(RouterConfig(metric=metric, shrinkage=shrinkage, feature=feature))
            for i, feats in enumerate(train):
                acc = PrototypeAccumulator()
                acc.update(feats[feature])
                router.add(f"t{i}", *acc.finalize(1e-5, shrinkage))
            per_task = [(router.route(t[feature]) == i).double().mean().item() for i, t in enumerate(test)]
            sizes = [len(t[feature]) for t in test]
            total = sum(n * a for n, a in zip(sizes, per_task, strict=True)) / sum(sizes)
            print(
                f"| {feature} | {metric} | {shrinkage} | {100 * total:.1f} % | "
                + ", ".join(f"{100 * a:.1f}" for a in per_task)
                + " |"
            )


if __name__ == "__main__":
    main()
