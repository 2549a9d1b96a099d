"""Presets, YAML round trip, overrides, range checks with one-line messages, and the committed JSON schema."""

import json
from pathlib import Path

import pytest
import yaml
from pydantic import Field

from moleflow.config import (
    PRESETS,
    ConfigError,
    DIAConfig,
    MoleFlowConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    dump_yaml,
    load_config,
    preset,
    replace,
    schema_text,
    to_dict,
)
from moleflow.config_base import Fraction, Section, parse_override, set_dotted

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "docs" / "config.schema.json"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_yaml_round_trip(name, tmp_path):
    cfg = preset(name)
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg
    assert dump_yaml(load_config(path)) == path.read_text()  # YAML in, the same YAML out


def test_partial_yaml_starts_from_its_preset(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: v5\ntrain:\n  epochs: 3\nmodel:\n  dia: null\n")
    cfg = load_config(path)
    assert cfg.train.epochs == 3 and cfg.model.dia is None
    assert cfg.train.lr == preset("v5").train.lr  # untouched keys come from the preset
    assert cfg.model.backbone.layers == (1, 3, 5, 11)  # lists come back as tuples


def test_presets_follow_the_spec_where_they_disagree():
    paper, v5 = preset("paper"), preset("v5")
    assert (paper.model.flow.lora.alpha / paper.model.flow.lora.rank) == 1.0
    assert v5.model.flow.lora.alpha / v5.model.flow.lora.rank == pytest.approx(1 / 64)
    assert paper.model.flow.subnet == "context" and v5.model.flow.subnet == "mlp"
    assert paper.train.optimizer == "adamp" and v5.train.optimizer == "adamw"
    assert (paper.train.lr, v5.train.lr) == (2e-4, 1e-4)
    assert paper.model.whitening.later_task_init == "from_first_task"
    assert v5.model.whitening.later_task_init == "midpoint"
    assert paper.model.scale_context is not None and v5.model.scale_context is None


def test_preset_names_match_the_schema_enum():
    assert tuple(PRESETS) == tuple(json.loads(schema_text())["properties"]["preset"]["enum"])


def test_null_section_switches_off_and_a_nested_key_switches_it_on_with_defaults():
    cfg = apply_overrides(preset("v5"), ["model.dia=null", "train.lr=1e-3"])
    assert cfg.model.dia is None and cfg.train.lr == 1e-3
    cfg = apply_overrides(cfg, ["model.dia.blocks=3"])
    assert cfg.model.dia == DIAConfig(blocks=3)
    cfg = apply_overrides(preset("offline"), ["model.scale_context.kernel_size=5"])  # off in the preset
    assert cfg.model.scale_context.kernel_size == 5


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=0", "train.epochs: must be >= 1, got 0"),
        ("train.batch_size=-2", "train.batch_size: must be >= 1, got -2"),
        ("model.backbone.image_size=32", "model.backbone.image_size: must be >= 64, got 32"),
        ("model.backbone.image_size=100", "model.backbone.image_size: must be a multiple of 32, got 100"),
        ("model.flow.coupling_layers=0", "model.flow.coupling_layers: must be >= 1, got 0"),
        ("model.flow.lora.rank=0", "model.flow.lora.rank: must be >= 1, got 0"),
        ("loss.tail_top_k=0", "loss.tail_top_k: must be > 0.0, got 0"),
        ("loss.tail_top_k=1.5", "loss.tail_top_k: must be <= 1.0, got 1.5"),
        ("scoring.smoothing_sigma=-1", "scoring.smoothing_sigma: must be >= 0.0, got -1"),
        ("train.lr=0", "train.lr: must be > 0.0, got 0"),
        ("train.lr=fast", "train.lr: must be a number, got 'fast'"),
        ("train.lr=.nan", "train.lr: must be a finite number, got nan"),
        ("train.epochs=2.5", "train.epochs: must be an integer, got 2.5"),
        ("train.epochs=true", "train.epochs: must be an integer, got True"),
        ("train.betas=[0.9, 1.0]", "train.betas[1]: must be < 1.0, got 1.0"),
        ("train.betas=[0.9]", "train.betas: entry [1] is missing, got [0.9]"),
        ("router.metric=cosine", "router.metric: must be one of 'mahalanobis', 'euclidean', got 'cosine'"),
        (
            "model.spatial_mixer.kernel_size=4",
            "model.spatial_mixer.kernel_size: must be odd (the convolution keeps the grid size), got 4",
        ),
        ("model.whitening.gamma_range=[2, 1]", "model.whitening.gamma_range: must satisfy 0 < low < high, got [2, 1]"),
        ("model.flow=null", "model.flow: may not be null (only optional sections can be switched off with null)"),
        ("device=gpu", "device: must be auto, cpu, cuda, cuda:N, mps or xpu[:N], got 'gpu'"),
        ("train.lr_multipliers.dia=-1", "train.lr_multipliers.dia: must be >= 0.0, got -1"),
        (
            "model.backbone.embed_dim=10",
            "model.backbone.embed_dim: must be divisible by 4 (the 2D positional encoding splits it in four), got 10",
        ),
    ],
)
def test_out_of_range_values_name_the_key_the_range_and_the_value(override, message):
    with pytest.raises(ConfigError) as info:
        apply_overrides(preset("offline"), [override])
    assert str(info.value) == message
    assert [p.key for p in info.value.problems] == [message.split(":")[0]]


def test_unknown_keys_suggest_the_closest_and_a_command_that_exists(capsys):
    with pytest.raises(ConfigError, match=r"^train\.lrr: unknown key, did you mean 'lr'\? \(`moleflow config PRESET`"):
        apply_overrides(preset("offline"), ["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"^model\.flw: unknown key, did you mean 'flow'\?"):
        apply_overrides(preset("offline"), ["model.flw.rank=2"])
    with pytest.raises(ConfigError, match=r"^modle: unknown key, did you mean 'model'\?"):
        config_from_dict({"modle": {}})
    from moleflow.cli import main

    assert main(["config", "offline"]) == 0  # the command the hint names
    assert "coupling_layers: 8" in capsys.readouterr().out


def test_every_problem_gets_its_own_line_and_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: 0\n  batch_size: 0\nloss:\n  tail_weight: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert lines == [
        f"{path}: loss.tail_weight: must be <= 1.0, got 2",
        f"{path}: train.epochs: must be >= 1, got 0",
        f"{path}: train.batch_size: must be >= 1, got 0",
    ]
    with pytest.raises(ConfigError, match="neither a preset .* nor a YAML file .does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("nope")


def test_cross_field_checks():
    with pytest.raises(ConfigError, match=r"^model\.scale_context: needs a CNN backbone"):
        apply_overrides(preset("v5"), ["model.scale_context.kernel_size=3"])
    with pytest.raises(ConfigError, match=r"^train\.lr_multipliers: has unknown groups \['foo'\]"):
        apply_overrides(preset("offline"), ["train.lr_multipliers={foo: 1}"])
    with pytest.raises(ConfigError, match="schema_version 2 is not supported"):
        config_from_dict({"schema_version": 2})


def test_construction_assignment_and_replace_are_checked_too():
    with pytest.raises(ConfigError, match=r"^epochs: must be >= 1, got 0$"):
        TrainConfig(epochs=0)
    cfg = preset("offline")
    with pytest.raises(ConfigError, match=r"^coupling_layers: must be >= 1, got 0$"):
        cfg.model.flow.coupling_layers = 0
    assert cfg.model.flow.coupling_layers == 8  # a refused assignment changes nothing
    with pytest.raises(ConfigError, match=r"^seed: must be >= 0, got -1$"):
        replace(cfg.train, seed=-1)
    assert replace(cfg.train, seed=3).seed == 3 and cfg.train.seed == 0


def test_a_new_section_is_a_few_lines_and_gets_the_same_checks():
    class Calibration(Section):
        quantile: Fraction = 0.99

    class WithCalibration(MoleFlowConfig):
        calibration: Calibration | None = Field(default_factory=Calibration)

    data = to_dict(WithCalibration(calibration=None))
    set_dotted(data, WithCalibration, "calibration.quantile", 1.5)  # null section switched on
    with pytest.raises(ConfigError, match=r"^calibration\.quantile: must be <= 1\.0, got 1\.5$"):
        WithCalibration.parse(data)
    assert "Calibration" in WithCalibration.model_json_schema()["$defs"]


def test_committed_json_schema_is_current():
    assert SCHEMA_FILE.read_text() == schema_text(), "docs/config.schema.json is stale: run `make schema`"


@pytest.mark.parametrize(("text", "value"), [("1e-3", 1e-3), ("-5E+2", -500.0), ("2.5e-1", 0.25), ("7", 7), ("e3", "e3")])
def test_exponent_floats_without_a_dot_are_numbers_in_overrides(text, value):
    # PyYAML (YAML 1.1) reads "1e-3" as a string; a user writing --set train.lr=1e-3 means the number
    assert parse_override(f"train.lr={text}") == ("train.lr", value)


def test_exponent_floats_without_a_dot_are_numbers_in_config_files(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: offline\ntrain:\n  lr: 3e-4\n")
    assert load_config(path).train.lr == 3e-4


def test_a_run_config_that_predates_backbone_keys_reads_their_legacy_values(tmp_path, monkeypatch):
    import moleflow.config as config_module
    from moleflow.config import LEGACY_BACKBONE, load_run_config

    old = to_dict(preset("offline"))
    for key in LEGACY_BACKBONE:
        del old["model"]["backbone"][key]  # as a run written before these keys existed
    del old["scoring"]["global_weight"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    newer = preset("offline")
    newer = replace(
        newer, model=replace(newer.model, backbone=replace(newer.model.backbone, grid="finest", precision="bf16"))
    )
    assert newer.scoring.global_weight > 0  # today's default mixes the routing distance into the image score
    monkeypatch.setitem(config_module.PRESETS, "offline", lambda: newer)  # a later default for those keys
    run_cfg = load_run_config(path)
    assert {k: getattr(run_cfg.model.backbone, k) for k in LEGACY_BACKBONE} == LEGACY_BACKBONE
    assert run_cfg.scoring.global_weight == 0.0  # its thresholds were set on the flow's score alone
    assert load_config(path).model.backbone.grid == "finest"  # a user's config file takes the preset's defaults
    assert load_config(path).scoring.global_weight == newer.scoring.global_weight


def test_offline_fine_is_offline_on_the_stride_8_grid_with_four_values_changed():
    fine, base = to_dict(preset("offline_fine")), to_dict(preset("offline"))
    changed = {
        (section, key)
        for section in base
        if isinstance(base[section], dict)
        for key in base[section]
        if base[section][key] != fine[section][key]
    }
    assert changed == {
        ("model", "backbone"),
        ("model", "positional_encoding"),
        ("loss", "tail_weight"),
        ("train", "patch_fraction"),
    }
    assert fine["model"]["positional_encoding"] is False
    backbone = {k for k in base["model"]["backbone"] if base["model"]["backbone"][k] != fine["model"]["backbone"][k]}
    assert backbone == {"grid"} and fine["model"]["backbone"]["grid"] == "finest"
    assert (fine["loss"]["tail_weight"], fine["train"]["patch_fraction"]) == (0.7, 0.125)
