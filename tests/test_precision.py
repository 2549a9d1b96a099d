"""bf16 autocast of the head (moleflow.precision): fp32 stays the exact default, bf16 stays within tolerance."""

from __future__ import annotations

import pytest
import torch

from moleflow import precision
from moleflow.config import ConfigError, ScoringConfig, apply_overrides, preset
from moleflow.inference import score_features
from moleflow.routing import Router
from moleflow.training import ContinualTrainer, routing_features
from tests.helpers import build_perturbed_model, task_features

# bf16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3) in the subnets' inputs and weights; the
# couplings' exp/tanh, the latent and the log-dets stay float32. Measured on the tiny models below: patch
# scores move by 1.7e-3 of their scale (offline and v5); 1e-2 leaves margin for other CPUs' bf16 kernels
SCORE_RTOL = 1e-2


def _tiny(name: str = "offline"):
    model = build_perturbed_model(name, tasks=("t0",), dim=16, layers=3, rank=4).float()
    return model.eval()


@pytest.mark.parametrize("name", ["offline", "v5"])
def test_bf16_scores_are_float32_and_within_tolerance_of_fp32(name):
    model = _tiny(name)
    x = task_features(0.5, n=4, seed=3, dim=16).patches
    with torch.inference_mode():
        ref = model(x, "t0")
        with precision.autocast("cpu", "bf16") as resolved:
            out = model(x, "t0")
    assert resolved == "bf16"
    assert out.z.dtype == torch.float32 and out.logdet.dtype == torch.float32
    s_ref, s_bf16 = (0.5 * o.z.pow(2).sum(-1) - o.logdet for o in (ref, out))
    rel = float((s_bf16 - s_ref).abs().max() / s_ref.abs().max())
    assert 0.0 < rel < SCORE_RTOL  # > 0: bf16 really ran


def test_fp32_inside_a_bf16_region_is_exactly_fp32():
    model = _tiny()
    x = task_features(0.5, n=2, seed=4, dim=16).patches
    with torch.inference_mode():
        ref = model(x, "t0")
        with torch.autocast("cpu", dtype=torch.bfloat16), precision.autocast("cpu", "fp32"):
            out = model(x, "t0")
    assert torch.equal(out.z, ref.z) and torch.equal(out.logdet, ref.logdet)


def test_bf16_training_step_keeps_float32_loss_and_gradients_close_to_fp32():
    cfg = preset("offline")
    feats = task_features(0.5, n=4, seed=5, dim=16)
    losses, grads = {}, {}
    for p in ("fp32", "bf16"):
        model = _tiny().train()
        model.set_trainable("t0", train_base=True)
        trainer = ContinualTrainer(model, None, apply_overrides(cfg, [f"train.precision={p}"]))
        loss, _ = trainer.objective(feats, "t0", trains_base=True)
        loss.backward()
        losses[p] = loss.detach()
        grads[p] = torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None])
    assert losses["bf16"].dtype == torch.float32 and grads["bf16"].dtype == torch.float32
    assert abs(float(losses["bf16"] - losses["fp32"])) < SCORE_RTOL * abs(float(losses["fp32"]))
    cosine = torch.nn.functional.cosine_similarity(grads["bf16"], grads["fp32"], dim=0)
    assert cosine > 0.99


def test_score_features_follows_scoring_precision_and_fp32_is_the_default():
    model = _tiny()
    feats = task_features(0.0, n=3, seed=6, dim=16)
    router = Router(preset("offline").router)
    route_in = routing_features(model, feats, router.cfg.feature)  # (3, G)
    router.add("t0", route_in.mean(dim=0).double(), torch.eye(route_in.shape[1], dtype=torch.float64))
    assert ScoringConfig().precision == "fp32" and preset("v5").train.precision == "fp32"
    with torch.inference_mode():
        default = score_features(model, router, feats, ScoringConfig())
        direct = model(feats.patches, "t0")
        bf16 = score_features(model, router, feats, ScoringConfig(precision="bf16"))
    assert torch.equal(default.patch_scores, 0.5 * direct.z.pow(2).sum(-1) - direct.logdet)
    assert bf16.patch_scores.dtype == torch.float32
    assert not torch.equal(bf16.patch_scores, default.patch_scores)
    rel = (bf16.patch_scores - default.patch_scores).abs().max() / default.patch_scores.abs().max()
    assert rel < SCORE_RTOL


@pytest.mark.parametrize(
    "device, amx, cuda_bf16, expected",
    [
        ("cpu", True, False, "bf16"),
        ("cpu", False, False, "fp32"),
        ("cuda", False, True, "bf16"),
        ("mps", True, True, "fp32"),
    ],
)
def test_auto_picks_bf16_only_where_it_is_native(monkeypatch, device, amx, cuda_bf16, expected):
    monkeypatch.setattr(precision, "cpu_has_amx", lambda: amx)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_bf16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    assert precision.resolve("auto", device) == expected
    assert precision.resolve("fp32", device) == "fp32" and precision.resolve("bf16", device) == "bf16"


def test_unknown_precision_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="unknown precision 'fp16'; use one of fp32, bf16, auto"):
        precision.resolve("fp16", "cpu")
    with pytest.raises(ConfigError, match=r"^scoring\.precision: must be one of 'fp32', 'bf16', 'auto', got 'fp16'"):
        apply_overrides(preset("offline"), ["scoring.precision=fp16"])
