"""Training levers: patch subsampling per step, held-out NLL, early stopping with the best epoch kept."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from moleflow.config import ConfigError
from moleflow.features.cache import CachedFeatures
from moleflow.flow.model import MoLEFlow
from moleflow.losses import patch_nll
from moleflow.routing import Router
from moleflow.training import ContinualTrainer, _EarlyStopper, flow_on_patch_subset, sample_patches
from tests.helpers import perturb, task_features, tiny_config


def test_sample_patches_draws_distinct_patches_per_image() -> None:
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4, 1).expand(2, 3, 4, 5).contiguous()
    out = sample_patches(x, 0.5, torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 6, 5)  # ceil(0.5 * 12) patches per image, channels kept together
    for i in range(2):
        ids = out[i, 0, :, 0].tolist()
        assert len(set(ids)) == 6 and all(12 * i <= v < 12 * (i + 1) for v in ids)  # own patches, no repeats
        assert torch.equal(out[i, 0], out[i, 0, :, :1].expand(6, 5))
    assert sample_patches(x, 1.0) is x
    assert sample_patches(x, 0.01).shape == (2, 1, 1, 5)  # at least one patch
    again = sample_patches(x, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_subset_is_the_full_forward_at_the_sampled_patches() -> None:
    # the mixer and positional encoding must see the whole grid: the subset's latents are exactly the
    # full forward's latents at the drawn positions
    cfg = tiny_config("offline")
    model = MoLEFlow(cfg.model)
    model.add_task("t0")
    perturb(model, std=0.05)
    feats = task_features(0.0, n=3, grid=5)
    with torch.no_grad():
        full = model(feats.patches, "t0")
        sub = flow_on_patch_subset(model, feats, "t0", 0.3, torch.Generator().manual_seed(4))
    position = torch.arange(25.0).view(1, 5, 5, 1).expand(3, 5, 5, 1)
    drawn = sample_patches(position, 0.3, torch.Generator().manual_seed(4))[:, 0, :, 0].long()  # (3, 8)
    assert sub.z.shape == (3, 1, 8, 16)
    rows = torch.arange(3)[:, None]
    torch.testing.assert_close(sub.z[:, 0], full.z.reshape(3, 25, 16)[rows, drawn])
    torch.testing.assert_close(sub.logdet[:, 0], full.logdet.reshape(3, 25)[rows, drawn])


def test_patch_fraction_is_validated() -> None:
    with pytest.raises(ConfigError, match="patch_fraction"):
        tiny_config("offline", "train.patch_fraction=0")
    with pytest.raises(ConfigError, match="patience"):
        tiny_config("offline", "train.early_stopping.patience=0")


def test_training_on_a_patch_subset_learns_and_is_reproducible() -> None:
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        cfg = tiny_config("offline", "train.patch_fraction=0.25", "train.epochs=4")
        trainer = ContinualTrainer(MoLEFlow(cfg.model), Router(cfg.router), cfg)
        runs.append(trainer.learn_task("t0", task_features(1.0, seed=3), progress=False))
    assert runs[0].epoch_losses == runs[1].epoch_losses
    assert runs[0].epoch_losses[-1] < runs[0].epoch_losses[0]


def test_early_stopper_keeps_the_best_epoch() -> None:
    cfg = tiny_config("offline", "train.early_stopping.patience=2").train
    param = torch.nn.Parameter(torch.zeros(3))
    stopper = _EarlyStopper(cfg, [param])
    decisions = []
    for epoch, value in enumerate([5.0, 4.0, 4.5, 4.6, 3.0]):
        with torch.no_grad():
            param.fill_(float(epoch))
        decisions.append(stopper.stop(epoch, value))
        if decisions[-1]:
            break
    assert decisions == [False, False, False, True]  # epoch 3 is the second without beating epoch 1
    assert stopper.restore() == 1
    assert param.tolist() == [1.0, 1.0, 1.0]


def _mismatched_sets() -> tuple[CachedFeatures, CachedFeatures]:
    """Training patches around a channel profile, held-out ones around the reversed profile (LayerNorm in
    the whitening removes plain shifts and scales): the better the fit, the worse the held-out NLL."""
    profile = 2.0 * torch.randn(16, generator=torch.Generator().manual_seed(5))
    train, held = task_features(0.0, n=8, seed=1), task_features(0.0, n=8, seed=2)
    return (
        dataclasses.replace(train, patches=0.3 * train.patches + profile),
        dataclasses.replace(held, patches=0.3 * held.patches + profile.flip(0)),
    )


def test_learn_task_stops_early_and_restores_the_best_epoch() -> None:
    torch.manual_seed(0)
    cfg = tiny_config("offline", "train.epochs=12", "train.lr=0.05", "train.early_stopping.patience=2")
    trainer = ContinualTrainer(MoLEFlow(cfg.model), Router(cfg.router), cfg)
    train, held = _mismatched_sets()
    report = trainer.learn_task("t0", train, progress=False, validation=held)
    assert len(report.validation_nll) == len(report.epoch_losses) < 12  # stopped early
    assert report.best_epoch == min(range(len(report.validation_nll)), key=report.validation_nll.__getitem__)
    assert report.best_epoch < len(report.validation_nll) - 1
    now = trainer.validation_nll("t0", held)
    assert now == pytest.approx(report.validation_nll[report.best_epoch], rel=1e-5)  # best parameters back
    assert now < report.validation_nll[-1]
    with torch.no_grad():
        out = trainer.model(held.patches, "t0")
    assert now == pytest.approx(float(patch_nll(out.z, out.logdet).mean()), rel=1e-5)


def test_without_early_stopping_all_epochs_run_and_held_out_nll_is_recorded() -> None:
    torch.manual_seed(0)
    cfg = tiny_config("offline", "train.epochs=3")
    trainer = ContinualTrainer(MoLEFlow(cfg.model), Router(cfg.router), cfg)
    train, held = _mismatched_sets()
    report = trainer.learn_task("t0", train, progress=False, validation=held)
    assert len(report.validation_nll) == 3 and report.best_epoch is None
    assert trainer.validation_nll("t0", held) == pytest.approx(report.validation_nll[-1], rel=1e-5)
    assert all(math.isfinite(v) for v in report.validation_nll)


def test_step_budget_sets_the_epochs_per_task() -> None:
    from moleflow.training import task_epochs

    cfg = tiny_config("offline", "train.batch_size=16", "train.epochs=7").train
    assert task_epochs(cfg, 1000) == 7  # no step budget: the configured epochs
    cfg = tiny_config("offline", "train.batch_size=16", "train.steps=300").train
    assert task_epochs(cfg, 240) == 20  # 15 batches per epoch
    assert task_epochs(cfg, 23) == 150  # 2 batches per epoch
    assert task_epochs(cfg, 552) == 9  # 35 batches: 8.57 -> 9
    assert task_epochs(cfg, 100_000) == 1
    with pytest.raises(ConfigError, match="steps"):
        tiny_config("offline", "train.steps=0")


def test_learn_task_runs_the_step_budget() -> None:
    torch.manual_seed(0)
    cfg = tiny_config("offline", "train.steps=15", "train.batch_size=8")  # 24 images: 3 batches -> 5 epochs
    trainer = ContinualTrainer(MoLEFlow(cfg.model), Router(cfg.router), cfg)
    report = trainer.learn_task("t0", task_features(0.0, seed=1), progress=False)
    assert len(report.epoch_losses) == 5  # not tiny_config's train.epochs=3
