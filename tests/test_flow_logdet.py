"""Reported log-determinants against autograd Jacobians, and equivalence with FrEIA's AllInOneBlock.

Everything runs in float64 with perturbed parameters (zero-initialised LoRA B / DIA output layers
included), so the maps are non-trivial.
"""

from __future__ import annotations

import FrEIA.modules as Fm
import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

from moleflow.flow.coupling import AllInOneCoupling, random_permutation
from moleflow.flow.dia import DeepInvertibleAdapter, DIACoupling
from moleflow.flow.lora import LoRALinear
from moleflow.flow.model import MoLEFlow
from moleflow.flow.subnets import subnet_factory
from tests.helpers import build_perturbed_model as build_model
from tests.helpers import perturb, small_model_cfg

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
CTX = 6
TASKS = ("t0", "t1")


def build_coupling(subnet: str, dim: int, seed: int = 0) -> AllInOneCoupling:
    torch.manual_seed(seed)
    fcfg = small_model_cfg("v5", extra=(f"model.flow.subnet={subnet}",)).flow
    block = AllInOneCoupling(dim, subnet_factory(fcfg), clamp=fcfg.clamp, permutation=random_permutation(dim, seed + 3))
    for m in block.modules():
        if isinstance(m, LoRALinear):
            m.add_task("t")
    block.double()
    perturb(block, seed=seed + 1)
    return block


def randn(*shape, seed: int = 5) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def full_jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    """Jacobian of ``fn`` (shape-preserving) over the flattened input: ``(x.numel(), x.numel())``."""
    shape = x.shape
    return jacobian(lambda flat: fn(flat.view(shape)).reshape(-1), x.reshape(-1))


def check_per_patch(fn, x: torch.Tensor, logdet: torch.Tensor) -> None:
    """``fn`` acts patch by patch: off-diagonal blocks vanish, diagonal blocks' log|det| == logdet."""
    n, d = x[..., 0].numel(), x.shape[-1]
    jac = full_jacobian(fn, x).view(n, d, n, d)
    idx = torch.arange(n)
    blocks = jac[idx, :, idx, :]  # (n, d, d)
    off = jac.clone()
    off[idx, :, idx, :] = 0
    assert off.abs().max() == 0, "patches must not interact"
    _, logabsdet = torch.linalg.slogdet(blocks)
    torch.testing.assert_close(logabsdet, logdet.reshape(-1), rtol=0, atol=1e-10)
    assert logdet.std() > 1e-4  # non-trivial, varies over patches


def check_total(fn, x: torch.Tensor, logdet: torch.Tensor, expect_mixing: bool = True) -> None:
    """One image (B = 1): log|det| of the full Jacobian == sum over patches of the reported logdet."""
    assert x.shape[0] == 1
    n, d = x[..., 0].numel(), x.shape[-1]
    jac = full_jacobian(fn, x)
    _, logabsdet = torch.linalg.slogdet(jac)
    torch.testing.assert_close(logabsdet, logdet.sum(), rtol=0, atol=1e-10)
    if expect_mixing:  # the test is meaningful only if patches do interact
        j4 = jac.view(n, d, n, d).clone()
        idx = torch.arange(n)
        j4[idx, :, idx, :] = 0
        assert j4.abs().max() > 1e-6


# --------------------------------------------------------------------------- single parts


@pytest.mark.parametrize("task", [None, "t"])
@pytest.mark.parametrize("dim", [7, 8, 12])
def test_mlp_coupling_logdet_per_patch(dim: int, task) -> None:
    block = build_coupling("mlp", dim)
    x = randn(2, 3, 4, dim)
    _, ld = block(x, task)
    check_per_patch(lambda v: block(v, task)[0], x, ld)
    # the inverse's logdet is log|det| of the inverse map's Jacobian too
    y = randn(2, 3, 4, dim, seed=9)
    _, ld_inv = block.inverse(y, task)
    check_per_patch(lambda v: block.inverse(v, task)[0], y, ld_inv)


@pytest.mark.parametrize("task", [None, "t"])
def test_context_coupling_logdet_total(task) -> None:
    block = build_coupling("context", 8)
    x = randn(1, 2, 3, 8)
    _, ld = block(x, task)
    assert ld.shape == (1, 2, 3)
    check_total(lambda v: block(v, task)[0], x, ld)
    y = randn(1, 2, 3, 8, seed=9)
    _, ld_inv = block.inverse(y, task)
    check_total(lambda v: block.inverse(v, task)[0], y, ld_inv)


@pytest.mark.parametrize("passive_first", [True, False])
def test_dia_coupling_logdet_per_patch(passive_first: bool) -> None:
    torch.manual_seed(0)
    block = DIACoupling(8, hidden=4, clamp=1.9, passive_first=passive_first).double()
    perturb(block, std=0.3)
    x = randn(2, 3, 4, 8)
    _, ld = block(x)
    check_per_patch(lambda v: block(v)[0], x, ld)


def test_deep_invertible_adapter_logdet_per_patch() -> None:
    torch.manual_seed(0)
    dia = DeepInvertibleAdapter(12, small_model_cfg("v5", dim=12).dia).double()
    perturb(dia, std=0.3)
    x = randn(2, 3, 4, 12)
    _, ld = dia(x)
    check_per_patch(lambda v: dia(v)[0], x, ld)
    _, ld_inv = dia.inverse(x)
    check_per_patch(lambda v: dia.inverse(v)[0], x, ld_inv)


# --------------------------------------------------------------------------- the whole flow part of MoLEFlow


def _flow_part(model: MoLEFlow, task: str):
    def fn(f3: torch.Tensor) -> torch.Tensor:
        z0, _ = model.flow(f3, task)
        return model.dia[task](z0)[0]

    return fn


@pytest.mark.parametrize("name", ["v5", "offline"])
def test_moleflow_logdet_per_patch(name: str) -> None:
    model = build_model(name)
    patches = randn(2, 3, 4, model.dim)
    for task in TASKS:
        out = model(patches, task)
        f3 = model.adapt(model.prepare(patches), task)
        check_per_patch(_flow_part(model, task), f3, out.logdet)


def test_moleflow_paper_logdet_total() -> None:
    model = build_model("paper")
    patches, context = randn(1, 2, 3, model.dim), randn(1, 2, 3, CTX, seed=3)
    for task in TASKS:
        out = model(patches, task, context)
        f3 = model.adapt(model.prepare(patches, context), task)
        check_total(_flow_part(model, task), f3, out.logdet)
        # inverse's logdet likewise (Jacobian of the inverse at z)
        _, ld_inv = model.inverse(out.z, task)
        check_total(lambda z, t=task: model.inverse(z, t)[0], out.z, ld_inv)


# --------------------------------------------------------------------------- FrEIA equivalence


class _TaskSubnet(nn.Module):
    """FrEIA calls ``subnet(x)``; ours takes ``(x, task)``."""

    def __init__(self, subnet: nn.Module, task) -> None:
        super().__init__()
        self.inner = subnet
        self.task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x, self.task)


@pytest.mark.parametrize("task", [None, "t"])
@pytest.mark.parametrize("dim", [7, 8, 12])
def test_matches_freia_all_in_one_block(dim: int, task) -> None:
    ours = build_coupling("mlp", dim, seed=2)
    theirs = Fm.AllInOneBlock(
        [(dim,)],
        subnet_constructor=lambda c_in, c_out: _TaskSubnet(ours.subnet, task),
        affine_clamping=1.9,
        global_affine_type="SOFTPLUS",
        permute_soft=False,
    )
    ours.double()
    theirs.double()
    w = torch.zeros(dim, dim, dtype=F64)
    w[torch.arange(dim), ours.perm] = 1.0  # FrEIA: y = F.linear(x, w_perm), i.e. y_i = x_{perm[i]}
    with torch.no_grad():
        theirs.w_perm.copy_(w)
        theirs.w_perm_inv.copy_(w.T)
        theirs.global_scale.copy_(ours.global_scale.view(1, dim))
        theirs.global_offset.copy_(ours.global_offset.view(1, dim))
    assert ours.clamp == theirs.clamp == 1.9

    n = 10
    x = randn(n, dim)
    (y_f,), ld_f = theirs((x,), rev=False)
    y_o, ld_o = ours(x.view(n, 1, 1, dim), task)
    torch.testing.assert_close(y_o.view(n, dim), y_f, rtol=0, atol=1e-10)
    torch.testing.assert_close(ld_o.view(n), ld_f, rtol=0, atol=1e-10)
    assert ld_f.std() > 1e-4  # non-trivial

    z = randn(n, dim, seed=8)
    (x_f,), ld_rf = theirs((z,), rev=True)
    x_o, ld_ro = ours.inverse(z.view(n, 1, 1, dim), task)
    torch.testing.assert_close(x_o.view(n, dim), x_f, rtol=0, atol=1e-10)
    torch.testing.assert_close(ld_ro.view(n), ld_rf, rtol=0, atol=1e-10)
