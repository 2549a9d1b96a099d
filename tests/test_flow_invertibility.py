"""Exact invertibility of every invertible part of the flow, in float64 with perturbed parameters.

All parameters (including the zero-initialised LoRA ``B`` matrices, task biases and DIA output layers)
get small random noise first, so every map is a non-trivial bijection and not the identity.
"""

from __future__ import annotations

import pytest
import torch

from moleflow.flow.coupling import AllInOneCoupling, CouplingFlow, random_permutation
from moleflow.flow.dia import DeepInvertibleAdapter, DIACoupling
from moleflow.flow.lora import LoRALinear
from moleflow.flow.model import MoLEFlow
from moleflow.flow.subnets import subnet_factory
from tests.helpers import build_perturbed_model as build_model
from tests.helpers import perturb, small_model_cfg

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
B, H, W = 2, 3, 4
CTX = 6
TASKS = ("t0", "t1")
PRESETS = ("v5", "paper", "offline")


def add_task_to_loras(module: torch.nn.Module, task: str) -> None:
    for m in module.modules():
        if isinstance(m, LoRALinear):
            m.add_task(task)


def build_coupling(subnet: str, dim: int, seed: int = 0) -> AllInOneCoupling:
    torch.manual_seed(seed)
    fcfg = small_model_cfg("v5", extra=(f"model.flow.subnet={subnet}",)).flow
    block = AllInOneCoupling(dim, subnet_factory(fcfg), clamp=fcfg.clamp, permutation=random_permutation(dim, seed + 3))
    add_task_to_loras(block, "t")
    block.double()
    perturb(block, seed=seed + 1)
    return block


def model_inputs(model: MoLEFlow, seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    patches = torch.randn(B, H, W, model.dim, generator=gen, dtype=F64)
    context = torch.randn(B, H, W, CTX, generator=gen, dtype=F64) if model.scale_context is not None else None
    return patches, context


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def assert_roundtrip(x, x_rec, ld_fwd, ld_inv) -> None:
    err = rel_err(x_rec, x)
    assert err < 1e-4
    assert err < 1e-10, f"float64 round trip error {err:.3e}"
    assert ld_inv.shape == ld_fwd.shape
    torch.testing.assert_close(ld_inv, -ld_fwd, rtol=0, atol=1e-10)


def randn(*shape, seed: int = 5) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# --------------------------------------------------------------------------- single blocks


@pytest.mark.parametrize("task", [None, "t"])
@pytest.mark.parametrize("dim", [7, 8, 12])
@pytest.mark.parametrize("subnet", ["mlp", "context"])
def test_all_in_one_coupling_roundtrip(subnet: str, dim: int, task) -> None:
    block = build_coupling(subnet, dim)
    x = randn(B, H, W, dim)
    y, ld = block(x, task)
    assert y.shape == x.shape and ld.shape == (B, H, W)
    # non-trivial: the log-scales vary from patch to patch and y is not a pure permutation of x
    assert ld.std() > 1e-4
    assert not torch.allclose(y, x[..., block.perm], atol=1e-3)
    x_rec, ld_inv = block.inverse(y, task)
    assert_roundtrip(x, x_rec, ld, ld_inv)
    # and the other way round: forward(inverse(y)) == y
    y2 = randn(B, H, W, dim, seed=11)
    x2, ld2_inv = block.inverse(y2, task)
    y2_rec, ld2 = block(x2, task)
    assert_roundtrip(y2, y2_rec, ld2, ld2_inv)


def test_coupling_rejects_non_permutation() -> None:
    fcfg = small_model_cfg("v5").flow
    with pytest.raises(ValueError):
        AllInOneCoupling(4, subnet_factory(fcfg), clamp=1.9, permutation=torch.tensor([0, 0, 1, 2]))


@pytest.mark.parametrize("passive_first", [True, False])
@pytest.mark.parametrize("dim", [8, 12])
def test_dia_coupling_roundtrip(dim: int, passive_first: bool) -> None:
    torch.manual_seed(0)
    block = DIACoupling(dim, hidden=dim // 2, clamp=1.9, passive_first=passive_first).double()
    x = randn(B, H, W, dim)
    y0, ld0 = block(x)
    assert torch.equal(y0, x) and torch.equal(ld0, torch.zeros_like(ld0))  # zero-initialised = identity
    perturb(block, std=0.3)
    y, ld = block(x)
    assert ld.abs().max() > 1e-3
    half = dim // 2
    passive = slice(0, half) if passive_first else slice(half, dim)
    assert torch.equal(y[..., passive], x[..., passive])
    x_rec, ld_inv = block.inverse(y)
    assert_roundtrip(x, x_rec, ld, ld_inv)


@pytest.mark.parametrize("dim", [8, 12])
def test_deep_invertible_adapter_roundtrip(dim: int) -> None:
    torch.manual_seed(0)
    dia_cfg = small_model_cfg("v5", dim=dim).dia
    dia = DeepInvertibleAdapter(dim, dia_cfg).double()
    assert len(dia.blocks) == dia_cfg.blocks
    perturb(dia, std=0.3)
    x = randn(B, H, W, dim)
    y, ld = dia(x)
    assert ld.abs().max() > 1e-3
    x_rec, ld_inv = dia.inverse(y)
    assert_roundtrip(x, x_rec, ld, ld_inv)


def test_deep_invertible_adapter_rejects_odd_dim() -> None:
    with pytest.raises(ValueError):
        DeepInvertibleAdapter(7, small_model_cfg("v5").dia)


@pytest.mark.parametrize("subnet", ["mlp", "context"])
def test_coupling_flow_roundtrip(subnet: str) -> None:
    flow = CouplingFlow([build_coupling(subnet, 8, seed=s) for s in range(4)])
    x = randn(B, H, W, 8)
    for task in (None, "t"):
        z, ld = flow(x, task)
        # the flow's log-det is the sum of the blocks'
        h, total = x, torch.zeros(B, H, W, dtype=F64)
        for block in flow.blocks:
            h, ld_k = block(h, task)
            total = total + ld_k
        assert torch.equal(z, h)
        torch.testing.assert_close(ld, total, rtol=0, atol=1e-12)
        x_rec, ld_inv = flow.inverse(z, task)
        assert_roundtrip(x, x_rec, ld, ld_inv)


# --------------------------------------------------------------------------- whole model


@pytest.mark.parametrize("name", PRESETS)
def test_moleflow_blocks_individually_invertible(name: str) -> None:
    model = build_model(name)
    x = randn(B, H, W, model.dim)
    for task in (*TASKS, None):
        for block in model.flow.blocks:
            y, ld = block(x, task)
            x_rec, ld_inv = block.inverse(y, task)
            assert_roundtrip(x, x_rec, ld, ld_inv)
    for task in TASKS:
        for block in model.dia[task].blocks:
            y, ld = block(x)
            x_rec, ld_inv = block.inverse(y)
            assert_roundtrip(x, x_rec, ld, ld_inv)


@pytest.mark.parametrize("name", PRESETS)
def test_moleflow_roundtrip(name: str) -> None:
    model = build_model(name)
    patches, context = model_inputs(model)
    for task in TASKS:
        out = model(patches, task, context)
        assert out.z.shape == patches.shape and out.logdet.shape == (B, H, W)
        f3 = model.adapt(model.prepare(patches, context), task)
        f3_rec, ld_inv = model.inverse(out.z, task)
        assert_roundtrip(f3, f3_rec, out.logdet, ld_inv)
        # z_base is the latent between flow and DIA
        z0, _ = model.flow(f3, task)
        assert torch.equal(out.z_base, z0)
        zb_rec, _ = model.flow.inverse(out.z_base, task)
        assert rel_err(zb_rec, f3) < 1e-10
    # tasks differ (perturbed LoRA/DIA/whitening), so the test is not vacuous
    assert not torch.allclose(model(patches, TASKS[0], context).z, model(patches, TASKS[1], context).z)


def test_paper_model_requires_context() -> None:
    cfg = small_model_cfg("paper")
    with pytest.raises(ValueError):
        MoLEFlow(cfg)
    model = build_model("paper")
    patches, _ = model_inputs(model)
    with pytest.raises(ValueError):
        model(patches, TASKS[0])
