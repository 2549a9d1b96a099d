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
   ``head_bound``: what bounds the head (offline, v5): every aten operator of one inference pass timed
   and its bytes read + written counted (``moleflow.perf.traffic``): the matmuls' share of the time and
   their FLOP rate against the ceiling, the other operators' rate against this machine's rate for passes
   over tensors of that size, bytes per FLOP, and the roofline bound of unfused execution.
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
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moleflow.perf.flops import head_flops
from moleflow.perf.optimizations import run_optimizations
from moleflow.perf.report import to_markdown
from moleflow.perf.sections import (
    PRESET_NAMES,
    bench_end_to_end,
    bench_head,
    bench_head_bound,
    bench_per_task,
    bench_routing,
    bench_train,
)
from moleflow.perf.timing import environment, measure_ceiling, peak_memory, resolve_device


def run_bench(
    quick: bool, device: str = "auto", log: Callable[[str], None] | None = None, compile_head: bool = False
) -> dict:
    """Run every section; returns a JSON-safe dict (see the module docstring)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    gpu = dev.type == "cuda"
    batch = 8 if quick else (256 if gpu else 32)  # a GPU needs large batches to fill
    e2e_batches = (1, 8) if quick else ((1, 256) if gpu else (1, 32, 64))
    reps = 2 if quick else 10
    train_batch = 4 if quick else (128 if gpu else 32)  # quick: a D=768 training step is ~150 GFLOP at batch 8
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
    result["head_bound"] = section(
        "head_bound", lambda: [bench_head_bound(n, dev, batch, ceiling) for n in ("offline", "v5")]
    )
    result["train"] = section("train", lambda: [bench_train(n, dev, train_batch, ceiling, reps) for n in PRESET_NAMES])
    result["end_to_end"] = section("end_to_end", lambda: bench_end_to_end(dev, e2e_batches, 2 if quick else 5))
    routed_ms = {
        e["batch"]: e["ms_per_image"]
        for e in result["end_to_end"]
        if e["backbone"] == "efficientnet_lite2" and e["status"] == "ok"
    }
    result["routing"] = section("routing", lambda: bench_routing(dev, quick, routed_ms))
    result["per_task"] = section("per_task", lambda: bench_per_task(dev, quick, train_rows=result["train"]))
    result["optimizations"] = section("optimizations", lambda: run_optimizations(dev, quick, compile_head))
    result["memory"] = peak_memory(dev)
    result["section_seconds"] = sections
    result["total_seconds"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moleflow bench", description="Measure MoLE-Flow throughput and cost.")
    parser.add_argument("--quick", action="store_true", help="small batches and few repetitions (< 2 min on CPU)")
    parser.add_argument("--json", type=Path, help="write the raw result as JSON")
    parser.add_argument("--markdown", type=Path, help="write the report as Markdown")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--compile", action="store_true", help="also time the head and backbone compiled (slow to build)")
    args = parser.parse_args(argv)
    result = run_bench(args.quick, args.device, compile_head=args.compile)
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
