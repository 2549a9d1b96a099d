"""Quality sweep: MoLE-Flow learning the six real tasks continually, next to a faithful PatchCore.

    python benchmarks/quality_sweep.py --out runs/quality/NAME [--config offline|FILE.yaml] [--set k=v ...]
        [--limits TRAIN,TEST] [--seed N] [--full-matrix] [--no-patchcore] [--tasks SPEC ...]

Tasks (default, in this order): hazelnut_toy, mpdd_metal_plate, elpv mono, elpv poly, magnetic_tile,
bsd_pitting (``--shared`` holds ``datasets/``). Every task's training normals are split by the detector
itself (``calibration.holdout``, 20 %: evenly spaced over the training images' order): the held-out share
calibrates the thresholds and, with ``train.early_stopping``, decides when to stop; the rest trains the flow.
``--limits`` subsamples each task first (deterministic).

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

``--rescore RUN_DIR``: no training; the run directory of an earlier sweep is copied to ``--out`` and its
products are evaluated again under its config plus ``--set`` overrides of the ``scoring`` and ``router``
sections (routing uses the stored prototypes), e.g. to measure the smoothing sigma or top-k without
retraining. Only threshold-free metrics stay comparable: the thresholds were calibrated under the old scoring,
except with ``scoring.global_weight`` changed, which needs each product's calibration: then (or with
``--recalibrate``) every product is recalibrated on its held-out normals first (in the copy).

Writes ``results.json`` (the continual run), ``patchcore.json``, ``summary.json`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moleflow.atomic import write_json_atomic
from moleflow.baselines.patchcore import PATCHCORE_CORESET, PatchCoreScorer, patchcore_backbone
from moleflow.config import apply_overrides, load_config, replace, to_dict
from moleflow.data.base import TaskData
from moleflow.data.spec import parse_limits, resolve_tasks
from moleflow.evaluation.evaluate import EvalSet
from moleflow.evaluation.task_metrics import task_metrics
from moleflow.experiment import ContinualExperiment
from moleflow.features.cache import cache_fingerprint
from moleflow.features.store import samples_digest
from moleflow.report import pct
from moleflow.scoring import anomaly_maps
from moleflow.sources import holdout_split
from moleflow.validation import validate_tasks

log = logging.getLogger("quality_sweep")
METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")
PATCHCORE_SIGMA = 4.0  # PatchCore's Gaussian (pixels of the input image)


#: The six products' names here, and as benchmarks/six_products.sh names them (the runs of docs/RESULTS.md).
SWEEP_NAMES = ("hazelnut_toy", "mpdd_metal_plate", "elpv_mono", "elpv_poly", "magnetic_tile", "bsd_pitting")
BENCHMARK_NAMES = ("hazelnut", "metal_plate", "elpv_mono", "elpv_poly", "magnetic_tile", "bsd_pitting")


def six_tasks(shared: Path, names: tuple[str, ...] = SWEEP_NAMES) -> list[str]:
    """``NAME=SOURCE`` specs of the six real products (``shared`` holds ``datasets/``), named ``names``."""
    d = shared / "datasets"
    sources = (
        d / "hazelnut_toy/hazelnut",
        d / "mpdd_metal_plate/metal_plate",
        "elpv:mono",
        "elpv:poly",
        d / "magnetic_tile/magnetic_tile",
        d / "bsd_pitting/bsd_pitting",
    )
    return [f"{name}={source}" for name, source in zip(names, sources, strict=True)]


def split_holdout(task: TaskData, holdout: float = 0.2) -> tuple[TaskData, tuple]:
    """(``task`` with the training images the detector trains on, the ones it holds out to calibrate): the
    detector's own split (``calibration.holdout``, evenly spaced over the training images' order)."""
    fit, held = holdout_split(task.train, holdout)
    return dataclasses.replace(task, train=tuple(fit)), tuple(held)


def fit_share(task: TaskData, holdout: float) -> TaskData:
    return split_holdout(task, holdout)[0]


class EpochRecords:
    """A training logger (moleflow.training_log) that keeps every epoch record, per task."""

    def __init__(self) -> None:
        self.records: dict[str, list[dict[str, Any]]] = {}

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        self.records.setdefault(str(record["task"]), []).append(dict(record))

    def close(self) -> None:
        pass


def run_sweep(cfg, tasks: list[TaskData], specs, limits, out: Path, cache: Path, full_matrix: bool):
    """Learn ``tasks`` in order on a fresh run in ``out``; evaluate after every task (``full_matrix``) or once
    after the last. Returns (results.json, the epoch records per task)."""
    epochs = EpochRecords()
    exp = ContinualExperiment(cfg, out, progress=False, feature_cache=cache, loggers=[epochs])
    validate_tasks(tasks)
    for i, (task, spec) in enumerate(zip(tasks, specs, strict=True)):
        evaluate = "all" if full_matrix or i == len(tasks) - 1 else "none"
        exp.session.learn(task, task.name, evaluate=evaluate, spec=spec, limits=limits, check=False)
    return exp.session.last_results or exp.session.write(), epochs.records


# ----------------------------------------------------------------------------- PatchCore


def patchcore_task(exp: ContinualExperiment, task: TaskData, coreset: float, seed: int) -> dict:
    """Fit PatchCore on ``task.train`` (features of ``exp``'s backbone) and score its test set."""
    start = time.perf_counter()
    train = exp.extract(task.train, f"patchcore features {task.name}/train")
    es: EvalSet = exp.prepare_eval_set(task)
    scorer = PatchCoreScorer(coreset_ratio=coreset, seed=seed).fit(train.patches.float())
    fit_seconds = time.perf_counter() - start
    test = es.features.patches.float()
    size = (exp.eval_size, exp.eval_size)
    maps = None if es.masks is None else anomaly_maps(scorer.score(test), size, PATCHCORE_SIGMA).numpy()
    values = task_metrics(scorer.image_scores(test).numpy(), es.labels, maps, es.masks).values
    clean = {k: (None if v is None or not np.isfinite(v) else float(v)) for k, v in values.items()}
    return {**clean, "fit_seconds": fit_seconds, "seconds": time.perf_counter() - start, "bank": len(scorer.memory_bank)}


def patchcore_all(cfg, tasks: list[TaskData], cache: Path, coreset: float, seed: int, out: Path) -> dict:
    """PatchCore per task on the faithful feature config; results cached under ``cache``."""
    backbone = patchcore_backbone(cfg.model.backbone)
    pc_cfg = replace(cfg, model=replace(cfg.model, backbone=backbone, scale_context=None))
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


def training_rows(records: dict[str, list[dict]], fit_counts: dict[str, int], early_stopping: bool) -> dict[str, dict]:
    """Per task: epochs run, training seconds (the epochs' sum) and, with held-out normals, their NLL per
    epoch and (early stopping) the best epoch, the one whose parameters were kept (0-based)."""
    rows = {}
    for name, epochs in records.items():
        seconds, val = sum(r["seconds"] for r in epochs), [r["val_nll"] for r in epochs if "val_nll" in r]
        rows[name] = {
            "train_seconds": seconds,
            "epochs_run": len(epochs),
            "best_epoch": min(range(len(val)), key=val.__getitem__) if early_stopping and val else None,
            "validation_nll": val,
            "fit_images": fit_counts[name],
            "train_seconds_per_300": 300.0 * seconds / max(1, fit_counts[name]),
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
        cells.append(
            f"{row['epochs_run'] or '–'}" + (f" (best {row['best_epoch'] + 1})" if row["best_epoch"] is not None else "")
        )
        seconds = row["train_seconds"]
        cells.append("–" if seconds is None else f"{seconds:.0f} ({row['train_seconds_per_300']:.0f})")
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
    p.add_argument(
        "--recalibrate", action="store_true", help="--rescore: recalibrate every product on its held-out normals first"
    )
    args = p.parse_args(argv)
    args.command = "python benchmarks/quality_sweep.py " + " ".join(argv) if argv else ""
    return args


def rescore(args, out: Path):
    """Evaluate the products of the sweep run ``args.rescore`` again (in a copy at ``out``) under its config
    plus ``--set`` overrides of ``scoring.*`` and ``router.*``."""
    run = Path(args.rescore)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--rescore: {out} is not empty; give a new --out")
    shutil.copytree(run, out, dirs_exist_ok=True)
    exp = ContinualExperiment.open(out, progress=False, feature_cache=args.feature_cache, check_calibration=False)
    run_cfg = exp.cfg
    cfg = apply_overrides(run_cfg, args.set)
    if to_dict(cfg.model) != to_dict(run_cfg.model) or to_dict(cfg.train) != to_dict(run_cfg.train):
        raise SystemExit(f"--rescore {run}: only scoring.* and router.* may be overridden (the models are not retrained)")
    exp.detector.cfg, exp.router.cfg = cfg, cfg.router  # in memory only: the copy's config.yaml stays the run's
    if args.recalibrate or cfg.scoring.global_weight != run_cfg.scoring.global_weight:  # the mix needs it
        for name in exp.detector.products:
            exp.detector.calibrate(name, commit=False)
    exp.session.evaluate()
    keys = ("train_seconds", "epochs_run", "best_epoch", "validation_nll", "fit_images", "train_seconds_per_300")
    summary = run / "summary.json"  # absent for a run made by `moleflow learn`: no training rows then
    previous = json.loads(summary.read_text())["tasks"] if summary.is_file() else {n: {} for n in exp.detector.products}
    return cfg, exp.session.results(), {name: {k: row.get(k) for k in keys} for name, row in previous.items()}


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    limits = parse_limits(args.limits)
    specs = args.tasks or six_tasks(Path(args.shared))
    tasks = resolve_tasks(specs, limits=limits)
    out, cache = Path(args.out), Path(args.feature_cache)
    if args.rescore:
        cfg, results, training = rescore(args, out)
    else:
        cfg = apply_overrides(load_config(args.config), [*args.set, f"train.seed={args.seed}"])
        torch.manual_seed(args.seed)
        results, records = run_sweep(cfg, tasks, specs, limits, out, cache, args.full_matrix)
        fit_counts = {t.name: len(fit_share(t, cfg.calibration.holdout).train) for t in tasks}
        training = training_rows(records, fit_counts, cfg.train.early_stopping is not None)
    write_json_atomic(results, out / "results.json")
    fit_tasks = [fit_share(t, cfg.calibration.holdout) for t in tasks]  # PatchCore fits what the flow trains on
    patchcore = None if args.no_patchcore else patchcore_all(cfg, fit_tasks, cache, args.coreset, 0, out)
    if patchcore is not None:
        write_json_atomic(patchcore, out / "patchcore.json")
    summary = summarise(results, patchcore, training, args, cfg)
    write_json_atomic(summary, out / "summary.json")
    (out / "summary.md").write_text(markdown(summary))
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
