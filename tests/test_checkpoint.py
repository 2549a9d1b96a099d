"""Checkpoint files: reload in a fresh process state, config mismatch, files of another run, add/remove tasks."""

import pytest
import torch

from moleflow.checkpoint import CheckpointError, load_all, save_all, save_router, save_task, task_file
from moleflow.config import apply_overrides
from moleflow.flow.model import MoLEFlow
from moleflow.inference import score_features
from moleflow.routing import Router
from moleflow.training import ContinualTrainer
from tests.helpers import task_features, tiny_config

BASE = "base-a"


@pytest.fixture(scope="module")
def trained():
    cfg = tiny_config("paper")
    trainer = ContinualTrainer(MoLEFlow(cfg.model, context_dim=12), Router(cfg.router), cfg)
    for i, s in enumerate([0.0, 4.0]):
        trainer.learn_task(f"t{i}", task_features(s, seed=i, context_dim=12), progress=False)
    return cfg, trainer


def test_round_trip_reproduces_scores(trained, tmp_path):
    cfg, trainer = trained
    save_all(trainer.model, trainer.router, cfg, tmp_path, BASE)
    assert sorted(p.name for p in (tmp_path / "tasks").iterdir()) == ["t0.safetensors", "t1.safetensors"]
    torch.manual_seed(12345)  # a different init must not matter
    model, router = load_all(cfg, tmp_path, ["t0", "t1"])
    feats = task_features(4.0, n=6, seed=99, context_dim=12)
    a = score_features(trainer.model, trainer.router, feats, cfg.scoring)
    b = score_features(model, router, feats, cfg.scoring)
    assert torch.equal(a.task_index, b.task_index)
    assert torch.equal(a.patch_scores, b.patch_scores) and torch.equal(a.distances, b.distances)


def test_prototypes_come_from_the_task_files_when_the_router_file_is_gone_or_stale(trained, tmp_path):
    cfg, trainer = trained
    save_all(trainer.model, trainer.router, cfg, tmp_path, BASE)
    (tmp_path / "router.safetensors").unlink()
    _, router = load_all(cfg, tmp_path, ["t0", "t1"])
    assert torch.equal(router.means, trainer.router.means) and torch.equal(router.precisions, trainer.router.precisions)
    save_router(trainer.router, cfg, tmp_path, BASE, ["other", "ids"])  # names the wrong parts: not used
    _, router = load_all(cfg, tmp_path, ["t1"])
    assert torch.equal(router.means[0], trainer.router.means[1])


def test_other_config_is_rejected(trained, tmp_path):
    cfg, trainer = trained
    save_all(trainer.model, trainer.router, cfg, tmp_path, BASE)
    other = apply_overrides(cfg, ["model.flow.lora.rank=8"])
    with pytest.raises(CheckpointError, match="another model config"):
        load_all(other, tmp_path, ["t0", "t1"])


def test_corrupt_and_missing_files(trained, tmp_path):
    cfg, trainer = trained
    save_all(trainer.model, trainer.router, cfg, tmp_path, BASE)
    (tmp_path / "tasks" / "t1.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="t1.safetensors"):
        load_all(cfg, tmp_path, ["t0", "t1"])
    (tmp_path / "tasks" / "t1.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_all(cfg, tmp_path, ["t0", "t1"])


def test_adding_a_task_leaves_other_task_files_untouched(trained, tmp_path):
    cfg, trainer = trained
    save_all(trainer.model, trainer.router, cfg, tmp_path, BASE)
    t0_bytes = (tmp_path / "tasks" / "t0.safetensors").read_bytes()
    model, router = load_all(cfg, tmp_path, ["t0", "t1"])
    again = ContinualTrainer(model, router, cfg)
    again.learn_task("t2", task_features(-4.0, seed=7, context_dim=12), progress=False)
    save_task(model, router, cfg, "t2", task_file(tmp_path, "t2"), BASE, "t2")
    assert (tmp_path / "tasks" / "t0.safetensors").read_bytes() == t0_bytes
    _, router2 = load_all(cfg, tmp_path, ["t0", "t1", "t2"])
    assert router2.tasks == ["t0", "t1", "t2"]


def test_a_file_of_another_base_is_refused_even_with_the_same_config(trained, tmp_path):
    cfg, trainer = trained
    save_all(trainer.model, trainer.router, cfg, tmp_path / "a", BASE)
    save_all(trainer.model, trainer.router, cfg, tmp_path / "b", "base-b")
    (tmp_path / "a" / "tasks" / "t1.safetensors").write_bytes((tmp_path / "b" / "tasks" / "t1.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="belongs to another run"):
        load_all(cfg, tmp_path / "a", ["t0", "t1"])
    (tmp_path / "a" / "base.safetensors").write_bytes((tmp_path / "b" / "base.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="belongs to another run"):
        load_all(cfg, tmp_path / "a", ["t0", "t1"], base_id=BASE)


def test_a_product_file_of_another_learning_is_refused(trained, tmp_path):
    from moleflow.checkpoint import TaskFile, load_model

    cfg, trainer = trained
    save_all(trainer.model, trainer.router, cfg, tmp_path, BASE)  # parts id of each file = its task name
    with pytest.raises(CheckpointError, match="parts"):
        load_model(cfg, tmp_path, [TaskFile("t1", task_file(tmp_path, "t1"), "a-newer-learning")], BASE)
