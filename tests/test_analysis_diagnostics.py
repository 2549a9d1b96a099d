"""Diagnostics (moleflow analyze lora | dia | growth | routing): the glue around the tested statistics."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from helpers import task_features, tiny_config

from moleflow.analysis import diagnostics
from moleflow.analysis.dia_effect import latents, split_patches, task_effect
from moleflow.analysis.growth import closed_form_counts, measure_growth, measure_points
from moleflow.analysis.lora_rank import analyse_snapshots, base_weights, learn_with_snapshots
from moleflow.analysis.routing_confusion import routing_summary
from moleflow.config import apply_overrides, preset
from moleflow.flow.model import MoLEFlow
from moleflow.routing import Router
from moleflow.rundir import RunDirectoryError
from moleflow.training import ContinualTrainer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    diagnostics.register(parser.add_subparsers(dest="analysis", required=True))
    return parser


# ----------------------------------------------------------------------------- LoRA rank


def _low_rank(rows: int, cols: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, cols, generator=g, dtype=torch.float64
    )


def test_planted_rank_k_change_has_effective_rank_k_and_is_kept_by_rank_r():
    w0 = {"a.layer1": torch.randn(20, 12, dtype=torch.float64), "a.layer2": torch.randn(24, 20, dtype=torch.float64)}
    w1 = {"a.layer1": w0["a.layer1"] + _low_rank(20, 12, 3, 1), "a.layer2": w0["a.layer2"] + _low_rank(24, 20, 6, 2)}
    result = analyse_snapshots([w0, w1], ["t0", "t1"], lora_rank=4)
    layers = {x["layer"]: x for x in result["steps"][0]["layers"]}
    assert layers["a.layer1"]["rank_99"] == 3 and layers["a.layer2"]["rank_99"] == 6
    assert layers["a.layer1"]["energy_at_lora_rank"] == pytest.approx(1.0)  # rank 3 <= r = 4: nothing lost
    assert layers["a.layer1"]["sigma_after_rank"] == pytest.approx(0.0, abs=1e-12)
    assert layers["a.layer2"]["energy_at_lora_rank"] < 1.0 and layers["a.layer2"]["sigma_after_rank"] > 0.01
    summary = result["steps"][0]["summary"]["all"]
    assert summary["rank_99_max"] == 6 and summary["rank_99_median"] == 4.5
    assert summary["fraction_rank_99_within_lora_rank"] == 0.5


def test_every_step_is_measured_against_the_weights_after_the_first_task():
    w0 = {"x.layer1": torch.zeros(6, 5, dtype=torch.float64)}
    step_a, step_b = _low_rank(6, 5, 1, 3), _low_rank(6, 5, 1, 4)
    w1 = {"x.layer1": w0["x.layer1"] + step_a}
    w2 = {"x.layer1": w1["x.layer1"] + step_b}
    result = analyse_snapshots([w0, w1, w2], ["t0", "t1", "t2"], lora_rank=1)
    last = result["steps"][1]["layers"][0]
    assert result["steps"][1]["after_task"] == "t2"
    assert last["delta_norm"] == pytest.approx(float(torch.linalg.norm(step_a + step_b)))  # not ||step_b||
    assert last["rank_99"] == 2  # two independent rank-1 steps add up to rank 2


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("policy", ["frozen_after_first", "always_trainable"])
def test_trained_base_changes_only_when_unfrozen(policy):
    cfg = tiny_config("offline", f"train.base_policy={policy}", "train.epochs=1", "model.flow.coupling_layers=2")
    torch.manual_seed(0)
    model = MoLEFlow(cfg.model)
    trainer = ContinualTrainer(model, Router(cfg.router), cfg)
    feats = [("t0", task_features(0.0, n=16, seed=0)), ("t1", task_features(3.0, n=16, seed=1))]
    snapshots = learn_with_snapshots(trainer, feats)
    assert set(snapshots[0]) == {f"flow.blocks.{b}.subnet.layer{i}" for b in range(2) for i in (1, 2)}
    result = analyse_snapshots(snapshots, ["t0", "t1"], cfg.model.flow.lora.rank)
    norms = [x["delta_norm"] for x in result["steps"][0]["layers"]]
    if policy == "frozen_after_first":
        assert all(n == 0.0 for n in norms)  # exactly: the base never gets a gradient step
        assert result["steps"][0]["summary"]["all"]["rank_99_max"] == 0
    else:
        assert all(n > 0 for n in norms)
    assert torch.equal(snapshots[-1]["flow.blocks.0.subnet.layer1"], base_weights(model)["flow.blocks.0.subnet.layer1"])


# ----------------------------------------------------------------------------- growth


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("offline", ()),
        ("v5", ("model.dia=null", "model.flow.lora.task_bias=false")),
        ("paper", ("model.whitening=null", "model.spatial_mixer=null", "model.dia.blocks=3")),
        ("offline", ("model.spatial_mixer.gate=per_task", "model.flow.subnet=context", "model.flow.hidden_ratio=1.5")),
    ],
)
def test_closed_form_counts_equal_the_model_parameters_exactly(name, extra):
    cfg = apply_overrides(
        preset(name), ["model.backbone.embed_dim=20", "model.flow.coupling_layers=3", "model.flow.lora.rank=3", *extra]
    )
    context_dim = 7 if cfg.model.scale_context is not None else None
    model = MoLEFlow(cfg.model, context_dim)
    for t in ("a", "b", "c"):
        model.add_task(t)
    counts, form = model.parameter_counts(), closed_form_counts(cfg.model, context_dim)
    assert form["base"] == counts["base"]
    assert all(n == form["per_task"] for n in counts["per_task"].values())
    assert form["per_task"] == form["lora"] + form["whitening"] + form["dia"] + form["mixer"]


def test_measured_growth_follows_the_formula(tmp_path):
    cfg = tiny_config("offline")
    measured = measure_growth(cfg, 4, tmp_path)
    form, g = closed_form_counts(cfg.model), measured["router_dim"]
    assert g == 2 * cfg.model.backbone.embed_dim  # offline routes on the patches' channel means and spreads
    rows = measured["rows"]
    assert [r["tasks"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["total_params"] == form["base"] + r["tasks"] * form["per_task"]
        assert r["router_floats"] == r["tasks"] * (g + g * g)
        assert r["parameter_bytes"] == 4 * r["total_params"]
    per_file = np.diff([r["task_file_bytes"] for r in rows])
    assert (per_file == per_file[0]).all() and per_file[0] > 4 * form["per_task"]  # tensors + a small header
    assert measure_points(25) == [1, 2, 3, 4, 5, 10, 20, 25]


# ----------------------------------------------------------------------------- DIA


def _affine_dia_model(scale_raw: float, shift: float) -> MoLEFlow:
    """A model whose DIA is exactly ``z[D/2:] * exp(s) + shift`` (second block = identity)."""
    cfg = tiny_config("offline", "model.dia.blocks=2")
    torch.manual_seed(0)
    model = MoLEFlow(cfg.model)
    model.add_task("t")
    block = model.dia["t"].blocks[0]
    with torch.no_grad():
        block.hidden_layer.weight.zero_()
        block.out_layer.bias[: block.half] = scale_raw
        block.out_layer.bias[block.half :] = shift
    return model.eval()


def test_dia_decomposition_of_a_known_affine_dia():
    model = _affine_dia_model(scale_raw=0.4, shift=0.7)
    feats = task_features(0.0, n=6, seed=2)
    z_base, z = latents(model, feats, "t")
    lat = split_patches("t", z_base, z, np.zeros(6, dtype=np.int64), None)
    effect = task_effect(lat)
    half = 8
    s = 1.9 * math.tanh(0.4 / 1.9)  # the DIA's soft clamp
    d = effect["decomposition"]
    assert d["residual_share"] < 1e-8
    assert d["scale_deviation_norm"] == pytest.approx(math.sqrt(half) * (math.exp(s) - 1.0), rel=1e-4)
    assert d["shift_norm"] == pytest.approx(math.sqrt(half) * 0.7, rel=1e-4)
    assert effect["patches"] == 6 * 16
    assert effect["after"]["mean_std"] > effect["before"]["mean_std"]  # exp(s) > 1 stretches half the dims


def test_patches_are_split_by_the_masks():
    z = torch.arange(2 * 4 * 4 * 2, dtype=torch.float32).reshape(2, 4, 4, 2)
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    masks[1, :4, :4] = 1  # top-left 2x2 cells of the second (anomalous) image
    masks[1, 7, 7] = 1  # a quarter of one cell: below the coverage threshold
    lat = split_patches("t", z, z + 1, np.array([0, 1]), masks)
    assert lat.before.shape == (16, 2) and np.array_equal(lat.before, z[0].reshape(16, 2).numpy())
    expected = z[1, :2, :2].reshape(4, 2).numpy()
    assert np.array_equal(lat.anomalous_before, expected) and np.array_equal(lat.anomalous_after, expected + 1)


def test_a_run_without_dia_is_refused():
    cfg = tiny_config("offline", "model.dia=null")
    model = MoLEFlow(cfg.model)
    model.add_task("t")
    with pytest.raises(ValueError, match="no DIA"):
        latents(model, task_features(0.0, n=2), "t")


# ----------------------------------------------------------------------------- routing


def test_routing_summary_of_a_known_confusion():
    s = routing_summary(["a", "b", "c"], [[8, 2, 0], [1, 9, 0], [0, 0, 0]])
    assert s["accuracy"] == pytest.approx(17 / 20)
    assert s["recall"] == {"a": 0.8, "b": 0.9, "c": None}
    assert s["confusions"][0] == {"true": "a", "routed": "b", "images": 2, "share_of_true": 0.2}
    with pytest.raises(ValueError, match="shape"):
        routing_summary(["a", "b"], [[1, 0, 0]])


def test_routing_command_writes_json_table_and_figure(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(
        json.dumps({"tasks": ["x", "y"], "routing": {"accuracy": 0.75, "confusion": [[3, 1], [0, 0]]}})
    )
    args = _parser().parse_args(["routing", str(run), "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    data = json.loads((tmp_path / "out" / "routing.json").read_text())
    assert data["accuracy"] == 0.75 and data["recall"] == {"x": 0.75, "y": None}
    assert "| x | 3 | 1 | 75.0 |" in (tmp_path / "out" / "routing.md").read_text()
    assert (tmp_path / "out" / "routing_confusion.png").stat().st_size > 0


def test_commands_name_what_is_missing(tmp_path):
    args = _parser().parse_args(["routing", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="results.json"):
        args.func(args)
    # a run learned with --eval none: results.json exists, its confusion is all zeros
    (tmp_path / "results.json").write_text(json.dumps({"tasks": ["x"], "routing": {"accuracy": None, "confusion": [[0]]}}))
    with pytest.raises(ValueError, match="no test image has been evaluated yet.*moleflow eval"):
        args.func(args)
    assert not (tmp_path / "o" / "routing.md").exists()
    args = _parser().parse_args(["dia", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(RunDirectoryError, match="config.yaml and tasks.json missing"):
        args.func(args)


# ----------------------------------------------------------------------------- end to end on a tiny real run

TINY_RUN = ["train.epochs=1", "model.flow.coupling_layers=2", "model.flow.lora.rank=4"]
TINY_SPECS = ["stripes=synthetic:stripes", "disc=synthetic:disc"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from moleflow.cli.protocol import run_protocol
    from moleflow.config import apply_overrides, preset

    root = tmp_path_factory.mktemp("diag")
    cfg = apply_overrides(preset("offline"), TINY_RUN)
    run_protocol(cfg, TINY_SPECS, None, root / "run", limits=(6, 4), progress=False, feature_cache=root / "cache")
    return root


def test_dia_and_routing_commands_on_a_trained_run(tiny_run):
    out = tiny_run / "analyses"
    parser = _parser()
    for argv in (
        ["dia", str(tiny_run / "run"), "--feature-cache", str(tiny_run / "cache")],
        ["routing", str(tiny_run / "run")],
    ):
        args = parser.parse_args([*argv, "--out", str(out)])
        assert args.func(args) == 0
    dia = json.loads((out / "dia_effect.json").read_text())
    assert [t["task"] for t in dia["tasks"]] == ["stripes", "disc"]
    for t in dia["tasks"]:
        assert t["patches"] == 2 * 14 * 14  # 2 normal test images (of 4) x the 14 x 14 grid
        assert t["anomalous_patches"] > 0  # synthetic defects have exact masks
        shares = t["decomposition"]
        assert shares["scale_share"] + shares["shift_share"] + shares["residual_share"] == pytest.approx(1.0)
    routing = json.loads((out / "routing.json").read_text())
    assert routing["images"] == 8 and routing["tasks"] == ["stripes", "disc"]
    assert (out / "dia_pca.png").exists() and (out / "routing_confusion.png").exists()


def test_lora_command_trains_an_unfrozen_run(tiny_run):
    out = tiny_run / "lora"
    argv = ["lora", "--tasks", *TINY_SPECS, "--limits", "6,4", "--no-progress", "--out", str(out)]
    argv += ["--feature-cache", str(tiny_run / "cache")] + [x for s in TINY_RUN for x in ("--set", s)]
    args = _parser().parse_args(argv)
    assert args.func(args) == 0
    result = json.loads((out / "lora_rank.json").read_text())
    assert result["lora_rank"] == 4 and [s["after_task"] for s in result["steps"]] == ["disc"]
    assert all(x["delta_norm"] > 0 for x in result["steps"][0]["layers"])  # the base was trained on task 2
    assert "rank99 median" in (out / "lora_rank.md").read_text() and (out / "lora_rank_energy.png").exists()
