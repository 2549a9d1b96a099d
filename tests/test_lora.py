"""LoRALinear: fresh tasks compute the base function exactly, merging, initialisation, scale."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moleflow.config import LoRAConfig, apply_overrides, preset
from moleflow.flow.lora import LoRALinear
from moleflow.flow.model import MoLEFlow
from tests.helpers import perturb

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


def randn(*shape, seed: int = 5) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def make_layer(in_f: int = 6, out_f: int = 5, **cfg) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(in_f, out_f, LoRAConfig(**{"rank": 3, "alpha": 2.0, **cfg})).double()
    return layer


def test_fresh_task_is_exactly_the_base() -> None:
    layer = make_layer()
    layer.add_task("old")
    perturb(layer)  # base and the old task's A, B, bias all non-zero
    layer.add_task("new")
    assert torch.equal(layer.lora_B["new"], torch.zeros(5, 3, dtype=F64))
    assert torch.equal(layer.task_bias["new"], torch.zeros(5, dtype=F64))
    assert layer.lora_A["new"].abs().max() > 0
    x = randn(2, 3, 4, 6)
    assert torch.equal(layer(x, "new"), layer(x, None))
    assert not torch.allclose(layer(x, "old"), layer(x, None))
    assert torch.equal(layer(x, None), F.linear(x, layer.base.weight, layer.base.bias))


def test_unknown_task_raises() -> None:
    layer = make_layer()
    with pytest.raises(KeyError):
        layer(randn(2, 6), "nope")


@pytest.mark.parametrize("task_bias", [True, False])
def test_merged_weight_matches_unmerged_forward(task_bias: bool) -> None:
    layer = make_layer(task_bias=task_bias)
    layer.add_task("t")
    perturb(layer)
    assert ("t" in layer.task_bias) == task_bias
    x = randn(7, 6)
    merged = F.linear(x, layer.merged_weight("t"), layer.effective_bias("t"))
    torch.testing.assert_close(merged, layer(x, "t"), rtol=0, atol=1e-12)
    expected_bias = layer.base.bias + (layer.task_bias["t"] if task_bias else 0)
    torch.testing.assert_close(layer.effective_bias("t"), expected_bias, rtol=0, atol=0)
    assert torch.equal(layer.effective_bias(None), layer.base.bias)


def test_scale_is_alpha_over_rank() -> None:
    layer = make_layer(rank=8, alpha=2.0)
    assert layer.scale == 0.25
    layer.add_task("t")
    perturb(layer)
    x = randn(4, 6)
    # the adapter's contribution is scale * B A x + b_t exactly
    delta = layer(x, "t") - layer(x, None)
    expected = 0.25 * x @ layer.lora_A["t"].T @ layer.lora_B["t"].T + layer.task_bias["t"]
    torch.testing.assert_close(delta, expected, rtol=0, atol=1e-12)
    assert make_layer(rank=64, alpha=64.0).scale == 1.0
    assert make_layer(rank=64, alpha=1.0).scale == 1.0 / 64


def test_normal_init_std_is_one_over_sqrt_rank() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(512, 8, LoRAConfig(rank=64, alpha=1.0, a_init="normal"))
    layer.add_task("t")
    a = layer.lora_A["t"]
    assert a.shape == (64, 512)
    std = a.std().item()
    assert abs(std - 1 / math.sqrt(64)) < 0.05 * (1 / math.sqrt(64))
    assert abs(a.mean().item()) < 0.01


def test_xavier_init_bound() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(512, 8, LoRAConfig(rank=64, alpha=1.0, a_init="xavier_uniform"))
    layer.add_task("t")
    a = layer.lora_A["t"]
    bound = math.sqrt(6.0 / (512 + 64))  # fan_in = 512, fan_out = rank
    assert a.abs().max().item() <= bound
    assert a.abs().max().item() > 0.99 * bound
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.05 * bound / math.sqrt(3)


def test_add_remove_task_containers() -> None:
    layer = make_layer()
    layer.add_task("a")
    layer.add_task("b")
    layer.remove_task("a")
    for container in (layer.lora_A, layer.lora_B, layer.task_bias):
        assert list(container) == ["b"]


def test_new_task_in_moleflow_computes_the_base_flow() -> None:
    torch.manual_seed(0)
    cfg = apply_overrides(
        preset("v5"), ["model.backbone.embed_dim=8", "model.flow.coupling_layers=3", "model.flow.lora.rank=4"]
    ).model
    model = MoLEFlow(cfg)
    model.add_task("old")
    model.double()
    perturb(model)
    model.add_task("new")  # created in float64 after the move
    assert model.dia["new"].blocks[0].out_layer.weight.dtype == F64
    patches = randn(2, 3, 4, 8)
    f3 = model.adapt(model.prepare(patches), "new")
    z_base, ld_base = model.flow(f3, None)  # the shared flow without any LoRA
    out = model(patches, "new")
    assert torch.equal(out.z_base, z_base)
    # the new DIA is exactly the identity
    z_dia, ld_dia = model.dia["new"](z_base)
    assert torch.equal(z_dia, z_base) and torch.equal(ld_dia, torch.zeros_like(ld_dia))
    assert torch.equal(out.z, z_base)
    assert torch.equal(out.logdet, ld_base)
    for layer in (m for m in model.modules() if isinstance(m, LoRALinear)):
        x = randn(3, layer.in_features, seed=2)
        assert torch.equal(layer(x, "new"), layer(x, None))
    # the old (perturbed) task does differ from the base
    f3_old = model.adapt(model.prepare(patches), "old")
    assert not torch.allclose(model.flow(f3_old, "old")[0], model.flow(f3_old, None)[0])


def _trained_layer() -> LoRALinear:
    layer = make_layer()
    layer.add_task("a")
    layer.add_task("b")
    perturb(layer, std=0.3)
    return layer


def _unmerged(layer: LoRALinear, x: torch.Tensor, task: str) -> torch.Tensor:
    """The training path: base matmul plus the separate low-rank matmuls."""
    low_rank = F.linear(F.linear(x, layer.lora_A[task]), layer.lora_B[task])
    return F.linear(x, layer.base.weight, layer.effective_bias(task)) + layer.scale * low_rank


def test_inference_uses_the_merged_weights_and_equals_the_training_path() -> None:
    layer = _trained_layer().eval()
    x = randn(4, 3, 6)
    with torch.inference_mode():
        merged = {t: layer(x, t) for t in ("a", "b")}
    assert set(layer._merged) == {"a", "b"}  # folded once per task
    for t in ("a", "b"):
        torch.testing.assert_close(merged[t], _unmerged(layer, x, t), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(merged["a"], merged["b"])


def test_merged_cache_is_not_used_while_training_or_with_autograd() -> None:
    layer = _trained_layer()
    x = randn(2, 6)
    with torch.no_grad():
        layer.train()(x, "a")
    layer.eval()(x, "a")  # autograd on
    assert layer._merged == {}


def test_merged_cache_follows_parameter_updates() -> None:
    layer = _trained_layer().eval()
    x = randn(3, 6)
    with torch.no_grad():
        before = layer(x, "a")
        layer.lora_B["a"].add_(0.5)  # in-place update in eval mode bumps the version counter
        after_copy = layer(x, "a")
    torch.testing.assert_close(after_copy, _unmerged(layer, x, "a"), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(before, after_copy)
    # optimisers may write through .data (no version bump); they run in train mode, which drops the cache
    layer.train()
    layer.lora_A["a"].data.mul_(2.0)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x, "a"), _unmerged(layer, x, "a"), rtol=1e-12, atol=1e-12)


def test_training_after_inference_mode_still_backpropagates() -> None:
    cfg = apply_overrides(preset("offline"), ["model.backbone.embed_dim=8", "model.flow.lora.rank=2"]).model
    model = MoLEFlow(cfg).double().eval()
    model.add_task("t")
    x = randn(2, 3, 3, 8)
    with torch.inference_mode():
        model(x, "t")  # caches the positional encoding and merged weights
    model.train()
    out = model(x, "t")
    (out.z.pow(2).sum() - out.logdet.sum()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_merged_weights_are_folded_in_full_precision_under_autocast() -> None:
    layer = _trained_layer().float().eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(randn(2, 6).float(), "a")
    weight, _ = layer._merged["a"][1:]
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, layer.merged_weight("a").detach(), rtol=0, atol=0)


@pytest.mark.parametrize("train_base", [True, False])
def test_both_training_paths_give_the_low_rank_outputs_and_gradients(train_base: bool) -> None:
    """Base trainable: one matmul with ``W + scale B A`` formed per call; frozen: ``addmm`` of the low-rank
    term onto ``W x + b``. Either must give ``W x + b + b_t + scale B (A x)`` and its gradients."""
    layer = _trained_layer().train()
    for p in layer.parameters():
        p.requires_grad_(False)
    trainable = [layer.lora_A["a"], layer.lora_B["a"], layer.task_bias["a"]]
    if train_base:
        trainable += [layer.base.weight, layer.base.bias]
    for p in trainable:
        p.requires_grad_(True)
    x, g = randn(2, 3, 6), randn(2, 3, 5, seed=6)
    grads = {}
    for name, fn in (("layer", lambda: layer(x, "a")), ("by hand", lambda: _unmerged(layer, x, "a"))):
        out = fn()
        grads[name] = (out, torch.autograd.grad(out, trainable, g))
    torch.testing.assert_close(grads["layer"][0], grads["by hand"][0], rtol=1e-12, atol=1e-12)
    for got, want in zip(grads["layer"][1], grads["by hand"][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
