"""The measurements of ``moleflow bench``, one function per section (see ``moleflow.perf``)."""

from __future__ import annotations

import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moleflow.config import MoleFlowConfig, preset
from moleflow.perf.flops import head_flops
from moleflow.perf.timing import _free_memory, _sync, time_fn
from moleflow.training import router_dim

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


def bench_head_bound(name: str, device: torch.device, batch: int, ceiling: float) -> dict:
    """What bounds the head's inference: operator time split, bytes per FLOP, the roofline (``moleflow.perf.traffic``)."""
    from moleflow.perf.traffic import operator_traffic, roofline, stream_rate
    from moleflow.scoring import patch_scores

    cfg = preset(name)
    model = build_head(cfg, device)
    feats = random_features(cfg, batch, device)

    def step():
        with torch.inference_mode():
            out = model(feats.patches, "t0", feats.context)
            return patch_scores(out.z, out.logdet)

    step()  # warm-up: the merged weights are built on the first call
    traffic = operator_traffic(step)
    rate = stream_rate(feats.patches.numel() * 4, device)  # passes over tensors of the head's activation size
    bound = roofline(traffic, rate, ceiling)
    return {
        "preset": name,
        "batch": batch,
        **traffic,
        **bound,
        "matmul_efficiency": traffic["matmul_flops_per_s"] / ceiling,
        "other_pass_efficiency": traffic["other_bytes_per_s"] / rate,
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


def synthetic_router(
    cfg: MoleFlowConfig, dim: int, tasks: int, device: torch.device, seed: int = 0, rank: int = 8
) -> tuple[Any, Callable[[int], torch.Tensor]]:
    """A router with ``tasks`` prototypes shaped like real ones, and a sampler of in-distribution queries.

    Task t: mean ``mu_t ~ N(0, 4 I)``, covariance ``U_t U_t^T + 0.25 I`` with ``U_t (G, rank) ~ N(0, 1)``
    (a few directions of variation over a floor, as the OAS-shrunk covariance of real features); the
    precision is its exact inverse (Woodbury). ``sample(n)`` draws ``n`` images from random tasks.
    """
    from moleflow.routing import Router

    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    means = 2.0 * torch.randn(tasks, dim, generator=gen, dtype=f64)
    factors = torch.randn(tasks, dim, rank, generator=gen, dtype=f64)
    floor = 0.25
    inner = floor * torch.eye(rank, dtype=f64) + factors.transpose(1, 2) @ factors  # (T, r, r)
    precisions = (torch.eye(dim, dtype=f64) - factors @ torch.linalg.solve(inner, factors.transpose(1, 2))) / floor
    router = Router(cfg.router)
    router.tasks = [f"t{i}" for i in range(tasks)]
    router.means, router.precisions = means.to(device), (0.5 * (precisions + precisions.transpose(1, 2))).to(device)

    def sample(n: int) -> torch.Tensor:
        t = torch.randint(0, tasks, (n,), generator=gen)
        z = torch.randn(n, rank, 1, generator=gen, dtype=f64)
        x = means[t] + (factors[t] @ z)[..., 0] + floor**0.5 * torch.randn(n, dim, generator=gen, dtype=f64)
        return x.float().to(device)

    return router, sample


def _e2e_configs() -> list[tuple[str, MoleFlowConfig]]:
    lite0 = preset("offline")
    lite0.model.backbone.name = "efficientnet_lite0"
    lite0.model.backbone.embed_dim = 152  # lite0 blocks.2 + blocks.4 = 40 + 112 channels
    return [
        ("efficientnet_lite2", preset("offline")),
        ("efficientnet_lite2 (offline_fine)", preset("offline_fine")),
        ("efficientnet_lite0", lite0),
        ("vit_base_patch16_224 (v5)", preset("v5")),
        ("wide_resnet50_2 (paper)", preset("paper")),
    ]


@dataclass(frozen=True)
class InferenceOptions:
    """How end-to-end inference runs: bf16 autocast (GPU default) and the CNN memory layout."""

    bf16: bool = False
    channels_last: bool = True  # the FeatureExtractor's default for CNN backbones

    @classmethod
    def for_device(cls, device: torch.device) -> InferenceOptions:
        return cls(bf16=device.type == "cuda")

    def label(self) -> str:
        return ("bf16" if self.bf16 else "fp32") + ("" if self.channels_last else " NCHW")


def _e2e_pass(extractor, model, router, cfg: MoleFlowConfig, images, options: InferenceOptions):
    """uint8 images -> routed anomaly maps (B, S, S) through the production scoring path."""
    from moleflow.features.cache import CachedFeatures
    from moleflow.inference import score_features
    from moleflow.scoring import anomaly_maps

    device = extractor.mean.device
    size = cfg.model.backbone.image_size
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=options.bf16):
        f = extractor(extractor.preprocess(images))
        feats = CachedFeatures(f.patches.float(), None if f.context is None else f.context.float(), f.pooled.float())
        scored = score_features(model, router, feats, cfg.scoring)
        return anomaly_maps(scored.patch_scores.float(), (size, size), cfg.scoring.smoothing_sigma)


def e2e_setup(cfg: MoleFlowConfig, device: torch.device, options: InferenceOptions, tasks: int = 4):
    """(extractor, head with ``tasks`` tasks, router over them) for end-to-end timing."""
    from moleflow.features.extractor import extractor_for

    extractor = extractor_for(cfg).to(device)
    if extractor.backbone.kind == "cnn":
        extractor.set_memory_format(torch.channels_last if options.channels_last else torch.contiguous_format)
    model = build_head(cfg, device, tasks=tasks, context_dim=extractor.context_dim)
    router, _ = synthetic_router(cfg, router_dim(cfg, extractor.pooled_dim), tasks, device)
    return extractor, model, router


def random_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def bench_end_to_end(
    device: torch.device, batches: tuple[int, ...], reps: int, options: InferenceOptions | None = None
) -> list[dict]:
    from moleflow.features.backbones import BackboneUnavailableError, BackboneWeightsError

    options = options or InferenceOptions.for_device(device)
    rows = []
    for label, cfg in _e2e_configs():
        try:
            extractor, model, router = e2e_setup(cfg, device, options)
        except (BackboneUnavailableError, BackboneWeightsError) as e:
            rows.append({"backbone": label, "status": "unavailable", "reason": str(e).splitlines()[0][:200]})
            continue
        for batch in batches:
            images = random_images(batch, cfg.model.backbone.image_size)
            run = functools.partial(_e2e_pass, extractor, model, router, cfg, images, options)
            seconds = time_fn(run, device, warmup=1, reps=reps)
            rows.append(
                {
                    "backbone": label,
                    "status": "ok",
                    "precision": options.label(),
                    "batch": batch,
                    "images_per_s": batch / seconds,
                    "ms_per_image": 1e3 * seconds / batch,
                }
            )
    return rows


def bench_routing(
    device: torch.device,
    quick: bool,
    routed_ms: dict[int, float],
    task_counts=(1, 10, 100, 1000),
    dims=(168, 768),
) -> list[dict]:
    """Router time per image against the number of tasks, at batch 1 and at a large batch.

    ``routed_ms``: ms per image of routed end-to-end inference by batch size (the offline backbone),
    the denominator of ``share_of_inference``. ``direct_*``: the exhaustive float64 evaluation that the
    index replaces (the "before").
    """
    cfg = preset("offline")
    big = max(routed_ms)
    rows = []
    for dim in dims:
        for tasks in task_counts:
            nbytes = tasks * dim * dim * 8
            row: dict[str, Any] = {"dim": dim, "tasks": tasks, "precision_bytes": nbytes}
            if (quick and device.type == "cpu" and nbytes > 1e9) or 3 * nbytes > 0.5 * _free_memory(device):
                row["status"] = "skipped (quick mode on CPU)" if quick else "skipped (memory)"
                rows.append(row)
                continue
            router, sample = synthetic_router(cfg, dim, tasks, device)
            row.update(_time_routing(router, sample, device, quick, big, routed_ms))
            rows.append(row)
            del router
    return rows


def _time_routing(router, sample, device: torch.device, quick: bool, big: int, routed_ms: dict[int, float]) -> dict:
    start = time.perf_counter()
    index = router.index(device)
    build_s = time.perf_counter() - start
    singles = [sample(1) for _ in range(5 if quick else 20)]
    batch = sample(big)
    evaluated = [index.nearest(x)[1] for x in singles]
    reps = 3 if quick else 10

    def per_image(fn, queries) -> float:
        return statistics.median(time_fn(lambda x=x: fn(x), device, warmup=1, reps=reps) for x in queries)

    def direct(x: torch.Tensor) -> torch.Tensor:
        return router.distances(x).argmin(dim=1)

    t1, d1 = per_image(router.route, singles), per_image(direct, singles[:3])
    tb = time_fn(lambda: router.route(batch), device, warmup=1, reps=reps) / big
    db = time_fn(lambda: direct(batch), device, warmup=1, reps=reps) / big
    return {
        "status": "ok",
        "index_build_s": build_s,
        "ms_per_image": 1e3 * t1,
        "direct_ms_per_image": 1e3 * d1,
        "speedup": d1 / t1,
        "tasks_evaluated": statistics.mean(evaluated),
        "batch": big,
        "batch_ms_per_image": 1e3 * tb,
        "batch_direct_ms_per_image": 1e3 * db,
        "agrees_with_direct": bool(torch.equal(router.route(batch), direct(batch))),
        "share_of_inference": 1e3 * t1 / routed_ms[1] if 1 in routed_ms else None,
        "batch_share_of_inference": 1e3 * tb / routed_ms[big],
    }


def bench_per_task(device: torch.device, quick: bool, n_images: int = 300, train_rows: list[dict] | None = None) -> dict:
    """Per preset: a task's parameters and file size, and the time to learn ``n_images`` for the preset's
    epochs on cached features: measured for the offline preset (``--quick``: 1 epoch, extrapolated),
    estimated for the others from the training-step throughput in ``train_rows``."""
    from moleflow.analysis.growth import backbone_dims
    from moleflow.checkpoint import save_task, task_file
    from moleflow.routing import Router
    from moleflow.training import ContinualTrainer

    out: dict[str, Any] = {"presets": []}
    for name in PRESET_NAMES:
        cfg = preset(name)
        model = build_head(cfg, device, tasks=2)
        router_dim = backbone_dims(cfg)[1]
        router = Router(cfg.router)
        router.add("t1", torch.zeros(router_dim), torch.eye(router_dim))
        with tempfile.TemporaryDirectory() as tmp:
            size = save_task(model, router, cfg, "t1", task_file(Path(tmp), "t1"), "bench", "t1").stat().st_size
        counts = model.parameter_counts()
        train = next((t for t in train_rows or [] if t["preset"] == name), None)
        out["presets"].append(
            {
                "preset": name,
                "per_task_parameters": counts["per_task"]["t1"],
                "first_task_trainable": sum(p.numel() for ps in model.parameter_groups("t0", True).values() for p in ps),
                "base_parameters": counts["base"],
                "task_file_bytes": size,
                "epochs": cfg.train.epochs,
                "estimated_learn_seconds": n_images * cfg.train.epochs / train["images_per_s"] if train else None,
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
