"""Per-task safetensors files: reload in a fresh process state, config mismatch, add/remove tasks."""

import pytest
import torch

from moleflow.checkpoint import CheckpointError, load_all, save_all, save_router, save_task
from moleflow.config import apply_overrides
from moleflow.flow.model import MoLEFlow
from moleflow.inference import score_features
from moleflow.routing import Router
from moleflow.training import ContinualTrainer
from tests.helpers import task_features, tiny_config


@pytest.fixture(scope="module")
def trained():
    cfg = tiny_config("paper")
    trainer = ContinualTrainer(MoLEFlow(cfg.model, context_dim=12), Router(cfg.router), cfg)
    for i, s in enumerate([0.0, 4.0]):
        trainer.learn_task(f"t{i}", task_features(s, seed=i, context_dim=12), progress=False)
    return cfg, trainer


def test_round_trip_reproduces_scores(trained, tmp_path):
    cfg, trainer = trained
    save_all(trainer.model, trainer.router, cfg, tmp_path)
    assert sorted(p.name for p in (tmp_path / "tasks").iterdir()) == ["t0.safetensors", "t1.safetensors"]
    torch.manual_seed(12345)  # a different init must not matter
    model, router = load_all(cfg, tmp_path)
    feats = task_features(4.0, n=6, seed=99, context_dim=12)
    a = score_features(trainer.model, trainer.router, feats, cfg.scoring)
    b = score_features(model, router, feats, cfg.scoring)
    assert torch.equal(a.task_index, b.task_index)
    assert torch.equal(a.patch_scores, b.patch_scores)


def test_other_config_is_rejected(trained, tmp_path):
    cfg, trainer = trained
    save_all(trainer.model, trainer.router, cfg, tmp_path)
    other = apply_overrides(cfg, ["model.flow.lora.rank=8"])
    with pytest.raises(CheckpointError, match="another model config"):
        load_all(other, tmp_path)


def test_corrupt_and_missing_files(trained, tmp_path):
    cfg, trainer = trained
    save_all(trainer.model, trainer.router, cfg, tmp_path)
    (tmp_path / "tasks" / "t1.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="t1.safetensors"):
        load_all(cfg, tmp_path)
    (tmp_path / "tasks" / "t1.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_all(cfg, tmp_path)


def test_adding_a_task_leaves_other_task_files_untouched(trained, tmp_path):
    cfg, trainer = trained
    save_all(trainer.model, trainer.router, cfg, tmp_path)
    t0_bytes = (tmp_path / "tasks" / "t0.safetensors").read_bytes()
    model, router = load_all(cfg, tmp_path)
    again = ContinualTrainer(model, router, cfg)
    again.learn_task("t2", task_features(-4.0, seed=7, context_dim=12), progress=False)
    save_task(model, cfg, "t2", tmp_path)
    save_router(router, cfg, tmp_path)
    assert (tmp_path / "tasks" / "t0.safetensors").read_bytes() == t0_bytes
    reloaded, router2 = load_all(cfg, tmp_path)
    assert router2.tasks == ["t0", "t1", "t2"]
