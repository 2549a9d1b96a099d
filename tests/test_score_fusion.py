"""The image score mixed with the routing distance (scoring.global_weight, moleflow.score_fusion)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moleflow.calibration import Calibration, threshold_at_fpr
from moleflow.config import apply_overrides, preset
from moleflow.score_fusion import ScoreFusion
from moleflow.training import patch_moments


def test_fusion_by_hand() -> None:
    e = math.e
    scores, distances = np.array([1.0, 2.0, 3.0]), np.array([e, e**3, e**2])  # log distances 1, 3, 2
    fusion = ScoreFusion.fit(0.25, scores, distances)
    assert (fusion.score_mean, fusion.score_std) == (2.0, 1.0)  # sample std of 1, 2, 3
    assert fusion.log_distance_mean == pytest.approx(2.0) and fusion.log_distance_std == pytest.approx(1.0)
    # (1 - w) (s - 2) / 1 + w (log d - 2) / 1 at s = 4, d = e^0.5: 0.75 * 2 + 0.25 * -1.5
    assert fusion(4.0, math.exp(0.5)) == pytest.approx(1.5 - 0.375)
    mixed = fusion(scores, distances)
    assert mixed == pytest.approx([-0.75 - 0.25, 0.25, 0.75])
    assert mixed.mean() == pytest.approx(0.0)  # on its own normals the mix is centred
    assert np.isfinite(fusion(0.0, 0.0))  # a distance of 0 (the prototype itself) is floored, not log(0)


def test_fusion_refuses_bad_weights_and_values_and_survives_constant_normals() -> None:
    with pytest.raises(ValueError, match="global_weight"):
        ScoreFusion.fit(1.0, np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        ScoreFusion.fit(0.5, np.array([1.0, np.nan]), np.ones(2))
    with pytest.raises(ValueError, match="negative"):
        ScoreFusion.fit(0.5, np.ones(2), np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="as many"):
        ScoreFusion.fit(0.5, np.ones(3), np.ones(2))
    flat = ScoreFusion.fit(0.5, np.full(4, 7.0), np.array([1.0, 2.0, 3.0, 4.0]))
    assert flat.score_std > 0 and np.isfinite(flat(8.0, 2.0))
    with pytest.raises(ValueError):  # the config refuses it before any calibration
        apply_overrides(preset("offline"), ["scoring.global_weight=1"])


def _calibration(weight: float, seed: int = 0) -> Calibration:
    rng = np.random.default_rng(seed)
    return Calibration.fit(
        method="holdout",
        scoring={"global_weight": weight},
        scores=rng.normal(50.0, 5.0, 40),
        distances=rng.lognormal(5.0, 0.3, 40),
        pixels=rng.normal(0.0, 1.0, (40, 8, 8)),
        image_fpr=0.1,
        pixel_fpr=0.01,
        unknown_fpr=0.01,
        unknown_margin=10.0,
        global_weight=weight,
    )


def test_calibration_thresholds_the_mixed_scores_and_keeps_the_flows() -> None:
    cal, plain = _calibration(0.4), _calibration(0.0)
    mixed = cal.fusion(np.array(cal.scores), np.array(cal.distances))
    assert cal.scores == plain.scores  # the stored values are the flow's own
    assert cal.image_threshold == threshold_at_fpr(mixed, 0.1).value
    assert cal.image_center == float(np.median(mixed))
    assert cal.expected_fpr() == pytest.approx(np.mean(mixed > cal.image_threshold))
    assert cal.image_scores(cal.scores[:3], cal.distances[:3]) == pytest.approx(mixed[:3])
    rerated = cal.with_rates(image_fpr=0.2)
    assert rerated.image_threshold == threshold_at_fpr(mixed, 0.2).value and rerated.fusion == cal.fusion
    # without a weight nothing is mixed and the threshold is on the flow's scores, as before
    assert plain.fusion is None and plain.image_scores(plain.scores, plain.distances).tolist() == plain.scores
    assert plain.image_threshold == threshold_at_fpr(plain.scores, 0.1).value
    # the unknown-product threshold does not depend on the mix
    assert cal.unknown_threshold == plain.unknown_threshold


def test_calibration_json_round_trip_and_older_records() -> None:
    cal = _calibration(0.3)
    data = cal.to_json()
    assert isinstance(data["fusion"], dict)
    assert Calibration.from_json(data) == cal
    older = {k: v for k, v in _calibration(0.0).to_json().items() if k != "fusion"}  # a record of before
    assert Calibration.from_json(older).fusion is None


def test_patch_moments_are_the_per_channel_mean_and_sample_std() -> None:
    patches = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    flat = patches.reshape(3, 20, 6).numpy()
    got = patch_moments(patches).numpy()
    assert got.shape == (3, 12)
    np.testing.assert_allclose(got[:, :6], flat.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(got[:, 6:], flat.std(axis=1, ddof=1), rtol=1e-12)
    low = patch_moments(patches.to(torch.bfloat16))
    assert low.dtype == torch.float32  # a bf16 variance would lose the small channels


# ----------------------------------------------------------------------------- a run that mixes


@pytest.fixture
def mixing_run(tiny_run):
    """The shared tiny run: the default preset mixes (its ONNX parity is in tests/test_onnx_export.py)."""
    from moleflow.config import load_run_config

    cfg = load_run_config(tiny_run / "config.yaml")
    assert cfg.router.feature == "patch_moments" and cfg.scoring.global_weight == 0.5
    return tiny_run


def test_a_mixing_run_scores_images_on_the_calibrated_mix(mixing_run) -> None:
    from moleflow.detector import Detector

    det = Detector.load(mixing_run)
    for t, name in enumerate(det.products):
        cal = det.records[name].calibration
        assert cal.fusion is not None and cal.fusion.weight == 0.5
        samples, _ = det._held_out(det.records[name])
        feats = det.features(samples)
        index = torch.full((len(feats),), t, dtype=torch.long)
        flow, mixed = det.score_flow(feats, index), det.score(feats, index)
        assert flow.image_scores.numpy() == pytest.approx(np.array(cal.scores), rel=1e-5)
        assert flow.distances.numpy() == pytest.approx(np.array(cal.distances), rel=1e-6)
        expected = cal.image_scores(flow.image_scores.numpy(), flow.distances.numpy())
        assert mixed.image_scores.numpy() == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert abs(float(mixed.image_scores.double().mean())) < 1e-4  # centred on its calibration normals
        assert torch.equal(mixed.patch_scores, flow.patch_scores)  # the maps are the flow's
        assert det.router.means.shape[1] == 2 * det.cfg.model.backbone.embed_dim  # mean and spread


def test_predictions_of_a_mixing_run_judge_the_mix(mixing_run) -> None:
    from moleflow.detector import Detector
    from moleflow.sources import resolve_source

    det = Detector.load(mixing_run)
    task = resolve_source("disc", "synthetic:disc", None, [20, 10], None).task
    images = [s.load_image() for s in task.test]
    preds = det.predict(images)
    scored = det.score(det.features(list(task.test)))
    for pred, score in zip(preds, scored.image_scores.tolist(), strict=True):
        cal = det.records[pred.product].calibration
        assert pred.score == pytest.approx(score, rel=1e-4, abs=1e-4)
        assert pred.verdict != "anomalous" or pred.score > cal.image_threshold or pred.unknown


def test_a_changed_weight_without_recalibration_is_refused(mixing_run) -> None:
    from moleflow.config import replace
    from moleflow.detector import Detector, DetectorError

    det = Detector.load(mixing_run, check_calibration=False)
    det.cfg = replace(det.cfg, scoring=replace(det.cfg.scoring, global_weight=0.3))
    samples, _ = det._held_out(det.records["disc"])
    with pytest.raises(DetectorError, match="recalibrate"):
        det.score(det.features(samples), torch.zeros(len(samples), dtype=torch.long))
    det.calibrate("disc", commit=False)
    assert math.isclose(det.records["disc"].calibration.fusion.weight, 0.3)


def test_a_calibration_record_with_an_unknown_fusion_is_a_clear_error() -> None:
    from moleflow.calibration import CalibrationError

    data = _calibration(0.3).to_json()
    data["fusion"] = {"weight": 0.3, "score_mean": 1.0, "score_std": 1.0, "distance_mean": 2.0, "distance_std": 1.0}
    with pytest.raises(CalibrationError, match="does not match this moleflow version"):
        Calibration.from_json(data)
