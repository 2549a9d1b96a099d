"""The couplings' backward: split halves and the permutation's own adjoint give autograd's gradients exactly.

The reference functions below are the straightforward formulation (two slices of the last axis, a plain
``gather`` whose backward autograd derives); the modules compute the same functions with a ``split`` and a
permutation whose backward gathers by the inverse permutation. Values and gradients must agree bit for bit
(float32, so that no tolerance hides a wrong index).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moleflow.flow.coupling import AllInOneCoupling, permute_channels, random_permutation
from moleflow.flow.dia import DIACoupling
from moleflow.flow.subnets import subnet_factory
from tests.helpers import perturb, small_model_cfg

pytestmark = pytest.mark.usefixtures("single_thread")


def _coupling_reference(block: AllInOneCoupling, x: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    x1, x2 = x[..., : block.passive], x[..., block.passive :]
    a = 0.1 * block.subnet(x1, task)
    s = block.clamp * torch.tanh(a[..., : block.active])
    u = torch.cat([x1, x2 * torch.exp(s) + a[..., block.active :]], dim=-1)
    g = 0.1 * F.softplus(block.global_scale, beta=0.5)
    y = (u * g + block.global_offset).gather(-1, block.perm.expand(u.shape))
    return y, s.sum(dim=-1) + torch.log(g).sum()


def _dia_reference(block: DIACoupling, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = x[..., : block.half], x[..., block.half :]
    passive, active = (a, b) if block.passive_first else (b, a)
    out = block.out_layer(F.relu(block.hidden_layer(passive)))
    s = block.clamp * torch.tanh(out[..., : block.half] / block.clamp)
    moved = active * torch.exp(s) + out[..., block.half :]
    y = torch.cat([passive, moved] if block.passive_first else [moved, passive], dim=-1)
    return y, s.sum(dim=-1)


def _grads(fn, module: torch.nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """Outputs of ``fn(x)`` and the gradients of a random linear functional of them (input, then parameters)."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y, logdet = fn(x)
    gen = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=gen)).sum() + (logdet * torch.randn(logdet.shape, generator=gen)).sum()
    loss.backward()
    params = [p.grad for p in module.parameters() if p.grad is not None]
    return (y.detach(), logdet.detach(), x.grad, *params)


def test_permutation_backward_is_the_inverse_gather() -> None:
    perm = random_permutation(13, seed=2)
    x = torch.randn(2, 3, 13)
    grad = torch.randn(2, 3, 13)
    ours = x.clone().requires_grad_(True)
    permute_channels(ours, perm, torch.argsort(perm)).backward(grad)
    plain = x.clone().requires_grad_(True)
    plain.gather(-1, perm.expand(x.shape)).backward(grad)
    assert torch.equal(ours.grad, plain.grad)
    assert torch.equal(ours.grad[..., perm], grad)  # the adjoint puts each gradient back where its input was


@pytest.mark.parametrize("dim", [12, 13])  # odd: the passive half is the larger one
@pytest.mark.parametrize("subnet", ["mlp", "context"])
def test_coupling_matches_the_sliced_reference(dim: int, subnet: str) -> None:
    torch.manual_seed(0)
    fcfg = small_model_cfg("v5", extra=(f"model.flow.subnet={subnet}",)).flow
    block = AllInOneCoupling(dim, subnet_factory(fcfg), clamp=fcfg.clamp, permutation=random_permutation(dim, 3))
    for m in block.modules():
        if hasattr(m, "add_task") and m is not block:
            m.add_task("t")
    perturb(block, seed=1)
    x = torch.randn(2, 3, 4, dim)
    ours = _grads(lambda v: block(v, "t"), block, x, seed=5)
    reference = _grads(lambda v: _coupling_reference(block, v, "t"), block, x, seed=5)
    assert len(ours) == len(reference) > 3
    for a, b in zip(ours, reference, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("passive_first", [True, False])
def test_dia_coupling_matches_the_sliced_reference(passive_first: bool) -> None:
    torch.manual_seed(0)
    block = DIACoupling(12, 6, clamp=1.9, passive_first=passive_first)
    perturb(block, seed=1)
    x = torch.randn(2, 3, 4, 12)
    ours = _grads(block, block, x, seed=5)
    reference = _grads(lambda v: _dia_reference(block, v), block, x, seed=5)
    for a, b in zip(ours, reference, strict=True):
        assert torch.equal(a, b)
