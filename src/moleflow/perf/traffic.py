"""What bounds a workload on this machine: bytes moved per FLOP against the machine's bytes per FLOP.

``operator_traffic(fn)`` runs ``fn`` once under a ``TorchDispatchMode`` and adds up, for every aten
operator that runs, the bytes of the tensors it reads (inputs) and writes (outputs). That is what an
unfused, eager execution moves through the memory hierarchy: each elementwise op reads its operands and
writes its result once, so ``tanh(a) * b + c`` costs 3 passes where a fused kernel would cost one. FLOPs
come from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions, 2 per multiply-add:
the convention of ``moleflow.perf.flops``).

``stream_rate(nbytes)`` is the machine's rate for such passes: a ``b = a * s + b``-style pass over
float32 tensors of the workload's size (so that they sit in the cache level the workload uses), in bytes
read + written per second.

Roofline: with ``I = FLOPs / bytes`` (the workload's arithmetic intensity) and ``B`` the pass rate, the
FLOP rate cannot exceed ``min(ceiling, I * B)``; ``bound_efficiency = I * B / ceiling`` is the largest
``head_efficiency`` unfused eager execution allows. Views and metadata ops move nothing and are skipped.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

#: aten ops that allocate without writing or only read metadata: no pass over memory. Views (``view``,
#: ``permute``, ``split``, ...) need no entry: their result shares an input's memory (``_aliases``).
_FREE = {"empty", "empty_like", "new_empty", "sym_size", "sym_stride", "is_same_size"}


#: aten ops that do the FLOPs FlopCounterMode counts.
MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "_convolution", "linear", "matmul"}


def _nbytes(values: Any) -> int:
    flat, _ = tree_flatten(values)
    return sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))


def _storages(values: Any) -> set[int]:
    flat, _ = tree_flatten(values)
    return {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor) and t.numel()}


def _aliases(out: Any, inputs: Any, name: str) -> bool:
    """An out-of-place op whose result shares an input's memory (``to`` the same dtype, a view): no pass."""
    return not name.endswith("_") and bool(_storages(out)) and _storages(out) <= _storages(inputs)


class _TrafficMode(TorchDispatchMode):
    """Bytes, calls and (CPU, synchronous) seconds per aten operator."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes_by_op: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001  (torch's protocol)
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        name = func.overloadpacket.__name__
        if name not in _FREE and not _aliases(out, (args, kwargs), name):
            self.bytes_by_op[name] += _nbytes((args, kwargs)) + _nbytes(out)
            self.calls[name] += 1
            self.seconds[name] += elapsed
        return out


def operator_traffic(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run ``fn`` once; FLOPs, bytes read + written by its operators, and the largest contributors."""
    mode = _TrafficMode()
    with FlopCounterMode(display=False) as flops, mode:
        fn()
    total, seconds = sum(mode.bytes_by_op.values()), sum(mode.seconds.values())
    matmul_seconds = sum(v for k, v in mode.seconds.items() if k in MATMUL_OPS)
    matmul_bytes = sum(v for k, v in mode.bytes_by_op.items() if k in MATMUL_OPS)
    other_seconds = seconds - matmul_seconds
    n_flops = int(flops.get_total_flops())
    return {
        "flops": n_flops,
        "bytes": int(total),
        "bytes_per_flop": total / max(1, n_flops),
        "operator_calls": int(sum(mode.calls.values())),
        "seconds": seconds,
        "matmul_time_share": matmul_seconds / seconds if seconds else float("nan"),
        "matmul_flops_per_s": n_flops / matmul_seconds if matmul_seconds else float("nan"),
        "other_bytes_per_s": (total - matmul_bytes) / other_seconds if other_seconds > 0 else float("nan"),
        "top_operators": [
            {"op": op, "time_share": t / seconds, "bytes_share": mode.bytes_by_op[op] / max(1, total), "calls": n}
            for (op, t), n in ((item, mode.calls[item[0]]) for item in mode.seconds.most_common(8))
        ],
    }


def stream_rate(nbytes: int, device: torch.device, reps: int = 20) -> float:
    """Bytes read + written per second by ``b.mul_(s).add_(a)`` passes over float32 tensors of ``nbytes``."""
    n = max(1024, nbytes // 4)
    a = torch.rand(n, device=device)
    b = torch.rand(n, device=device)
    times = []
    for i in range(reps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        b.mul_(0.5).add_(a)  # two passes: read b, write b; read a and b, write b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 5 * 4 * n / min(times) if times else float("nan")  # best rate: the machine's capability, as the ceiling


def roofline(traffic: dict[str, Any], pass_rate: float, ceiling: float) -> dict[str, float]:
    """The bound unfused execution puts on a workload: attainable FLOP/s and its share of the ceiling."""
    intensity = traffic["flops"] / max(1, traffic["bytes"])
    attainable = min(ceiling, intensity * pass_rate)
    return {
        "flops_per_byte": intensity,
        "machine_flops_per_byte": ceiling / pass_rate,
        "pass_bytes_per_s": pass_rate,
        "attainable_flops_per_s": attainable,
        "bound_efficiency": attainable / ceiling,
    }


__all__ = ["operator_traffic", "roofline", "stream_rate"]
