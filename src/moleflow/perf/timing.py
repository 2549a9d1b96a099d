"""Timing, the machine's matmul ceiling, environment and peak memory for ``moleflow bench``."""

from __future__ import annotations

import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int = 1, reps: int = 3, best: bool = False) -> float:
    """Median (``best``: minimum) wall seconds of ``fn()`` over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times) if best else statistics.median(times)


def working_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _matmul_rate(size: int, device: torch.device, dtype: torch.dtype, reps: int, warmup: int) -> tuple[float, float]:
    """(best seconds, FLOP/s) of a ``size x size @ size x size`` matmul into a preallocated output."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    seconds = time_fn(lambda: torch.mm(a, b, out=out), device, warmup, reps, best=True)
    return seconds, 2 * size**3 / seconds


def measure_ceiling(
    device: torch.device | str = "cpu", sizes: tuple[int, ...] | None = None, reps: int = 5, warmup: int = 2
) -> dict:
    """The machine's practical matmul peak in the working dtype: the best FLOP/s over square sizes.

    Best-of-``reps`` per size and the maximum over sizes, so that the ceiling is what the hardware
    demonstrably reaches (a median or a single size under-states it on a busy or turbo-clocked
    machine, and then efficiencies above 100 % appear).
    """
    device = torch.device(device)
    sizes = sizes or ((4096, 8192) if device.type == "cuda" else (1024, 2048, 4096))
    dtype = working_dtype(device)
    rates = {size: _matmul_rate(size, device, dtype, reps, warmup) for size in sizes}
    size = max(rates, key=lambda s: rates[s][1])
    return {
        "size": size,
        "dtype": str(dtype).replace("torch.", ""),
        "seconds": rates[size][0],
        "flops_per_s": rates[size][1],
        "by_size": {str(s): r[1] for s, r in rates.items()},
    }


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
