"""Analytic FLOP count of the flow head (the denominator of ``head_efficiency``).

Convention: a multiply-add is 2 FLOPs; only matrix products and convolutions are counted (``2 * in *
out`` per patch for a linear, ``2 * r * (in + out)`` more for a LoRA adapter run separately, ``2 * k * k
* C`` per patch for a depthwise convolution). Biases, activations, tanh/exp, LayerNorm, permutations,
log-det sums and patch scores are ignored: O(D) per patch per layer, a few percent of the O(D^2) matmuls
at D = 768 (more at small D). ``torch.utils.flop_counter.FlopCounterMode`` counts the same way; the
tests compare the two.
"""

from __future__ import annotations

from moleflow.config import ModelConfig


def _linear(n_in: int, n_out: int, lora_rank: int | None = None) -> int:
    flops = 2 * n_in * n_out
    if lora_rank:
        flops += 2 * lora_rank * (n_in + n_out)
    return flops


def head_flops(
    cfg: ModelConfig, grid: tuple[int, int] = (14, 14), context_dim: int | None = None, with_lora: bool = True
) -> int:
    """Analytic matmul + convolution FLOPs of one image through the head (``MoLEFlow.forward``).

    See the module docstring for the convention. ``with_lora=True`` counts every LoRA adapter as its
    own two low-rank matmuls, as training with a frozen base runs them (the first task, base trainable,
    folds them into the weight per call instead: ``out * in * rank`` multiply-adds per layer and batch, not
    per patch, not counted); ``False`` counts the deployed head, where inference (eval mode, no autograd)
    runs each adapter folded into its base weight.
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
