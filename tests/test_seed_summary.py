"""benchmarks/seed_summary.py: mean and spread over seeds, the comparison with PatchCore, the verdict table."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "seed_summary.py"


@pytest.fixture(scope="module")
def seed_summary():
    spec = importlib.util.spec_from_file_location("seed_summary", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp: Path, seed: int, image_auroc: float, pixel_ap: float | None, recall: float) -> Path:
    out = tmp / f"s{seed}"
    out.mkdir()
    row = {
        "routed": {"image_auroc": image_auroc, "pixel_auroc": None, "pixel_ap": pixel_ap, "aupro": None},
        "patchcore": {"image_auroc": 0.9, "pixel_ap": 0.5},
    }
    summary = {"command": f"sweep {seed}", "seed": 0, "config": {"train": {"seed": seed}}, "tasks": {"a": row}}
    results = {"routing": {"accuracy": 0.99 + 0.005 * seed}, "calibration": {"a": {"test": {"recall": recall}}}}
    (out / "summary.json").write_text(json.dumps(summary))
    (out / "results.json").write_text(json.dumps(results))
    return out


def test_means_sample_spread_and_the_comparison_with_patchcore(seed_summary, tmp_path):
    cases = ((0, 0.8, 0.4, 0.5), (1, 1.0, 0.6, 0.7))  # seed, image AUROC, pixel AP, recall
    runs = [seed_summary.load_run(_run(tmp_path, s, auc, ap, r)) for s, auc, ap, r in cases]
    agg = seed_summary.aggregate(runs)
    assert agg["seeds"] == [0, 1]  # the runs' own train.seed, not the sweep's --seed
    image = agg["tasks"]["a"]["metrics"]["image_auroc"]
    assert image["routed"] == pytest.approx((0.9, 0.1414213562))  # mean 0.9, sample std sqrt(0.02)
    assert image["patchcore"] == 0.9 and image["at_or_above"] is True  # equal counts as at or above
    pixel_ap = agg["tasks"]["a"]["metrics"]["pixel_ap"]
    assert pixel_ap["routed"][0] == pytest.approx(0.5) and pixel_ap["at_or_above"] is True
    assert agg["tasks"]["a"]["metrics"]["aupro"] == {"routed": None, "patchcore": None, "at_or_above": None}
    assert agg["routing"] == pytest.approx((0.9925, 0.0035355339))
    assert agg["tasks"]["a"]["verdict"]["recall"] == pytest.approx((0.6, 0.1414213562))
    assert agg["tasks"]["a"]["verdict"]["false_alarm_rate"] is None
    text = seed_summary.markdown(agg, ["sweep 0", "sweep 1"])
    assert "| a | 90.0 ± 14.1 / 90.0 ✓ |" in text and "0 cells below" in text


def test_runs_of_different_tasks_are_refused(seed_summary, tmp_path):
    a = seed_summary.load_run(_run(tmp_path, 0, 0.8, None, 0.5))
    b = seed_summary.load_run(_run(tmp_path, 1, 0.8, None, 0.5))
    b["summary"]["tasks"]["b"] = b["summary"]["tasks"]["a"]
    with pytest.raises(SystemExit, match="different tasks"):
        seed_summary.aggregate([a, b])
