"""LoRA linear layer with per-task low-rank adapters and task biases (outline 3.4.1, notes component 5).

    h(x) = W x + b                      (shared base; trained on the first task, then frozen)
         + scale * B_t (A_t x) + b_t    (task t's adapter; B_t = 0 and b_t = 0 at creation)

``scale = alpha / rank``: the outline uses alpha = rank (scale 1), the v5 notes alpha = 1 (scale 1/rank).
Because ``B_t`` starts at zero, a freshly added task computes exactly the base function.

Per-task tensors live in ``ParameterDict``s keyed by task name (the peft layout), so generic code can
add, remove, freeze and save one task's tensors without touching the others.

Training: while the base is trainable (the first task) the layer runs one matmul with ``W + scale * B_t A_t``
formed per call (same function and gradients, fewer FLOPs than three matmuls over every patch); with the
base frozen it runs the low-rank path, whose backward touches only ``A_t`` and ``B_t``.

Deployment: in eval mode with autograd off (``torch.no_grad`` / ``torch.inference_mode``) a task's
adapter is folded once into ``W_t = W + scale * B_t A_t`` and ``b_t = b + task_bias_t`` (peft's
``merge``) and the layer runs one matmul instead of three. The folded pair is cached per task. The cache
is dropped whenever the layer is put in train mode (optimizers may write through ``param.data``, which
no version counter sees) and is keyed by the version counters of its source tensors, so an in-place
update in eval mode (``load_state_dict``, ``copy_`` under ``no_grad``) rebuilds it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moleflow.config import LoRAConfig


class LoRALinear(nn.Module):
    """A linear layer ``(..., in_features) -> (..., out_features)`` with per-task LoRA experts."""

    task_containers = ("lora_A", "lora_B", "task_bias")

    def __init__(self, in_features: int, out_features: int, cfg: LoRAConfig) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank = cfg.rank
        self.scale = cfg.alpha / cfg.rank
        self.a_init = cfg.a_init
        self.use_task_bias = cfg.task_bias
        self.base = nn.Linear(in_features, out_features)
        self.lora_A = nn.ParameterDict()  # task -> (rank, in_features)
        self.lora_B = nn.ParameterDict()  # task -> (out_features, rank)
        self.task_bias = nn.ParameterDict()  # task -> (out_features,)
        self._merged: dict[str, tuple[tuple, torch.Tensor, torch.Tensor]] = {}  # task -> (key, W_t, b_t)

    def add_task(self, task: str) -> None:
        weight = self.base.weight
        a = torch.empty(self.rank, self.in_features, device=weight.device, dtype=weight.dtype)
        if self.a_init == "xavier_uniform":
            nn.init.xavier_uniform_(a)
        else:  # N(0, 1/r), the outline's initialisation
            nn.init.normal_(a, std=1.0 / math.sqrt(self.rank))
        self.lora_A[task] = nn.Parameter(a)
        self.lora_B[task] = nn.Parameter(weight.new_zeros(self.out_features, self.rank))
        if self.use_task_bias:
            self.task_bias[task] = nn.Parameter(weight.new_zeros(self.out_features))

    def remove_task(self, task: str) -> None:
        self._merged.pop(task, None)
        for container in (self.lora_A, self.lora_B, self.task_bias):
            if task in container:
                del container[task]

    def train(self, mode: bool = True) -> LoRALinear:
        self._merged.clear()
        return super().train(mode)

    def effective_bias(self, task: str | None) -> torch.Tensor:
        if task is not None and task in self.task_bias:
            return self.base.bias + self.task_bias[task]
        return self.base.bias

    def merged_weight(self, task: str) -> torch.Tensor:
        """``W + scale * B_t A_t`` of shape ``(out_features, in_features)``, for deployment of one task."""
        return self.base.weight + self.scale * (self.lora_B[task] @ self.lora_A[task])

    def _merged_pair(self, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached ``(W_t (out, in), b_t (out,))`` for autograd-free inference."""
        sources = [self.base.weight, self.base.bias, self.lora_A[task], self.lora_B[task]]
        if task in self.task_bias:
            sources.append(self.task_bias[task])
        key = tuple((t._version, t.data_ptr(), t.device, t.dtype) for t in sources)
        cached = self._merged.get(task)
        if cached is None or cached[0] != key:
            # plain tensors (not inference tensors), so the cache also serves later no_grad calls; folded in
            # the weights' own precision even under autocast, so an fp32 call never sees bf16 rounding
            device_type = self.base.weight.device.type
            with torch.inference_mode(False), torch.no_grad(), torch.autocast(device_type, enabled=False):
                cached = (key, self.merged_weight(task).detach(), self.effective_bias(task).detach())
            self._merged[task] = cached
        return cached[1], cached[2]

    def forward(self, x: torch.Tensor, task: str | None) -> torch.Tensor:
        """``x (..., in) -> (..., out)``; ``task=None`` evaluates the base function alone."""
        if task is not None and task not in self.lora_A:
            raise KeyError(f"task {task!r} has no LoRA adapter here; known tasks: {list(self.lora_A)}")
        if task is not None and not self.training and not torch.is_grad_enabled():
            if torch.compiler.is_compiling():  # traced graphs fold per call (no per-patch cost), no cache guards
                return F.linear(x, self.merged_weight(task), self.effective_bias(task))
            return F.linear(x, *self._merged_pair(task))
        if task is None:
            return F.linear(x, self.base.weight, self.base.bias)
        if self.base.weight.requires_grad and torch.is_grad_enabled():
            # the first task trains W and its adapter together: one matmul with W + scale * B A (formed per call,
            # out * in * rank multiply-adds, rank / N of the layer's for N patches) instead of three; autograd
            # hands dW, dA, dB back. 1.17x (offline) and 1.24x (v5) per training step (benchmarks/head_ab.py)
            return F.linear(x, self.merged_weight(task), self.effective_bias(task))
        out = F.linear(x, self.base.weight, self.effective_bias(task))  # W frozen: backward only through A, B
        low_rank = F.linear(F.linear(x, self.lora_A[task]), self.lora_B[task])
        return out + self.scale * low_rank

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}"
