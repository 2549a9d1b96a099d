"""Continual training: zero forgetting bit-for-bit, ownership of trainable parameters, routing."""

import pytest
import torch

from moleflow.flow.model import MoLEFlow
from moleflow.inference import score_features
from moleflow.routing import Router
from moleflow.training import ContinualTrainer
from tests.helpers import task_features, tiny_config


def _trainer(cfg):
    model = MoLEFlow(cfg.model, context_dim=12)
    return ContinualTrainer(model, Router(cfg.router), cfg)


@pytest.mark.parametrize("preset_name", ["offline", "v5", "paper"])
def test_zero_forgetting_bit_for_bit(preset_name):
    cfg = tiny_config(preset_name)
    trainer = _trainer(cfg)
    ctx = 12 if cfg.model.scale_context else None
    f0 = task_features(0.0, seed=1, context_dim=ctx)
    trainer.learn_task("t0", f0, progress=False)
    model = trainer.model
    base_before = {k: v.clone() for k, v in model.base_state_dict().items()}
    with torch.no_grad():
        before = model(f0.patches, "t0", f0.context)
        scores_before = score_features(model, trainer.router, f0, cfg.scoring, torch.zeros(len(f0), dtype=torch.long))
    for i, name in enumerate(["t1", "t2"], start=1):
        trainer.learn_task(name, task_features(3.0 * i, seed=i + 1, context_dim=ctx), progress=False)
    with torch.no_grad():
        after = model(f0.patches, "t0", f0.context)
        scores_after = score_features(model, trainer.router, f0, cfg.scoring, torch.zeros(len(f0), dtype=torch.long))
    for k, v in model.base_state_dict().items():
        assert torch.equal(v, base_before[k]), k
    assert torch.equal(after.z, before.z)
    assert torch.equal(after.logdet, before.logdet)
    assert torch.equal(scores_after.patch_scores, scores_before.patch_scores)


def test_unfrozen_baseline_does_forget():
    """The control: with the base kept trainable, task 0's outputs do change."""
    cfg = tiny_config("offline", "train.base_policy=always_trainable")
    trainer = _trainer(cfg)
    f0 = task_features(0.0, seed=1)
    trainer.learn_task("t0", f0, progress=False)
    with torch.no_grad():
        before = trainer.model(f0.patches, "t0").z
    trainer.learn_task("t1", task_features(3.0, seed=2), progress=False)
    with torch.no_grad():
        assert not torch.equal(trainer.model(f0.patches, "t0").z, before)


def test_new_task_trains_exactly_its_own_parameters():
    cfg = tiny_config("paper")
    trainer = _trainer(cfg)
    trainer.learn_task("t0", task_features(0.0, seed=1, context_dim=12), progress=False)
    model = trainer.model
    seen: set[str] = set()
    original = trainer.objective

    def spy(batch, task, **kwargs):
        seen.update(n for n, p in model.named_parameters() if p.requires_grad)
        return original(batch, task, **kwargs)

    trainer.objective = spy
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.learn_task("t1", task_features(3.0, seed=2, context_dim=12), progress=False)
    assert set(seen) == model.task_parameter_names("t1")
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in snapshot.items())  # base and t0 untouched
    lora_b = [p for n, p in params.items() if ".lora_B.t1" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # t1's adapters (zero at creation) learned
    assert not any(p.requires_grad for p in model.parameters())  # frozen again after training


def test_router_picks_the_right_task_and_mixed_batch_equals_single_images():
    cfg = tiny_config("offline")
    trainer = _trainer(cfg)
    shifts = [0.0, 4.0, -4.0]
    for i, s in enumerate(shifts):
        trainer.learn_task(f"t{i}", task_features(s, seed=10 + i), progress=False)
    tests = [task_features(s, n=5, seed=100 + i) for i, s in enumerate(shifts)]
    mixed = type(tests[0])(
        torch.cat([t.patches for t in tests])[[0, 5, 10, 1, 6, 11, 2, 7, 12]],
        None,
        torch.cat([t.pooled for t in tests])[[0, 5, 10, 1, 6, 11, 2, 7, 12]],
    )
    scored = score_features(trainer.model, trainer.router, mixed, cfg.scoring)
    assert scored.task_index.tolist() == [0, 1, 2] * 3
    for i in range(len(mixed)):
        alone = score_features(trainer.model, trainer.router, mixed[i], cfg.scoring)
        assert alone.task_index.item() == scored.task_index[i].item()
        torch.testing.assert_close(alone.patch_scores[0], scored.patch_scores[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(alone.image_scores[0], scored.image_scores[i], rtol=1e-5, atol=1e-5)
