"""Task ownership of MoLEFlow's parameters, checkpoint split, task removal, adapters, positional encoding."""

from __future__ import annotations

import math

import pytest
import torch

from moleflow.config import WhiteningConfig
from moleflow.features.positional import positional_encoding_2d
from moleflow.flow.adapters import WhiteningAdapter
from moleflow.flow.model import MoLEFlow
from tests.helpers import build_perturbed_model as build_model

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
CTX = 6
PRESETS = ("v5", "paper", "offline")


def model_inputs(model: MoLEFlow, seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    patches = torch.randn(2, 3, 4, model.dim, generator=gen, dtype=F64)
    context = torch.randn(2, 3, 4, CTX, generator=gen, dtype=F64) if model.scale_context is not None else None
    return patches, context


def ids(params) -> set[int]:
    return {id(p) for p in params}


def named_ids(model: MoLEFlow, names: set[str]) -> set[int]:
    own = dict(model.named_parameters())
    return {id(own[n]) for n in names}


# --------------------------------------------------------------------------- ownership


@pytest.mark.parametrize("name", PRESETS)
def test_parameter_groups_contain_exactly_the_task(name: str) -> None:
    model = build_model(name, tasks=("t0", "t1", "t2"))
    all_names = {n for n, _ in model.named_parameters()}
    base = model.base_parameter_names()
    per_task = {t: model.task_parameter_names(t) for t in model.tasks}
    # a partition of all parameters
    assert base.isdisjoint(set().union(*per_task.values()))
    for a in model.tasks:
        for b in model.tasks:
            if a != b:
                assert per_task[a].isdisjoint(per_task[b])
        assert per_task[a] and all(f".{a}" in n for n in per_task[a])
    assert base | set().union(*per_task.values()) == all_names

    for task in model.tasks:
        groups = model.parameter_groups(task, train_base=False)
        flat = [p for ps in groups.values() for p in ps]
        assert len(flat) == len(ids(flat))  # no parameter twice
        assert ids(flat) == named_ids(model, per_task[task])
        assert "base" not in groups
        assert set(groups) <= {"lora", "whitening", "dia", "mixer"}
        with_base = model.parameter_groups(task, train_base=True)
        flat_b = [p for ps in with_base.values() for p in ps]
        assert len(flat_b) == len(ids(flat_b))
        assert ids(flat_b) == named_ids(model, per_task[task] | base)
    with pytest.raises(KeyError):
        model.parameter_groups("missing", train_base=False)


@pytest.mark.parametrize("name", ["v5", "paper"])
def test_set_trainable(name: str) -> None:
    model = build_model(name)
    model.set_trainable("t1", train_base=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == model.task_parameter_names("t1")
    model.set_trainable("t1", train_base=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == model.task_parameter_names("t1") | model.base_parameter_names()
    model.set_trainable(None, train_base=True)
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", PRESETS)
def test_parameter_counts_match_state_dicts(name: str) -> None:
    model = build_model(name)
    counts = model.parameter_counts()
    own = dict(model.named_parameters())
    base_params = {k: v for k, v in model.base_state_dict().items() if k in own}
    assert {k for k in model.base_state_dict() if k not in own} == {
        f"flow.blocks.{i}.{b}" for i in range(len(model.flow.blocks)) for b in ("perm", "inv_perm")
    }
    assert counts["base"] == sum(v.numel() for v in base_params.values())
    for task in model.tasks:
        assert counts["per_task"][task] == sum(v.numel() for v in model.task_state_dict(task).values())
    assert counts["base"] + sum(counts["per_task"].values()) == sum(p.numel() for p in model.parameters())


def _lora(i: int, o: int, r: int) -> int:
    return r * i + o * r + o


@pytest.mark.parametrize("dim", [8, 12])
def test_v5_parameter_counts_analytic(dim: int) -> None:
    layers, r = 3, 4
    model = build_model("v5", dim=dim, layers=layers, rank=r)
    p, a = dim - dim // 2, dim // 2
    hidden = round(2.0 * p)
    per_coupling = _lora(p, hidden, r) + _lora(hidden, 2 * a, r)
    h = round(0.5 * dim)
    dia = 2 * ((dim // 2) * h + h + h * dim + dim)
    expected_task = layers * per_coupling + 2 * dim + dia
    base_coupling = (p * hidden + hidden) + (hidden * 2 * a + 2 * a) + 2 * dim  # linears + global affine
    expected_base = layers * base_coupling + dim * 9 + 1  # + depthwise 3x3 mixer conv + shared gate
    counts = model.parameter_counts()
    assert counts["per_task"] == {"t0": expected_task, "t1": expected_task}
    assert counts["base"] == expected_base
    if dim == 8:
        assert expected_task == 3 * (56 + 72) + 16 + 120 == 520


def test_paper_parameter_counts_analytic() -> None:
    dim, layers, r, c = 8, 3, 4, CTX
    model = build_model("paper", dim=dim, layers=layers, rank=r)
    p, a = dim - dim // 2, dim // 2
    hd = round(2.0 * p)
    subnet = _lora(2 * p, hd, r) + _lora(hd, a, r) + _lora(p, hd, r) + _lora(hd, a, r)
    h = round(0.5 * dim)
    dia = 2 * ((dim // 2) * h + h + h * dim + dim)
    expected_task = layers * subnet + 2 * dim + dia + 1  # + per-task mixer gate
    lin = lambda i, o: i * o + o  # noqa: E731
    base_subnet = lin(2 * p, hd) + lin(hd, a) + lin(p, hd) + lin(hd, a) + p * 9 + 1  # + context conv, gate
    expected_base = layers * (base_subnet + 2 * dim) + dim * 9 + lin(c, dim) + dim * 9 + dim
    counts = model.parameter_counts()
    assert counts["per_task"] == {"t0": expected_task, "t1": expected_task}
    assert counts["base"] == expected_base


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", PRESETS)
def test_task_state_dict_roundtrip_into_fresh_model(name: str) -> None:
    model = build_model(name)
    patches, context = model_inputs(model)
    state = model.task_state_dict("t1")
    assert state and all("{task}" in k and "t1" not in k.split(".") for k in state)
    assert set(model.task_state_dict("t0")) == set(state)  # task-neutral keys

    fresh = build_model(name, tasks=(), seed=123)
    fresh.load_state_dict(model.base_state_dict(), strict=True)
    fresh.load_task_state_dict("t1", state)
    assert fresh.tasks == ["t1"]
    a, b = model(patches, "t1", context), fresh(patches, "t1", context)
    assert torch.equal(a.z, b.z) and torch.equal(a.logdet, b.logdet) and torch.equal(a.z_base, b.z_base)
    # under another name, too
    fresh.load_task_state_dict("again", state)
    assert torch.equal(fresh(patches, "again", context).z, a.z)


def test_load_task_state_dict_rejects_mismatch() -> None:
    state = build_model("v5", rank=4).task_state_dict("t0")
    other = build_model("v5", tasks=(), rank=2)
    with pytest.raises(ValueError):
        other.load_task_state_dict("t0", state)
    model = build_model("v5", tasks=())
    partial = dict(state)
    partial.pop(next(iter(partial)))
    with pytest.raises(ValueError):
        model.load_task_state_dict("x", partial)
    with pytest.raises(ValueError):
        model.load_task_state_dict("y", {**state, "bogus.{task}.w": torch.zeros(1)})


@pytest.mark.parametrize("name", PRESETS)
def test_remove_task_leaves_others_bit_identical(name: str) -> None:
    model = build_model(name, tasks=("t0", "t1", "t2"))
    patches, context = model_inputs(model)
    before = {t: model(patches, t, context) for t in ("t0", "t2")}
    base_before = {k: v.clone() for k, v in model.base_state_dict().items()}
    model.remove_task("t1")
    assert model.tasks == ["t0", "t2"]
    assert model.task_parameter_names("t1") == set()
    assert not any(".t1." in n or n.endswith(".t1") for n, _ in model.named_parameters())
    for t, out in before.items():
        after = model(patches, t, context)
        assert torch.equal(after.z, out.z) and torch.equal(after.logdet, out.logdet)
    base_after = model.base_state_dict()
    assert set(base_after) == set(base_before)
    assert all(torch.equal(base_after[k], v) for k, v in base_before.items())
    with pytest.raises(KeyError):
        model(patches, "t1", context)
    with pytest.raises(KeyError):
        model.remove_task("t1")


def test_task_names_validated() -> None:
    model = build_model("v5", tasks=("t0",))
    with pytest.raises(ValueError):
        model.add_task("t0")
    with pytest.raises(ValueError):
        model.add_task("bad.name")


# --------------------------------------------------------------------------- adapters


def test_whitening_bounds() -> None:
    cfg = WhiteningConfig()
    raw = torch.tensor([-1e4, -30.0, -1.0, 0.0, 1.0, 30.0, 1e4, 5.0], dtype=F64)
    w = WhiteningAdapter(8, cfg, raw, raw)
    assert ((w.gamma >= 0.5) & (w.gamma <= 2.0)).all()
    assert ((w.beta >= -2.0) & (w.beta <= 2.0)).all()
    assert w.gamma[0].item() == pytest.approx(0.5) and w.gamma[6].item() == pytest.approx(2.0)
    assert w.beta[0].item() == pytest.approx(-2.0) and w.beta[6].item() == pytest.approx(2.0)
    assert w.gamma[3].item() == pytest.approx(1.25) and w.beta[3].item() == 0.0
    x = torch.randn(2, 3, 4, 8, dtype=F64)
    ln = torch.nn.functional.layer_norm(x, (8,), eps=cfg.eps)
    torch.testing.assert_close(w(x), w.gamma * ln + w.beta)


def test_whitening_task_inits() -> None:
    # first task: near identity; v5 later tasks: midpoint gamma = 1.25
    v5 = build_model("v5", tasks=())
    v5.add_task("a")
    assert (v5.whitening["a"].gamma - 1).abs().max() < 0.01
    assert v5.whitening["a"].beta.abs().max() == 0
    v5.add_task("b")
    torch.testing.assert_close(v5.whitening["b"].gamma, torch.full((8,), 1.25, dtype=F64))
    assert v5.whitening["b"].beta.abs().max() == 0
    # paper: later tasks copy the first task's (trained, here perturbed) raw parameters
    paper = build_model("paper", tasks=("a",))
    first = paper.whitening["a"]
    paper.add_task("b")
    second = paper.whitening["b"]
    assert torch.equal(second.gamma_raw, first.gamma_raw) and torch.equal(second.beta_raw, first.beta_raw)
    assert second.gamma_raw is not first.gamma_raw
    with torch.no_grad():
        second.gamma_raw.add_(1.0)
    assert not torch.equal(second.gamma_raw, first.gamma_raw)  # a copy, not shared


def test_whitening_identity_penalty() -> None:
    cfg = WhiteningConfig()
    raw_one = torch.full((8,), -math.log(2.0), dtype=F64)  # sigmoid = 1/3 -> gamma = 0.5 + 1.5/3 = 1
    w = WhiteningAdapter(8, cfg, raw_one, torch.zeros(8, dtype=F64))
    torch.testing.assert_close(w.gamma, torch.ones(8, dtype=F64))
    assert w.identity_penalty().item() == pytest.approx(0.0, abs=1e-24)
    w2 = WhiteningAdapter(8, cfg, torch.zeros(8, dtype=F64), torch.full((8,), math.atanh(0.25), dtype=F64))
    # gamma = 1.25, beta = 0.5: 0.25^2 + 0.5^2
    assert w2.identity_penalty().item() == pytest.approx(0.0625 + 0.25, abs=1e-12)


def test_mixer_gate_ownership() -> None:
    shared = build_model("v5")
    assert "mixer.gate" in shared.base_parameter_names()
    assert not any(n.startswith("mixer.") for t in shared.tasks for n in shared.task_parameter_names(t))
    assert len(shared.mixer.gates) == 0
    per_task = build_model("paper")
    assert "mixer.gates.t0" in per_task.task_parameter_names("t0")
    assert "mixer.gates.t1" in per_task.task_parameter_names("t1")
    assert per_task.mixer.gate is None
    assert not any(n.startswith("mixer.gate") for n in per_task.base_parameter_names())
    assert per_task.parameter_groups("t0", train_base=False)["mixer"][0] is per_task.mixer.gates["t0"]
    # the mixer conv is base, in the "mixer" group when the base trains
    groups = per_task.parameter_groups("t0", train_base=True)
    assert any(p is per_task.mixer.conv.weight for p in groups["mixer"])


def test_mixer_lerp() -> None:
    model = build_model("paper")
    x = torch.randn(1, 3, 4, 8, dtype=F64)
    alpha = torch.sigmoid(model.mixer.gates["t0"])
    conv = model.mixer.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(model.mixer(x, "t0"), (1 - alpha) * x + alpha * conv, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- positional encoding


def test_positional_encoding_layout() -> None:
    h, w, d = 3, 5, 12
    pe = positional_encoding_2d(h, w, d, dtype=F64)
    assert pe.shape == (h, w, d) and pe.dtype == F64
    ys, xs = torch.meshgrid(torch.arange(h, dtype=F64), torch.arange(w, dtype=F64), indexing="ij")
    # i = 0: frequency 1
    torch.testing.assert_close(pe[..., 0], torch.sin(xs), rtol=0, atol=1e-12)
    torch.testing.assert_close(pe[..., 1], torch.cos(xs), rtol=0, atol=1e-12)
    torch.testing.assert_close(pe[..., 2], torch.sin(ys), rtol=0, atol=1e-12)
    torch.testing.assert_close(pe[..., 3], torch.cos(ys), rtol=0, atol=1e-12)
    # general i: w_i = 10000 ** (-i / (D/4))
    for i in range(d // 4):
        wi = 10000.0 ** (-i / (d // 4))
        torch.testing.assert_close(pe[..., 4 * i], torch.sin(xs * wi), rtol=0, atol=1e-12)
        torch.testing.assert_close(pe[..., 4 * i + 3], torch.cos(ys * wi), rtol=0, atol=1e-12)


@pytest.mark.parametrize("d", [6, 10, 7])
def test_positional_encoding_rejects_bad_dim(d: int) -> None:
    with pytest.raises(ValueError):
        positional_encoding_2d(2, 2, d)


def test_prepare_adds_positional_encoding() -> None:
    model = build_model("v5")
    patches, _ = model_inputs(model)
    pe = positional_encoding_2d(3, 4, 8, dtype=F64)
    torch.testing.assert_close(model.prepare(patches), patches + pe, rtol=0, atol=0)
    with pytest.raises(ValueError):
        model.prepare(patches[..., :4])
