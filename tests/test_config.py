"""Presets, YAML round trip and overrides."""

import pytest

from moleflow.config import ConfigError, apply_overrides, config_from_dict, dump_yaml, load_config, preset


@pytest.mark.parametrize("name", ["paper", "v5", "offline"])
def test_yaml_round_trip(name, tmp_path):
    cfg = preset(name)
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg


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


def test_overrides_and_errors():
    cfg = apply_overrides(preset("v5"), ["model.dia=null", "train.lr=1e-3"])
    assert cfg.model.dia is None and cfg.train.lr == 1e-3
    cfg = apply_overrides(cfg, ["model.dia.blocks=3"])  # switches the section back on
    assert cfg.model.dia.blocks == 3
    with pytest.raises(ConfigError, match="unknown key"):
        apply_overrides(cfg, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="must be one of"):
        apply_overrides(cfg, ["router.metric=cosine"])
    with pytest.raises(ConfigError, match="must be a number"):
        apply_overrides(cfg, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("nope")
    with pytest.raises(ConfigError, match="divisible by 4"):
        config_from_dict({"model": {"backbone": {"embed_dim": 10}}})
