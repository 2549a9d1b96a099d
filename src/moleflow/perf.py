"""``moleflow bench``: throughput, FLOP efficiency, routing cost, per-task cost and memory of MoLE-Flow.

What is measured (every timing is the median of several repetitions after warm-up; on CUDA each
repetition is bracketed by ``torch.cuda.synchronize``):

1. ``ceiling``: FLOP/s of one large square matmul in the working dtype (fp32 on CPU, bf16 on CUDA).
   It is the practical peak the head is compared against.
2. ``head``: the flow head per preset (features -> z, logdet, patch scores; DIA included) on random
   features at the preset's shape, under ``torch.inference_mode``. ``head_flops`` is an *analytic*
   count (:func:`head_flops`); ``head_efficiency = head_flops * images/s / ceiling``.
3. ``train``: one training step of the head (the trainer's objective, backward, gradient clipping,
   the preset's optimizer from :func:`moleflow.training.build_optimizer`), first task (base trains).
   Analytic cost = 3 x forward FLOPs (forward + backward w.r.t. activations and weights, the usual
   rule of thumb); ``train_efficiency`` = that x images/s / ceiling.
4. ``end_to_end``: uint8 images -> ``FeatureExtractor.preprocess`` -> backbone features -> router
   (a few random prototypes) -> head of the routed task(s) -> upsampled, smoothed anomaly maps.
   Backbones whose weights cannot be had offline are recorded as ``unavailable``.
5. ``routing``: router time per image against the number of learned tasks, and its ratio to the
   offline head's time per image.
6. ``per_task``: trainable parameters of a task, bytes of its safetensors file, wall time to learn a
   300-image task on cached features (``--quick``: 1 epoch, extrapolated to the preset's epochs).
7. ``memory``: peak resident set (CPU, ``ru_maxrss``) or peak allocated CUDA memory.

FLOP convention of :func:`head_flops`: a multiply-add is 2 FLOPs; only matrix products and
convolutions are counted (``2 * in * out`` per patch for a linear, ``2 * r * (in + out)`` more for a
LoRA adapter, ``2 * k * k * C`` per patch for a depthwise convolution). Biases, activations, tanh/exp,
LayerNorm, the permutations, the log-det sums and the patch scores are ignored: together they are
O(D) per patch per layer, a few percent of the O(D^2) matmuls at D = 768 (more at small D). This is
the same convention as ``torch.utils.flop_counter.FlopCounterMode``, which the tests compare against.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moleflow.config import ModelConfig, MoleFlowConfig, preset

PRESET_NAMES = ("paper", "v5", "offline")
PAPER_CONTEXT_DIM = 1536  # wide_resnet50_2 layer2 + layer3


# ----------------------------------------------------------------------------- analytic FLOPs


def _linear(n_in: int, n_out: int, lora_rank: int | None = None) -> int:
    flops = 2 * n_in * n_out
    if lora_rank:
        flops += 2 * lora_rank * (n_in + n_out)
    return flops


def head_flops(
    cfg: ModelConfig, grid: tuple[int, int] = (14, 14), context_dim: int | None = None, with_lora: bool = True
) -> int:
    """Analytic matmul + convolution FLOPs of one image through the head (``MoLEFlow.forward``).

    See the module docstring for the convention. ``with_lora=False`` counts the base function only
    (``task=None``); the model always runs a task, so the default counts the adapters.
    """
    d = cfg.backbone.embed_dim
    per_patch = 0
    if cfg.scale_context is not None:
        if not context_dim:
            raise ValueError("the scale context needs context_dim")
        k = cfg.scale_context.kernel_size
        per_patch += _linear(context_dim, d) + 2 * k * k * d
    if cfg.spatial_mixer is not None:
        k = cfg.spatial_mixer.kernel_size
        per_patch += 2 * k * k * d
    fcfg = cfg.flow
    rank = fcfg.lora.rank if with_lora else None
    passive, active = d - d // 2, d // 2
    hidden = max(1, round(fcfg.hidden_ratio * passive))
    if fcfg.subnet == "mlp":
        block = _linear(passive, hidden, rank) + _linear(hidden, 2 * active, rank)
    elif fcfg.subnet == "context":
        k = fcfg.context_kernel
        block = (
            2 * k * k * passive
            + _linear(2 * passive, hidden, rank)
            + _linear(hidden, active, rank)
            + _linear(passive, hidden, rank)
            + _linear(hidden, active, rank)
        )
    else:
        raise ValueError(f"unknown subnet {fcfg.subnet!r}")
    per_patch += fcfg.coupling_layers * block
    if cfg.dia is not None:
        half = d // 2
        dia_hidden = max(1, round(cfg.dia.hidden_ratio * d))
        per_patch += cfg.dia.blocks * (_linear(half, dia_hidden) + _linear(dia_hidden, 2 * half))
    return int(per_patch * grid[0] * grid[1])


# ----------------------------------------------------------------------------- timing helpers


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int = 1, reps: int = 3) -> float:
    """Median wall seconds of ``fn()`` over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def working_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def measure_ceiling(device: torch.device | str = "cpu", size: int | None = None, reps: int = 5, warmup: int = 2) -> dict:
    """FLOP/s of a ``size x size @ size x size`` matmul in the working dtype."""
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 2048)
    dtype = working_dtype(device)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    seconds = time_fn(lambda: a @ b, device, warmup, reps)
    flops = 2 * size**3
    return {"size": size, "dtype": str(dtype).replace("torch.", ""), "seconds": seconds, "flops_per_s": flops / seconds}


# ----------------------------------------------------------------------------- models and inputs


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


# ----------------------------------------------------------------------------- sections


def bench_head(name: str, device: torch.device, batch: int, ceiling: float, reps: int) -> dict:
    from moleflow.scoring import patch_scores

    cfg = preset(name)
    model = build_head(cfg, device)
    feats = random_features(cfg, batch, device)
    flops = head_flops(cfg.model, (14, 14), _context_dim(cfg))

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


# ----------------------------------------------------------------------------- environment, memory


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _free_memory(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 8e9


def environment(device: torch.device) -> dict:
    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu_model": _cpu_model(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    return env


def peak_memory(device: torch.device) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    out = {"cpu_max_rss_bytes": rss_bytes}
    if device.type == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


# ----------------------------------------------------------------------------- driver


def run_bench(quick: bool, device: str = "auto", log: Callable[[str], None] | None = None) -> dict:
    """Run every section; returns a JSON-safe dict (see the module docstring)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    batch = 8 if quick else 32
    reps = 2 if quick else 10
    train_batch = 4 if quick else 32  # quick: a D=768 training step is ~150 GFLOP at batch 8
    result: dict[str, Any] = {"quick": quick, "environment": environment(dev)}
    sections: dict[str, float] = {}

    def section(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        log(f"bench: {name} ...")
        value = fn()
        sections[name] = time.perf_counter() - t0
        return value

    result["ceiling"] = section("ceiling", lambda: measure_ceiling(dev, reps=5 if quick else 10))
    ceiling = result["ceiling"]["flops_per_s"]
    result["head"] = section("head", lambda: [bench_head(n, dev, batch, ceiling, reps) for n in PRESET_NAMES])
    result["train"] = section("train", lambda: [bench_train(n, dev, train_batch, ceiling, reps) for n in PRESET_NAMES])
    result["end_to_end"] = section("end_to_end", lambda: bench_end_to_end(dev, (1, 8 if quick else 64), 2 if quick else 5))
    offline_ms = next(h["ms_per_image"] for h in result["head"] if h["preset"] == "offline")
    result["routing"] = section("routing", lambda: bench_routing(dev, quick, offline_ms))
    result["per_task"] = section("per_task", lambda: bench_per_task(dev, quick))
    result["memory"] = peak_memory(dev)
    result["section_seconds"] = sections
    result["total_seconds"] = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------- report


def _si(x: float, unit: str = "") -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.2f} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def to_markdown(result: dict) -> str:
    """A human-readable report of a :func:`run_bench` result; sections missing from ``result`` are skipped."""
    lines = ["# moleflow bench" + (" (quick)" if result.get("quick") else ""), ""]
    env = result.get("environment", {})
    if env:
        lines += [", ".join(f"{k}: {v}" for k, v in env.items()), ""]
    ceil = result.get("ceiling")
    if ceil:
        lines += [
            "## Machine ceiling",
            "",
            f"{ceil['size']}x{ceil['size']} matmul in {ceil['dtype']}: **{_si(ceil['flops_per_s'], 'FLOP/s')}**",
            "",
        ]
    if result.get("head"):
        lines += ["## Flow head (inference, DIA + patch scores)", ""]
        lines += _table(
            ["preset", "D", "batch", "images/s", "ms/image", "FLOPs/image", "achieved", "efficiency"],
            [
                [
                    h["preset"],
                    h["embed_dim"],
                    h["batch"],
                    f"{h['images_per_s']:.1f}",
                    f"{h['ms_per_image']:.2f}",
                    _si(h["head_flops"]),
                    _si(h["achieved_flops_per_s"], "FLOP/s"),
                    f"{100 * h['head_efficiency']:.1f}%",
                ]
                for h in result["head"]
            ],
        )
    if result.get("train"):
        lines += ["## Training step of the head (first task, analytic cost = 3 x forward)", ""]
        lines += _table(
            ["preset", "optimizer", "batch", "steps/s", "images/s", "achieved", "efficiency"],
            [
                [
                    t["preset"],
                    t["optimizer"],
                    t["batch"],
                    f"{t['steps_per_s']:.2f}",
                    f"{t['images_per_s']:.1f}",
                    _si(t["achieved_flops_per_s"], "FLOP/s"),
                    f"{100 * t['train_efficiency']:.1f}%",
                ]
                for t in result["train"]
            ],
        )
    if result.get("end_to_end"):
        lines += ["## End to end (uint8 images -> anomaly maps)", ""]
        rows = []
        for e in result["end_to_end"]:
            if e.get("status") == "ok":
                rows.append([e["backbone"], e["batch"], f"{e['images_per_s']:.1f}", f"{e['ms_per_image']:.1f}"])
            else:
                rows.append([e["backbone"], "-", e.get("status", "?"), e.get("reason", "")])
        lines += _table(["backbone", "batch", "images/s", "ms/image"], rows)
    if result.get("routing"):
        lines += ["## Routing cost per image (batch 1, Mahalanobis, float64)", ""]
        rows = []
        for r in result["routing"]:
            if r.get("status") == "ok":
                rows.append(
                    [
                        r["dim"],
                        r["tasks"],
                        _si(r["precision_bytes"], "B"),
                        f"{r['ms_per_image']:.3f}",
                        f"{r['ratio_to_head']:.2f}",
                    ]
                )
            else:
                rows.append([r["dim"], r["tasks"], _si(r["precision_bytes"], "B"), r.get("status", "?"), "-"])
        lines += _table(["G", "tasks", "precisions", "ms/image", "/ offline head"], rows)
    per_task = result.get("per_task")
    if per_task:
        lines += ["## Per task", ""]
        lines += _table(
            ["preset", "per-task params", "task file", "first-task trainable", "base params"],
            [
                [
                    p["preset"],
                    f"{p['per_task_parameters']:,}",
                    _si(p["task_file_bytes"], "B"),
                    f"{p['first_task_trainable']:,}",
                    f"{p['base_parameters']:,}",
                ]
                for p in per_task.get("presets", [])
            ],
        )
        learn = per_task.get("learn")
        if learn:
            note = (
                f" (extrapolated from {learn['epochs_run']} epoch(s), {learn['seconds_run']:.1f} s)"
                if learn["extrapolated"]
                else ""
            )
            lines += [
                f"Learning a {learn['images']}-image task ({learn['preset']}, {learn['epochs_preset']} epochs, cached "
                f"features): **{learn['seconds_for_preset_epochs']:.0f} s**{note}",
                "",
            ]
    mem = result.get("memory")
    if mem:
        lines += ["## Peak memory", ""] + [f"- {k}: {_si(v, 'B')}" for k, v in mem.items()] + [""]
    if "total_seconds" in result:
        secs = ", ".join(f"{k} {v:.1f}s" for k, v in result.get("section_seconds", {}).items())
        lines += [f"Total: {result['total_seconds']:.1f} s ({secs})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moleflow bench", description="Measure MoLE-Flow throughput and cost.")
    parser.add_argument("--quick", action="store_true", help="small batches and few repetitions (< 2 min on CPU)")
    parser.add_argument("--json", type=Path, help="write the raw result as JSON")
    parser.add_argument("--markdown", type=Path, help="write the report as Markdown")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    args = parser.parse_args(argv)
    result = run_bench(args.quick, args.device)
    text = to_markdown(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    print(text)
    return 0


__all__ = ["head_flops", "measure_ceiling", "run_bench", "to_markdown", "main"]
