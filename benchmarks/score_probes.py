"""Scoring probes on a trained six-product run, no retraining (docs/QUALITY_STUDY.md).

    python benchmarks/score_probes.py logdet RUN --out DIR [--weights 0,0.5,1.25,1.5] [quality_sweep options]
    python benchmarks/score_probes.py memory-bank RUN --out DIR [--weights 0.3,0.5,0.7] [--only TASK,...]
    python benchmarks/score_probes.py global RUN --out DIR [--weights 0.2,0.35,0.5] [--only TASK,...]

``RUN`` is a run directory of the six-product benchmark (``benchmarks/six_products.sh``, ``--limits 300,400``).

``logdet``: the patch score ``0.5 |z|^2 - a log|det J|`` for each weight ``a`` (1 is the likelihood, the
default score), one ``quality_sweep.py --rescore RUN --no-patchcore`` per weight into ``DIR/a<weight>``;
routed, threshold-free metrics only (the thresholds were calibrated under the default score).

``memory-bank``: the flow's patch scores summed with a PatchCore's (10 % coreset of the same fit share, on
its stride-8 features), each standardised by the mean and spread of its own patch scores on the
product's held-out normals; the flow's map is upsampled to PatchCore's grid, and ``w`` weighs PatchCore
(image score: the same sum of the standardised image scores). Task id given. Writes ``DIR/memory_bank.json``.

``global``: the image score only (maps unchanged): the flow's image score summed with an image-level
Gaussian distance (Rippel et al. 2020), each standardised by its mean and spread on the product's held-out
normals, ``w`` on the distance. Two global features: ``proto``, the router's own squared Mahalanobis
distance to the product's prototype (what ``ScoredBatch.distances`` holds, free at inference), and
``meanstd``, the per-channel mean and standard deviation of the image's patches (2 D numbers) under a
Gaussian fitted (OAS shrinkage) on the fit share of the product's training normals (and ``meanmax``,
mean and maximum); the router's distance also by its log (``proto_log``) or square root (``proto_sqrt``);
``_max`` rows take the larger of
the two standardised scores instead of their mix. The flow's score is its own (``Detector.score_flow``),
also in a run that mixes. Task id given. Writes ``DIR/global.json``.

``position``: the maps only: each patch score standardised by the mean (``mean``) or mean and spread
(``z``) of the flow's scores at the same grid position on the product's normals, the held-out ones
(``held``) or the fit share (``fit``), each position's statistics shrunk towards the whole grid's with
``k`` pseudo-images (``--weights`` gives the ``k``s). Image score: the flow's own, and, as ``image_top3``,
the top-3 mean of the standardised map. Task id given. Writes ``DIR/position.json``.

``levels``: the image score only, from Gaussians of whole-image statistics at every stage of the backbone
(Rippel et al. 2020 pool every level of an EfficientNet): for each stage timm exposes of EfficientNet-Lite2
(``blocks.0``, ``.1``, ``.2``, ``.4``, ``.6``) and its pooled head (``head``), the per-channel mean
(``L<k>``) or mean and standard deviation (``M<k>``) over the stage's map, a Gaussian (OAS) fitted on the
fit share, the log distance standardised on the held-out normals; sums of several stages' standardised
distances; and each mixed half and half with the flow's standardised image score, or in thirds with the
flow and the run's own routing distance (``3way``). Task id given. Writes ``DIR/levels.json``.

``ensemble``: the flows of several runs of the same products (``--with RUN2 RUN3 ...``, e.g. other seeds)
averaged: each run's patch and image scores alone, and their mean (``mean``) and the mean of each run's
scores standardised on the product's held-out normals (``mean_z``). Image score: the flow's own. Task id
given. Writes ``DIR/ensemble.json``.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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

    if maps is None:  # image-level probe: the image AUROC alone
        values = task_metrics(image.numpy(), eval_set.labels, None, None).values
        return {"image_auroc": round(100 * float(values["image_auroc"]), 1)}
    full = None if eval_set.masks is None else anomaly_maps(maps, (size, size), PATCHCORE_SIGMA).numpy()
    values = task_metrics(image.numpy(), eval_set.labels, full, eval_set.masks).values
    return {
        k: None if values.get(k) is None or not np.isfinite(values[k]) else round(100 * float(values[k]), 1) for k in METRICS
    }


def _open_run(args: argparse.Namespace):
    """The benchmark run, opened without a calibration check (a probe scores on its own scale)."""
    from moleflow.experiment import ContinualExperiment

    return ContinualExperiment.open(args.run, progress=False, feature_cache=args.feature_cache, check_calibration=False)


def _products(args: argparse.Namespace, exp) -> Iterator[tuple[Any, list, list, int]]:
    """``(task, fit share, held-out normals, router index)`` of each product probed (``--only``: those)."""
    from moleflow.data.spec import parse_limits, resolve_tasks
    from moleflow.sources import holdout_split

    for task in resolve_tasks(args.tasks, limits=parse_limits(args.limits)):
        if args.only and task.name not in args.only:
            continue
        fit, held = holdout_split(task.train, exp.cfg.calibration.holdout)
        yield task, list(fit), list(held), exp.detector.router.tasks.index(task.name)


def _each_product(args: argparse.Namespace, exp, product: Callable[..., dict | None], filename: str) -> None:
    """``product(task, fit share, held-out normals, router index)`` -> its rows (None: skipped) for each
    product probed; printed as they come, all written to ``args.out / filename``."""
    results = {}
    for task, fit, held, index in _products(args, exp):
        rows = product(task, fit, held, index)
        if rows is not None:
            results[task.name] = rows
            print(task.name, json.dumps(rows), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / filename).write_text(json.dumps(results, indent=1))


def _flow_scores(detector, feats, index: int):
    """The flow's own scores (``Detector.score_flow``, also in a run that mixes) of ``feats``, product
    ``index`` given."""
    return detector.score_flow(feats, torch.full((len(feats),), index, dtype=torch.long))


def _standard(s, normals) -> torch.Tensor:
    """``s`` standardised (float64) by the mean and spread of ``normals``."""
    s, normals = torch.as_tensor(s).double(), torch.as_tensor(normals).double()
    return (s - normals.mean()) / normals.std()


def memory_bank_probe(args: argparse.Namespace) -> None:
    from moleflow.baselines.patchcore import PatchCoreScorer, patchcore_backbone
    from moleflow.config import replace
    from moleflow.experiment import ContinualExperiment
    from moleflow.scoring import aggregate

    exp = _open_run(args)
    cfg, detector = exp.cfg, exp.detector
    pc_cfg = replace(cfg, model=replace(cfg.model, backbone=patchcore_backbone(cfg.model.backbone), scale_context=None))
    pc_exp = ContinualExperiment(pc_cfg, args.out / "patchcore_run", progress=False, feature_cache=args.feature_cache)

    def product(task, fit, held, index):

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
        return rows

    _each_product(args, exp, product, "memory_bank.json")


def _mean_std(patches: torch.Tensor) -> np.ndarray:
    """``(N, H, W, D)`` -> ``(N, 2 D)`` float64: per-channel mean and standard deviation over the grid (the
    ``patch_moments`` routing feature)."""
    from moleflow.training import patch_moments

    return patch_moments(patches.double()).numpy()


def _mean_max(patches: torch.Tensor) -> np.ndarray:
    """``(N, H, W, D)`` -> ``(N, 2 D)`` float64: per-channel mean and maximum over the grid."""
    x = patches.double().flatten(1, 2)
    return torch.cat([x.mean(dim=1), x.amax(dim=1)], dim=1).numpy()


GLOBAL_FEATURES = {"meanstd": _mean_std, "meanmax": _mean_max}


def global_probe(args: argparse.Namespace) -> None:
    from sklearn.covariance import OAS

    exp = _open_run(args)
    detector = exp.detector

    def product(task, fit, held, index):
        eval_set = exp.prepare_eval_set(task)
        fit_feats, held_feats = exp.extract(fit, "fit normals"), exp.extract(held, "held-out normals")

        test, normals = _flow_scores(detector, eval_set.features, index), _flow_scores(detector, held_feats, index)
        flow_img = _standard(test.image_scores, normals.image_scores)
        features = {
            "proto": _standard(test.distances, normals.distances),
            "proto_log": _standard(test.distances.log(), normals.distances.log()),
            "proto_sqrt": _standard(test.distances.sqrt(), normals.distances.sqrt()),
        }
        for name, describe in GLOBAL_FEATURES.items():
            gaussian = OAS().fit(describe(fit_feats.patches))
            dist_test = torch.from_numpy(gaussian.mahalanobis(describe(eval_set.features.patches)))
            dist_held = torch.from_numpy(gaussian.mahalanobis(describe(held_feats.patches)))
            features[name] = _standard(dist_test, dist_held)
        features["proto+meanstd"] = 0.5 * (features["proto"] + features["meanstd"])
        size = exp.eval_size
        rows = {"flow": _metrics(test.image_scores, None, eval_set, size)}
        for name, dist in features.items():
            rows[name] = _metrics(dist, None, eval_set, size)
            for w in args.weights:
                rows[f"{name}_w{w:g}"] = _metrics((1 - w) * flow_img + w * dist, None, eval_set, size)
            rows[f"{name}_max"] = _metrics(torch.maximum(flow_img, dist), None, eval_set, size)
        return rows

    _each_product(args, exp, product, "global.json")


def _position_statistics(normals: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``normals (N, h, w)`` patch scores -> ``(mean, std)`` each ``(h, w)``: each position's moments shrunk
    towards the grid's with ``k`` pseudo-images of the grid's moments."""
    x = normals.double()
    n = len(x)
    grid_mean, grid_var = x.mean(), x.var()
    mean = (n * x.mean(dim=0) + k * grid_mean) / (n + k)
    second = (n * x.pow(2).mean(dim=0) + k * (grid_var + grid_mean**2)) / (n + k)
    return mean, (second - mean**2).clamp_min(1e-12).sqrt()


def position_probe(args: argparse.Namespace) -> None:
    from moleflow.scoring import aggregate

    exp = _open_run(args)
    detector = exp.detector

    def product(task, fit, held, index):
        eval_set = exp.prepare_eval_set(task)
        if eval_set.masks is None:
            return None

        test = _flow_scores(detector, eval_set.features, index)  # the maps do not depend on the mix
        normals = {
            "held": _flow_scores(detector, exp.extract(held, "held-out normals"), index).patch_scores,
            "fit": _flow_scores(detector, exp.extract(fit, "fit normals"), index).patch_scores,
        }
        size = exp.eval_size
        rows = {"flow": _metrics(test.image_scores, test.patch_scores, eval_set, size)}
        for share, maps in normals.items():
            for k in args.weights:
                mean, std = _position_statistics(maps, k)
                for kind, standardised in (
                    ("mean", test.patch_scores.double() - mean),
                    ("z", (test.patch_scores.double() - mean) / std),
                ):
                    row = _metrics(test.image_scores, standardised.float(), eval_set, size)
                    top3 = aggregate(standardised.float(), "top_k", 3)
                    row["image_top3"] = _metrics(top3, None, eval_set, size)["image_auroc"]
                    rows[f"{kind}_{share}_k{k:g}"] = row
        return rows

    _each_product(args, exp, product, "position.json")


LITE2_STAGES = ("blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6")  # the stages timm exposes


def _stage_statistics(samples: list, size: int) -> dict[str, np.ndarray]:
    """Images -> ``{"L<k>": (N, C_k) channel means, "M<k>": (N, 2 C_k) means and spreads, "head": (N, 1280)}``
    at every stage ``blocks.<k>`` of :data:`LITE2_STAGES`, float64."""
    from moleflow.features.backbones import create_backbone
    from moleflow.features.extractor import image_to_tensor

    backbone = create_backbone("efficientnet_lite2", LITE2_STAGES, size, True)
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    out: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode():
        for start in range(0, len(samples), 8):
            x = torch.stack([image_to_tensor(s.load_image(), size) for s in samples[start : start + 8]])
            maps, pooled = backbone((x - mean) / std)
            for stage, m in zip(LITE2_STAGES, maps, strict=True):
                k, m = stage.split(".")[1], m.double().flatten(2)
                out.setdefault(f"L{k}", []).append(m.mean(dim=2).numpy())
                out.setdefault(f"M{k}", []).append(torch.cat([m.mean(dim=2), m.std(dim=2)], dim=1).numpy())
            out.setdefault("head", []).append(pooled.double().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def levels_probe(args: argparse.Namespace) -> None:
    from sklearn.covariance import OAS

    exp = _open_run(args)
    detector, size = exp.detector, exp.eval_size

    def product(task, fit, held, index):
        eval_set = exp.prepare_eval_set(task)

        test = _flow_scores(detector, eval_set.features, index)
        normals = _flow_scores(detector, exp.extract(held, "held-out normals"), index)
        flow = _standard(test.image_scores, normals.image_scores)
        proto = _standard(test.distances.log(), normals.distances.log())
        stats = {split: _stage_statistics(list(samples), size) for split, samples in
                 (("fit", fit), ("held", held), ("test", task.test))}  # fmt: skip
        dists = {}
        for name in stats["fit"]:
            gaussian = OAS().fit(stats["fit"][name])
            dists[name] = _standard(np.log(gaussian.mahalanobis(stats["test"][name])),
                                    np.log(gaussian.mahalanobis(stats["held"][name])))  # fmt: skip
        for label, names in (("sumL", ["L0", "L1", "L2", "L4", "L6"]), ("sumM", ["M0", "M1", "M2", "M4", "M6"]),
                             ("sumM246", ["M2", "M4", "M6"]), ("sumM46", ["M4", "M6"]),
                             ("sumL46h", ["L4", "L6", "head"])):  # fmt: skip
            dists[label] = torch.stack([dists[n] for n in names]).mean(dim=0)
        rows = {
            "flow": _metrics(flow, None, eval_set, size),
            "default": _metrics(0.5 * (flow + proto), None, eval_set, size),
        }
        for name, dist in dists.items():
            rows[name] = _metrics(dist, None, eval_set, size)
            rows[f"{name}+flow"] = _metrics(0.5 * (flow + dist), None, eval_set, size)
            rows[f"{name}_3way"] = _metrics((flow + proto + dist) / 3, None, eval_set, size)
        return rows

    _each_product(args, exp, product, "levels.json")


def ensemble_probe(args: argparse.Namespace) -> None:
    from moleflow.scoring import aggregate

    runs = [args.run, *args.with_runs]
    exps = [_open_run(argparse.Namespace(**{**vars(args), "run": run})) for run in runs]

    def product(task, _fit, held, _index):
        eval_set = exps[0].prepare_eval_set(task)
        if eval_set.masks is None:
            return None
        held_feats = exps[0].extract(held, "held-out normals")
        maps, standardised = [], []
        rows = {}
        for i, exp in enumerate(exps):
            idx = exp.detector.router.tasks.index(task.name)

            test = _flow_scores(exp.detector, eval_set.features, idx).patch_scores.double()
            normals = _flow_scores(exp.detector, held_feats, idx).patch_scores
            rows[f"run{i}"] = _metrics(aggregate(test.float(), "top_k", 3), test.float(), eval_set, exp.eval_size)
            maps.append(test)
            standardised.append(_standard(test, normals))
        for name, parts in (("mean", maps), ("mean_z", standardised)):
            avg = torch.stack(parts).mean(dim=0).float()
            rows[name] = _metrics(aggregate(avg, "top_k", 3), avg, eval_set, exps[0].eval_size)
        return rows

    _each_product(args, exps[0], product, "ensemble.json")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("probe", choices=("logdet", "memory-bank", "global", "position", "ensemble", "levels"))
    p.add_argument("run", type=Path, help="run directory of the six-product benchmark")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--weights", type=lambda s: [float(v) for v in s.split(",")], default=None)
    p.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared")
    p.add_argument("--feature-cache", type=Path, default=Path("runs/feature_cache"))
    p.add_argument("--limits", default="300,400")
    p.add_argument("--tasks", nargs="+", default=None, help="NAME=SOURCE specs (default: the six products)")
    p.add_argument("--with", dest="with_runs", nargs="+", type=Path, default=[], help="ensemble: the other runs")
    p.add_argument("--only", type=lambda s: s.split(","), default=None, help="memory-bank, global: these products only")
    args = p.parse_args(argv)
    args.tasks = args.tasks or six_tasks(args.shared, BENCHMARK_NAMES)
    if args.probe == "logdet":
        args.weights = args.weights or [0.0, 0.5, 1.25, 1.5]
        logdet_probe(args)
    elif args.probe == "levels":
        levels_probe(args)
    elif args.probe == "ensemble":
        ensemble_probe(args)
    elif args.probe == "position":
        args.weights = args.weights or [0.0, 5.0, 20.0]
        position_probe(args)
    elif args.probe == "global":
        args.weights = args.weights or [0.2, 0.35, 0.5]
        global_probe(args)
    else:
        args.weights = args.weights or [0.3, 0.5, 0.7]
        memory_bank_probe(args)


if __name__ == "__main__":
    main()
