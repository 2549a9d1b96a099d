"""What a config costs on this machine: learning a 300-image product, inference per image, routing at 1,000 products.

    python benchmarks/quality_cost.py --out runs/quality/cost_NAME.json [--config offline] [--set k=v ...]

- Learn: ``--images`` (300) training images of ``--task`` (magnetic_tile: real files of varying size) are
  split 80/20 as the lifecycle splits them; timed: feature extraction of all of them (decoding included,
  no cache), training on the 80 % (held-out NLL every epoch when early stopping is configured) and scoring
  the 20 % (the calibration pass). The product is learned as the first task (the base is trained too:
  the dearer case).
- Inference: uint8 images -> routed anomaly maps (``moleflow.perf.sections``' end-to-end path: backbone,
  router over 4 products, flow, maps), at batch 32 and batch 1; median of repetitions.
- Routing at 1,000 products: synthetic prototypes shaped like real ones (``synthetic_router``); per-image
  routing time at batch 32 next to the end-to-end time.

Timings depend on what else runs on the machine; run it alone and say how many threads (``torch`` default).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

from moleflow.config import apply_overrides, load_config, to_dict
from moleflow.data.spec import resolve_task
from moleflow.data.subsample import subsample_task
from moleflow.features.cache import extract_features
from moleflow.features.extractor import FeatureExtractor
from moleflow.flow.model import MoLEFlow
from moleflow.inference import score_features
from moleflow.perf.sections import InferenceOptions, _e2e_pass, e2e_setup, synthetic_router
from moleflow.perf.timing import time_fn
from moleflow.routing import Router
from moleflow.training import ContinualTrainer

sys.path.insert(0, str(Path(__file__).parent))
from quality_sweep import split_holdout  # noqa: E402


def learn_cost(cfg, spec: str, images: int) -> dict:
    task = subsample_task(resolve_task(spec), images, 2)
    fit, held = split_holdout(task, cfg.calibration.holdout)
    device = torch.device("cpu")
    start = time.perf_counter()
    extractor = FeatureExtractor(cfg.model.backbone)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    feats = extract_features(extractor, list(fit.train) + list(held), need_context=False, batch_size=32, progress=False)
    extract_s = time.perf_counter() - start
    fit_f, held_f = feats[: len(fit.train)], feats[len(fit.train) :]
    torch.manual_seed(cfg.train.seed)
    model = MoLEFlow(cfg.model)
    trainer = ContinualTrainer(model, Router(cfg.router), cfg, device)
    start = time.perf_counter()
    validation = held_f if cfg.train.early_stopping is not None else None
    report = trainer.learn_task("product", fit_f, progress=False, validation=validation)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    own = torch.zeros(len(held_f), dtype=torch.long)
    score_features(model, trainer.router, held_f, cfg.scoring, own)
    calibrate_s = time.perf_counter() - start
    return {
        "images": len(task.train),
        "fit_images": len(fit.train),
        "held_out_images": len(held),
        "extractor_setup_s": setup,
        "extract_s": extract_s,
        "train_s": train_s,
        "epochs_run": len(report.epoch_losses),
        "calibrate_s": calibrate_s,
        "learn_total_s": extract_s + train_s + calibrate_s,
    }


def inference_cost(cfg, reps: int) -> dict:
    from moleflow.perf.sections import random_images

    options = InferenceOptions.for_device(torch.device("cpu"))
    extractor, model, router = e2e_setup(cfg, torch.device("cpu"), options)
    out = {}
    for batch in (32, 1):
        imgs = random_images(batch, cfg.model.backbone.image_size)
        run = functools.partial(_e2e_pass, extractor, model, router, cfg, imgs, options)
        out[f"ms_per_image_batch{batch}"] = 1e3 * time_fn(run, torch.device("cpu"), warmup=1, reps=reps) / batch
    return out


def routing_cost(cfg, tasks: int, reps: int) -> dict:
    extractor = FeatureExtractor(cfg.model.backbone)
    use_pooled = cfg.router.feature == "backbone_pooled"
    dim = extractor.pooled_dim if use_pooled else extractor.embed_dim
    router, sample = synthetic_router(cfg, dim, tasks, torch.device("cpu"))
    h, w = extractor.grid
    batch = 32
    if cfg.router.feature == "patch_gaussian":
        feats = sample(batch * h * w).reshape(batch, h * w, dim)
    else:
        feats = sample(batch)
    router.route(feats)  # builds the index / log-determinants once
    seconds = time_fn(lambda: router.route(feats), torch.device("cpu"), warmup=1, reps=reps)
    return {"tasks": tasks, "ms_per_image_batch32": 1e3 * seconds / batch}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="offline")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out", required=True)
    p.add_argument("--task", default="magnetic_tile=../shared/datasets/magnetic_tile/magnetic_tile")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip-learn", action="store_true")
    args = p.parse_args()
    cfg = apply_overrides(load_config(args.config), args.set)
    result = {"overrides": args.set, "threads": torch.get_num_threads(), "config": to_dict(cfg)}
    if not args.skip_learn:
        result["learn"] = learn_cost(cfg, args.task, args.images)
        print(json.dumps(result["learn"]), flush=True)
    result["inference"] = inference_cost(cfg, args.reps)
    result["routing_1000"] = routing_cost(cfg, 1000, args.reps)
    share = result["routing_1000"]["ms_per_image_batch32"] / result["inference"]["ms_per_image_batch32"]
    result["routing_1000"]["share_of_inference"] = share
    print(json.dumps({k: result[k] for k in ("inference", "routing_1000")}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
