"""Before/after pairs for each speed-up, measured in the same process on the same inputs.

Each entry times the path the code used to take ("before") and the one it takes now ("after") and
reports ``speedup = before / after``, plus, where the two compute the same thing, the largest
difference of their outputs (the speed-up must not change results beyond float rounding).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moleflow.config import apply_overrides, preset
from moleflow.perf.sections import (
    InferenceOptions,
    _e2e_pass,
    build_head,
    e2e_setup,
    random_features,
    random_images,
    synthetic_router,
)
from moleflow.perf.timing import time_fn


def _pair(name: str, before: str, after: str, t_before: float, t_after: float, **extra: Any) -> dict:
    return {
        "change": name,
        "before": before,
        "after": after,
        "before_ms": 1e3 * t_before,
        "after_ms": 1e3 * t_after,
        "speedup": t_before / t_after,
        **extra,
    }


def head_deployment(preset_name: str, device: torch.device, batch: int, reps: int) -> list[dict]:
    """Flow head inference: autograd on -> no_grad with separate adapters -> inference_mode, merged LoRA."""
    from moleflow.scoring import patch_scores

    cfg = preset(preset_name)
    model = build_head(cfg, device)
    for p in model.parameters():  # a trained task: non-zero adapters
        p.data.add_(0.01 * torch.randn_like(p))
    feats = random_features(cfg, batch, device)

    def run(grad: bool, merged: bool) -> torch.Tensor:
        model.train(not merged)  # train mode never merges (see flow/lora.py); the head has no dropout/BN
        with torch.set_grad_enabled(grad), torch.inference_mode(not grad and merged):
            out = model(feats.patches, "t0", feats.context)
            return patch_scores(out.z, out.logdet).detach()

    outputs = {key: run(*key) for key in ((True, False), (False, False), (False, True))}
    times = {key: time_fn(lambda key=key: run(*key), device, warmup=1, reps=reps) for key in outputs}
    diff = (outputs[(False, True)] - outputs[(False, False)]).abs().max().item()
    scale = outputs[(False, False)].abs().max().item()
    label = f"head inference, {preset_name} (batch {batch})"
    model.eval()
    return [
        _pair(f"{label}: no autograd", "autograd on", "no_grad", times[(True, False)], times[(False, False)]),
        _pair(
            f"{label}: merged LoRA",
            "no_grad, separate adapters",
            "inference_mode, W + scale*BA folded once",
            times[(False, False)],
            times[(False, True)],
            max_abs_diff=diff,
            max_rel_diff=diff / max(scale, 1e-30),
        ),
    ]


def mixed_batch_grouping(device: torch.device, batch: int, reps: int, tasks: int = 4) -> dict:
    """A routed batch over several tasks: one head call per image -> one call per routed task."""
    from moleflow.features.cache import CachedFeatures
    from moleflow.inference import score_features

    cfg = preset("offline")
    model = build_head(cfg, device, tasks=tasks)
    router, _ = synthetic_router(cfg, cfg.model.backbone.embed_dim, tasks, device)
    feats = random_features(cfg, batch, device)
    assign = torch.arange(batch, device=device) % tasks

    def per_image() -> torch.Tensor:
        rows = [
            score_features(model, router, feats[i : i + 1], cfg.scoring, assign[i : i + 1]).patch_scores
            for i in range(batch)
        ]
        return torch.cat(rows)

    def grouped() -> torch.Tensor:
        return score_features(
            model, router, CachedFeatures(feats.patches, None, feats.pooled), cfg.scoring, assign
        ).patch_scores

    diff = (per_image() - grouped()).abs().max().item()
    return _pair(
        f"mixed batch of {batch} images over {tasks} tasks (offline head)",
        "one head call per image",
        "one head call per routed task",
        time_fn(per_image, device, warmup=1, reps=reps),
        time_fn(grouped, device, warmup=1, reps=reps),
        max_abs_diff=diff,
    )


def routing_index(device: torch.device, reps: int, tasks: int = 1000, dim: int = 168) -> dict:
    """One image routed among ``tasks`` prototypes: direct float64 einsum -> Cholesky index with bounds."""
    cfg = preset("offline")
    router, sample = synthetic_router(cfg, dim, tasks, device)
    router.index(device)
    queries = [sample(1) for _ in range(5)]
    direct = [router.distances(x).argmin(dim=1) for x in queries]
    agree = all(torch.equal(router.route(x), d) for x, d in zip(queries, direct, strict=True))
    t_direct = np.median([time_fn(lambda x=x: router.distances(x).argmin(dim=1), device, 1, reps) for x in queries])
    t_index = np.median([time_fn(lambda x=x: router.route(x), device, 1, reps) for x in queries])
    return _pair(
        f"routing 1 image among {tasks} tasks (G = {dim})",
        "float64 (x-mu)^T P (x-mu) over all tasks",
        "float32 Cholesky index, lower bound prunes",
        float(t_direct),
        float(t_index),
        same_decisions=agree,
    )


def channels_last_backbone(device: torch.device, batch: int, reps: int) -> dict:
    """End-to-end inference with the EfficientNet-Lite2 backbone: NCHW -> channels-last."""
    cfg = preset("offline")
    images = random_images(batch, cfg.model.backbone.image_size)
    times, maps = {}, {}
    for channels_last in (False, True):
        options = InferenceOptions(bf16=False, channels_last=channels_last)
        extractor, model, router = e2e_setup(cfg, device, options)
        maps[channels_last] = _e2e_pass(extractor, model, router, cfg, images, options)
        times[channels_last] = time_fn(
            lambda e=extractor, m=model, r=router, o=options: _e2e_pass(e, m, r, cfg, images, o), device, 1, reps
        )
    return _pair(
        f"end to end, efficientnet_lite2, batch {batch}",
        "NCHW",
        "channels-last",
        times[False],
        times[True],
        max_abs_diff=(maps[True] - maps[False]).abs().max().item(),
    )


def backbone_path(device: torch.device, batch: int, reps: int, precision: str = "fp32", compiled: bool = False) -> dict:
    """End-to-end inference, efficientnet_lite2: the backbone path as it was -> as it is.

    Before: the timm model with its BatchNorms, the whole batch in one call, the network run to its last
    layer (for an image feature the offline router does not use), maps by convolving full-size maps.
    After (``moleflow.features.extractor``): BatchNorms folded into the convolutions, micro-batches of
    ``CPU_BACKBONE_CHUNK`` on a CPU, the network stopped at the deepest selected layer, maps as one small
    matrix per axis (``moleflow.scoring.anomaly_maps``). Same head, router and images. ``precision="bf16"``:
    after also runs the backbone and the head in bf16 (``model.backbone.precision``, ``scoring.precision``),
    so the row's ratio is the old fp32 path against the bf16 one, and its difference bf16's. ``compiled``:
    after runs the backbone under ``torch.compile`` (``FeatureExtractor.compile_backbone``; compiled, and its
    compile time recorded, before the timing).
    """
    import torch.nn.functional as F

    from moleflow.features.backbones import create_backbone
    from moleflow.features.cache import CachedFeatures
    from moleflow.features.extractor import cnn_patches
    from moleflow.inference import score_features
    from moleflow.scoring import gaussian_blur

    old_cfg = preset("offline")
    cfg = apply_overrides(old_cfg, [f"model.backbone.precision={precision}", f"scoring.precision={precision}"])
    bcfg, size = cfg.model.backbone, cfg.model.backbone.image_size
    options = InferenceOptions(bf16=False, channels_last=True)
    extractor, model, router = e2e_setup(cfg, device, options)
    compile_s = None
    if compiled:
        extractor.compile_backbone()
        start = time.perf_counter()
        _e2e_pass(extractor, model, router, cfg, random_images(batch, bcfg.image_size), options)  # compiles its shapes
        compile_s = time.perf_counter() - start
    unfolded = create_backbone(bcfg.name, bcfg.layers, size, bcfg.pretrained).to(device, memory_format=torch.channels_last)
    images = random_images(batch, size)

    def before() -> torch.Tensor:
        with torch.inference_mode():
            x = extractor.preprocess(images).contiguous(memory_format=torch.channels_last)
            maps, pooled = unfolded(x)
            patches = cnn_patches(maps, extractor.grid, extractor.embed_dim, bcfg.local_aggregation)
            scored = score_features(model, router, CachedFeatures(patches, None, pooled), old_cfg.scoring)
            up = F.interpolate(scored.patch_scores[:, None], size=(size, size), mode="bilinear", align_corners=False)
            return gaussian_blur(up[:, 0], old_cfg.scoring.smoothing_sigma)

    def after() -> torch.Tensor:
        return _e2e_pass(extractor, model, router, cfg, images, options)

    old, new = before(), after()
    extra = {} if compile_s is None else {"compile_seconds": compile_s}
    return _pair(
        f"end to end, efficientnet_lite2, batch {batch}",
        "BatchNorm, one call, whole network, conv maps",
        "folded, micro-batches, stop at last layer used, matrix maps"
        + ("" if precision == "fp32" else f", {precision}")
        + (", backbone compiled" if compiled else ""),
        time_fn(before, device, 1, reps),
        time_fn(after, device, 1, reps),
        max_rel_diff=((old - new).abs().max() / (old.max() - old.min())).item(),
        **extra,
    )


def data_loading_workers(device: torch.device, n_images: int = 48, workers: int | None = None, side: int = 700) -> dict:
    """Feature extraction from PNG files: decoding in the main process -> in ``workers`` processes."""
    from PIL import Image

    from moleflow.data.base import FileSample
    from moleflow.features.cache import default_workers, extract_features
    from moleflow.features.extractor import FeatureExtractor

    workers = workers or max(1, default_workers())
    cfg = preset("offline")
    extractor = FeatureExtractor(cfg.model.backbone).to(device)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        samples = []
        for i in range(n_images):  # photo-sized files, so decoding and resizing cost what they do in practice
            path = Path(tmp) / f"{i:03d}.png"
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
            samples.append(FileSample(name=path.name, label=0, defect="good", image_path=path))

        def extract(num_workers: int):
            return extract_features(
                extractor, samples, need_context=False, batch_size=16, num_workers=num_workers, device=device, progress=False
            )

        reference = extract(0)
        t0 = time_fn(lambda: extract(0), device, warmup=0, reps=1)
        same = torch.equal(reference.patches, extract(workers).patches)  # also starts the workers once
        tw = time_fn(lambda: extract(workers), device, warmup=0, reps=1)
    return _pair(
        f"feature extraction of {n_images} PNG files ({side} x {side})",
        "decoding in the main process",
        f"{workers} DataLoader workers" + (", pinned memory" if device.type == "cuda" else ""),
        t0,
        tw,
        identical_features=same,
    )


def run_optimizations(device: torch.device, quick: bool, compile_head: bool = False) -> list[dict]:
    reps = 3 if quick else 10
    rows = []
    if compile_head:
        rows += [compiled_head(name, device, batch=8 if quick else 32, reps=reps) for name in ("offline", "v5")]
    for name in ("offline",) if quick else ("v5", "offline"):
        rows += head_deployment(name, device, batch=8 if quick else 32, reps=reps)
    rows.append(mixed_batch_grouping(device, batch=16 if quick else 32, reps=reps))
    rows.append(routing_index(device, reps=reps))
    rows.append(channels_last_backbone(device, batch=8, reps=2 if quick else 5))
    rows += [backbone_path(device, batch=b, reps=2 if quick else 5) for b in (1, 32)]
    rows.append(backbone_path(device, batch=32, reps=2 if quick else 5, precision="bf16"))
    if compile_head:  # `moleflow bench --compile`: compiling takes tens of seconds on a CPU
        rows += [backbone_path(device, batch=b, reps=2 if quick else 5, compiled=True) for b in (1, 32)]
    rows.append(data_loading_workers(device, n_images=32 if quick else 96))
    return rows


def compiled_head(preset_name: str, device: torch.device, batch: int, reps: int) -> dict:
    """Flow head inference: eager -> ``torch.compile`` (inductor fuses the elementwise coupling math).

    Optional (``moleflow bench --compile``): compiling takes tens of seconds on a CPU.
    """
    from moleflow.scoring import patch_scores

    cfg = preset(preset_name)
    model = build_head(cfg, device)
    feats = random_features(cfg, batch, device)

    def head(patches: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        out = model(patches, "t0", context)
        return patch_scores(out.z, out.logdet)

    compiled = torch.compile(head, dynamic=False)
    with torch.inference_mode():
        eager_out = head(feats.patches, feats.context)
        start = time.perf_counter()
        compiled_out = compiled(feats.patches, feats.context)
        compile_s = time.perf_counter() - start

    def run(fn):
        with torch.inference_mode():
            return fn(feats.patches, feats.context)

    return _pair(
        f"head inference, {preset_name} (batch {batch})",
        "eager",
        "torch.compile",
        time_fn(lambda: run(head), device, 1, reps),
        time_fn(lambda: run(compiled), device, 1, reps),
        max_abs_diff=(eager_out - compiled_out).abs().max().item(),
        compile_seconds=compile_s,
    )
