"""The measurements of ``moleflow bench``, one function per section (see ``moleflow.perf``)."""

from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moleflow.config import MoleFlowConfig, preset
from moleflow.perf.flops import head_flops
from moleflow.perf.timing import _free_memory, _sync, time_fn

PRESET_NAMES = ("paper", "v5", "offline")
PAPER_CONTEXT_DIM = 1536  # wide_resnet50_2 layer2 + layer3


def _context_dim(cfg: MoleFlowConfig) -> int | None:
    return PAPER_CONTEXT_DIM if cfg.model.scale_context is not None else None


def build_head(cfg: MoleFlowConfig, device: torch.device, tasks: int = 1, context_dim: int | None = None):
    from moleflow.flow.model import MoLEFlow

    torch.manual_seed(0)
    model = MoLEFlow(cfg.model, context_dim if context_dim is not None else _context_dim(cfg)).to(device)
    for i in range(tasks):
        model.add_task(f"t{i}")
    return model.eval()


def random_features(cfg: MoleFlowConfig, batch: int, device: torch.device, grid=(14, 14), context_dim=None):
    """Random ``CachedFeatures``-shaped batch (patches, context, pooled) at the preset's sizes."""
    from moleflow.features.cache import CachedFeatures

    gen = torch.Generator().manual_seed(1)
    d = cfg.model.backbone.embed_dim
    cdim = context_dim if context_dim is not None else _context_dim(cfg)
    patches = torch.randn(batch, *grid, d, generator=gen)
    context = torch.randn(batch, *grid, cdim, generator=gen) if cdim else None
    pooled = torch.randn(batch, 64, generator=gen)
    return CachedFeatures(patches, context, pooled).to(device)


def bench_head(name: str, device: torch.device, batch: int, ceiling: float, reps: int) -> dict:
    from moleflow.scoring import patch_scores

    cfg = preset(name)
    model = build_head(cfg, device)
    feats = random_features(cfg, batch, device)
    flops = head_flops(cfg.model, (14, 14), _context_dim(cfg), with_lora=False)  # adapters merged

    def step():
        with torch.inference_mode():
            out = model(feats.patches, "t0", feats.context)
            return patch_scores(out.z, out.logdet)

    seconds = time_fn(step, device, warmup=1, reps=reps)
    ips = batch / seconds
    return {
        "preset": name,
        "embed_dim": cfg.model.backbone.embed_dim,
        "context_dim": _context_dim(cfg),
        "batch": batch,
        "images_per_s": ips,
        "ms_per_image": 1e3 / ips,
        "head_flops": flops,
        "achieved_flops_per_s": flops * ips,
        "head_efficiency": flops * ips / ceiling,
    }


def bench_train(name: str, device: torch.device, batch: int, ceiling: float, reps: int) -> dict:
    from moleflow.routing import Router
    from moleflow.training import ContinualTrainer, build_optimizer

    cfg = preset(name)
    model = build_head(cfg, device)
    router = Router(cfg.router)
    trainer = ContinualTrainer(model, router, cfg, device)
    model.set_trainable("t0", train_base=True)
    groups = model.parameter_groups("t0", train_base=True)
    params = [p for ps in groups.values() for p in ps]
    optimizer = build_optimizer(groups, cfg.train)
    feats = random_features(cfg, batch, device)
    model.train()

    def step():
        loss, _ = trainer.objective(feats, "t0")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()

    seconds = time_fn(step, device, warmup=1, reps=reps)
    model.set_trainable(None, train_base=False)
    flops = 3 * head_flops(cfg.model, (14, 14), _context_dim(cfg))
    ips = batch / seconds
    return {
        "preset": name,
        "optimizer": cfg.train.optimizer,
        "batch": batch,
        "steps_per_s": 1.0 / seconds,
        "images_per_s": ips,
        "train_flops_per_image": flops,
        "achieved_flops_per_s": flops * ips,
        "train_efficiency": flops * ips / ceiling,
    }


def _random_router(cfg: MoleFlowConfig, dim: int, tasks: int, device: torch.device, seed: int = 0):
    from moleflow.routing import Router

    router = Router(cfg.router)
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(tasks, dim, generator=gen, dtype=torch.float64)
    diag = 0.5 + torch.rand(tasks, dim, generator=gen, dtype=torch.float64)
    router.tasks = [f"t{i}" for i in range(tasks)]
    router.means = means.to(device)
    router.precisions = torch.diag_embed(diag).to(device)  # (T, G, G), SPD; content does not change the cost
    return router


def _e2e_configs() -> list[tuple[str, MoleFlowConfig]]:
    lite0 = preset("offline")
    lite0.model.backbone.name = "efficientnet_lite0"
    lite0.model.backbone.embed_dim = 152  # lite0 blocks.2 + blocks.4 = 40 + 112 channels
    return [
        ("efficientnet_lite2", preset("offline")),
        ("efficientnet_lite0", lite0),
        ("vit_base_patch16_224 (v5)", preset("v5")),
        ("wide_resnet50_2 (paper)", preset("paper")),
    ]


def _e2e_pass(extractor, model, router, use_pooled: bool, images, size: tuple[int, int], sigma: float):
    """uint8 images -> routed anomaly maps (B, *size); every routed task runs on its own images."""
    from moleflow.scoring import anomaly_maps, patch_scores

    with torch.inference_mode():
        f = extractor(extractor.preprocess(images))
        if use_pooled:
            rfeat = f.pooled
        else:
            p = f.patches + model.positional(f.patches.shape[1], f.patches.shape[2], f.patches)
            rfeat = p.mean(dim=(1, 2))
        idx = router.route(rfeat)
        scores = torch.empty(f.patches.shape[:3], device=f.patches.device)
        for t in idx.unique().tolist():
            sel = idx == t
            ctx = None if f.context is None else f.context[sel]
            out = model(f.patches[sel], router.tasks[t], ctx)
            scores[sel] = patch_scores(out.z, out.logdet)
        return anomaly_maps(scores, size, sigma)


def bench_end_to_end(device: torch.device, batches: tuple[int, ...], reps: int) -> list[dict]:
    from moleflow.features.backbones import BackboneUnavailableError, BackboneWeightsError
    from moleflow.features.extractor import FeatureExtractor

    rows = []
    for label, cfg in _e2e_configs():
        try:
            extractor = FeatureExtractor(cfg.model.backbone).to(device)
        except (BackboneUnavailableError, BackboneWeightsError) as e:
            rows.append({"backbone": label, "status": "unavailable", "reason": str(e).splitlines()[0][:200]})
            continue
        n_tasks = 4
        model = build_head(cfg, device, tasks=n_tasks, context_dim=extractor.context_dim)
        use_pooled = cfg.router.feature == "backbone_pooled"
        router_dim = extractor.pooled_dim if use_pooled else extractor.embed_dim
        router = _random_router(cfg, router_dim, n_tasks, device)
        size = cfg.model.backbone.image_size
        rng = np.random.default_rng(0)

        for batch in batches:
            images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(batch)]

            run = functools.partial(
                _e2e_pass, extractor, model, router, use_pooled, images, (size, size), cfg.scoring.smoothing_sigma
            )
            seconds = time_fn(run, device, warmup=1, reps=reps)
            rows.append(
                {
                    "backbone": label,
                    "status": "ok",
                    "batch": batch,
                    "images_per_s": batch / seconds,
                    "ms_per_image": 1e3 * seconds / batch,
                }
            )
    return rows


def bench_routing(
    device: torch.device, quick: bool, offline_head_ms: float, task_counts=(1, 10, 100, 1000), dims=(168, 768)
) -> list[dict]:
    cfg = preset("offline")
    rows = []
    for dim in dims:
        for tasks in task_counts:
            nbytes = tasks * dim * dim * 8
            row: dict[str, Any] = {"dim": dim, "tasks": tasks, "precision_bytes": nbytes}
            if (quick and device.type == "cpu" and nbytes > 1e9) or nbytes > 0.25 * _free_memory(device):
                row["status"] = "skipped (quick mode on CPU)" if quick else "skipped (memory)"
                rows.append(row)
                continue
            router = _random_router(cfg, dim, tasks, device)
            x = torch.randn(1, dim, device=device)
            seconds = time_fn(lambda router=router, x=x: router.route(x), device, warmup=2, reps=5 if quick else 20)
            row.update(status="ok", ms_per_image=1e3 * seconds, ratio_to_head=1e3 * seconds / offline_head_ms)
            rows.append(row)
            del router
    return rows


def bench_per_task(device: torch.device, quick: bool, n_images: int = 300) -> dict:
    from moleflow.checkpoint import save_task
    from moleflow.routing import Router
    from moleflow.training import ContinualTrainer

    out: dict[str, Any] = {"presets": []}
    for name in PRESET_NAMES:
        cfg = preset(name)
        model = build_head(cfg, device, tasks=2)
        with tempfile.TemporaryDirectory() as tmp:
            save_task(model, cfg, "t1", Path(tmp))
            size = (Path(tmp) / "tasks" / "t1.safetensors").stat().st_size
        counts = model.parameter_counts()
        out["presets"].append(
            {
                "preset": name,
                "per_task_parameters": counts["per_task"]["t1"],
                "first_task_trainable": sum(p.numel() for ps in model.parameter_groups("t0", True).values() for p in ps),
                "base_parameters": counts["base"],
                "task_file_bytes": size,
            }
        )
    # learn a task on cached features
    cfg = preset("offline")
    epochs = cfg.train.epochs
    run_epochs = 1 if quick else epochs
    cfg.train.epochs = run_epochs
    from moleflow.flow.model import MoLEFlow

    torch.manual_seed(0)
    model = MoLEFlow(cfg.model).to(device)
    trainer = ContinualTrainer(model, Router(cfg.router), cfg, device)
    feats = random_features(cfg, n_images, torch.device("cpu"))
    _sync(device)
    start = time.perf_counter()
    report = trainer.learn_task("t0", feats, progress=False)
    _sync(device)
    seconds = time.perf_counter() - start
    out["learn"] = {
        "preset": "offline",
        "images": n_images,
        "epochs_run": run_epochs,
        "epochs_preset": epochs,
        "seconds_run": seconds,
        "seconds_for_preset_epochs": seconds * epochs / run_epochs,
        "extrapolated": run_epochs != epochs,
        "trainable_parameters": report.trainable_parameters,
    }
    return out
