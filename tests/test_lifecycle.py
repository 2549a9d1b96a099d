"""A model that grows with the factory: learn products in separate commands, forget one, predict; the run's
files, results and report agree after every step, and the products left are untouched bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from moleflow.cli import main
from moleflow.data.synthetic import render_sample
from moleflow.detector import Detector, TaskExistsError
from tests.helpers import learn_args


def _images(kind: str, n: int = 3, defective: bool = False) -> list[np.ndarray]:
    return [render_sample(kind, "test", 100 + i, defective=defective)[0] for i in range(n)]


def _consistent(run) -> list[str]:
    """The products, asserting that the index, the checkpoint files, results.json and report.md agree."""
    index = json.loads((run / "tasks.json").read_text())
    names = [t["name"] for t in index["tasks"]]
    results = json.loads((run / "results.json").read_text())
    assert results["tasks"] == names
    assert sorted(p.stem for p in (run / "checkpoints" / "tasks").glob("*.safetensors")) == sorted(names)
    assert results["thresholds"] == {t["name"]: t["calibration"]["image_threshold"] for t in index["tasks"]}
    assert list(results["calibration"]) == names
    for metric in results["metrics"].values():
        assert len(metric["matrix"]) == len(names) and all(len(row) == len(names) for row in metric["matrix"])
    report = (run / "report.md").read_text()
    assert f"Tasks, in training order: {', '.join(names)}" in report
    figures = {p.name for p in (run / "figures").glob("examples_*.png")}
    assert figures <= {f"examples_{n}.png" for n in names}  # no figure of a forgotten product is left
    assert [t.name for t in Detector.load(run).tasks()] == names
    return names


def test_learn_in_separate_processes_forget_and_predict(tmp_path):
    run = tmp_path / "run"
    assert main(learn_args(run, "stripes=synthetic:stripes")) == 0
    assert _consistent(run) == ["stripes"]
    stripes_before = Detector.load(run).predict(_images("stripes", defective=True))

    code = subprocess.run(
        [sys.executable, "-m", "moleflow", *learn_args(run, "disc=synthetic:disc", extra=("--eval", "new"))],
        capture_output=True,
        text=True,
    )
    assert code.returncode == 0, code.stderr
    assert _consistent(run) == ["stripes", "disc"]
    assert main(learn_args(run, "dots=synthetic:dots")) == 0
    assert _consistent(run) == ["stripes", "disc", "dots"]

    detector = Detector.load(run)
    probe = _images("stripes", defective=True) + _images("dots")
    before = detector.predict(probe)
    assert [p.product for p in before] == ["stripes"] * 3 + ["dots"] * 3
    for old, new in zip(stripes_before, before[:3], strict=True):  # learning disc and dots changed nothing of stripes
        assert old.score == new.score and np.array_equal(old.anomaly_map, new.anomaly_map)

    assert main(["forget", str(run), "disc"]) == 0
    assert _consistent(run) == ["stripes", "dots"]
    assert not (run / "checkpoints" / "tasks" / "disc.safetensors").exists()
    after = Detector.load(run).predict(probe)
    for b, a in zip(before, after, strict=True):
        assert (b.product, b.score, b.routing_distance, b.verdict) == (a.product, a.score, a.routing_distance, a.verdict)
        assert np.array_equal(b.anomaly_map, a.anomaly_map) and np.array_equal(b.mask, a.mask)


def test_noise_blank_masks_and_other_products_are_unknown(tiny_run):
    rng = np.random.default_rng(0)
    mask = (render_sample("disc", "test", 1, defective=True)[1] * 255).astype(np.uint8)
    strangers = [
        rng.integers(0, 256, (128, 128, 3), dtype=np.uint8),
        np.full((128, 128, 3), 255, np.uint8),
        np.zeros((90, 160, 3), np.uint8),
        mask,
        *_images("grid"),
    ]
    detector = Detector.load(tiny_run)
    predictions = detector.predict(strangers)
    assert [p.verdict for p in predictions] == ["unknown product"] * len(strangers)
    assert all(p.unknown and p.to_json()["product"] is None for p in predictions)
    known = detector.predict(_images("disc") + _images("stripes"))
    assert [p.product for p in known] == ["disc"] * 3 + ["stripes"] * 3
    assert not any(p.unknown for p in known)


def test_a_name_that_exists_is_refused_unless_replaced(run_copy, capsys):
    before = (run_copy / "checkpoints" / "tasks" / "disc.safetensors").read_bytes()
    assert main(learn_args(run_copy, "disc=synthetic:disc")) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run_copy / "checkpoints" / "tasks" / "disc.safetensors").read_bytes() == before
    with pytest.raises(TaskExistsError):
        Detector.load(run_copy).learn("disc", "synthetic:disc")
    assert main(learn_args(run_copy, "disc=synthetic:dots", extra=("--replace",))) == 0
    assert _consistent(run_copy) == ["stripes", "disc"]
    assert "synthetic:dots" in json.loads((run_copy / "tasks.json").read_text())["tasks"][1]["source"]


def test_config_options_are_refused_on_an_existing_run(run_copy, capsys):
    assert main(["learn", str(run_copy), "dots=synthetic:dots", "--set", "train.epochs=5"]) == 2
    assert "new runs only" in capsys.readouterr().err
    assert _consistent(run_copy) == ["stripes", "disc"]


def test_tasks_lists_calibration_and_test_results(tiny_run, capsys):
    assert main(["tasks", str(tiny_run)]) == 0
    out = capsys.readouterr().out
    assert "stripes" in out and "disc" in out and "holdout (4)" in out
    assert main(["tasks", str(tiny_run), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["stripes", "disc"]
    for row in rows:
        assert row["train_images"] == 16 and row["calibration"]["images"] == 4  # 20 training images, 20 % held out
        assert row["calibration"]["image_fpr"] == 0.01
        assert set(row["test"]) >= {"recall", "false_alarm_rate", "unknown_rate"}
        assert "scores" not in row["calibration"]  # the stored values stay in tasks.json


def test_calibrate_at_another_rate_by_hand_and_on_images(run_copy, tmp_path, capsys):
    from PIL import Image

    from moleflow.calibration import threshold_at_fpr

    record = Detector.load(run_copy).records["disc"]
    assert main(["calibrate", str(run_copy), "disc", "--fpr", "0.3", "--no-eval"]) == 0
    after = Detector.load(run_copy).records["disc"].calibration
    before = record.calibration
    assert before.fusion is not None  # the default mixes the routing distance into the image score
    assert after.image_threshold == threshold_at_fpr(before.image_scores(before.scores, before.distances), 0.3).value
    assert after.image_fpr == 0.3 and after.unknown_threshold == record.calibration.unknown_threshold
    assert main(["calibrate", str(run_copy), "disc", "--threshold", "123.5", "--no-eval"]) == 0
    manual = Detector.load(run_copy).records["disc"].calibration
    assert manual.image_threshold == 123.5 and manual.image_rule == "manual" and manual.image_fpr is None
    folder = tmp_path / "normals"
    folder.mkdir()
    for i, image in enumerate(_images("disc", n=5)):
        Image.fromarray(image).save(folder / f"{i}.png")
    assert main(["calibrate", str(run_copy), "disc", "--calib", str(folder)]) == 0
    images = Detector.load(run_copy).records["disc"].calibration
    assert images.method == "images" and images.images == 5
    assert _consistent(run_copy) == ["stripes", "disc"]
    capsys.readouterr()
    assert main(["calibrate", str(run_copy), "nope", "--fpr", "0.1"]) == 2
    assert "no product 'nope'" in capsys.readouterr().err


def test_python_api_accepts_paths_pil_arrays_and_tensors(tiny_run, tmp_path):
    import torch
    from PIL import Image

    image = _images("disc", n=1, defective=True)[0]
    path = tmp_path / "part.png"
    Image.fromarray(image).save(path)
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    detector = Detector.load(tiny_run)
    preds = detector.predict([path, str(path), Image.open(path), image, torch.from_numpy(image).permute(2, 0, 1), tensor])
    first = preds[0]
    assert first.anomaly_map.shape == first.mask.shape == image.shape[:2]
    for p in preds[1:]:
        assert p.product == first.product and p.score == pytest.approx(first.score, abs=1e-4)
    assert detector.predict(image)[0].score == first.score  # a single image, not a list
    assert len(detector.predict(np.stack([image, image]))) == 2  # a (N, H, W, 3) batch
    with pytest.raises(ValueError, match="cannot read an image"):
        detector.predict([{"not": "an image"}])
