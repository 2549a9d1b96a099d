"""Report and figure writing on a fake two-task results dict (one task without masks, null pixel metrics)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moleflow.report import TaskExamples, format_summary_table, pct, write_report
from moleflow.visualize import overlay_heatmap, save_png, save_prediction_figure

TASKS = ["bottle", "solar_mono"]


def _metric(matrix: list[list[float | None]], final_mean: float | None, forgetting: float | None) -> dict:
    return {"matrix": matrix, "final": matrix[-1], "final_mean": final_mean, "forgetting": forgetting}


def fake_results() -> dict:
    # solar_mono has no masks: its pixel metrics are null.
    return {
        "tasks": TASKS,
        "metrics": {
            "image_auroc": _metric([[0.9512, None], [0.9123, 0.8456]], 0.8790, 0.0389),
            "pixel_auroc": _metric([[0.9701, None], [0.9656, None]], 0.9656, 0.0046),
            "pixel_ap": _metric([[0.5512, None], [0.5234, None]], 0.5234, 0.0278),
            "aupro": _metric([[0.8811, None], [0.8702, None]], 0.8702, None),
        },
        "metrics_oracle": {
            "image_auroc": _metric([[0.9512, None], [0.9377, 0.8612]], 0.8994, 0.0135),
            "pixel_auroc": _metric([[0.9701, None], [0.9688, None]], 0.9688, 0.0013),
            "pixel_ap": _metric([[0.5512, None], [0.5401, None]], 0.5401, 0.0111),
            "aupro": _metric([[0.8811, None], [0.8790, None]], 0.8790, 0.0021),
        },
        "routing": {"accuracy": 0.975, "confusion": [[19, 1], [0, 20]]},
        "timing": {"feature_seconds": [3.25, 4.5], "train_seconds": [61.0, 42.75], "inference_ms_per_image": 12.34},
        "params": {"backbone": 4_000_000, "base": 1_234_567, "per_task": [1_234_567, 45_678]},
        "environment": {"device": "cpu", "torch": "2.x", "moleflow": "0.1.0"},
    }


def fake_examples(size: int = 32) -> dict[str, TaskExamples]:
    rng = np.random.default_rng(0)
    out = {}
    for k, task in enumerate(TASKS):
        images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(3)]
        maps = [rng.random((size, size)) for _ in range(3)]
        if k == 0:
            mask = np.zeros((size, size), dtype=np.uint8)
            mask[8:16, 8:16] = 1
            masks: list[np.ndarray | None] = [None, mask, mask]
        else:
            masks = [None, None, None]
        all_labels = np.array([0] * 10 + [1] * 10)
        scores = rng.normal(size=20) + all_labels
        out[task] = TaskExamples(task, images, maps, masks, [0, 1, 1], scores, all_labels, threshold=0.5 if k == 0 else None)
    return out


def test_write_report(tmp_path: Path) -> None:
    path = write_report(tmp_path, fake_results(), fake_examples())
    assert path == tmp_path / "report.md" and path.is_file()
    text = path.read_text(encoding="utf-8")
    for task in TASKS:
        assert task in text
        assert (tmp_path / "figures" / f"examples_{task}.png").is_file()
        assert (tmp_path / "figures" / f"scores_{task}.png").is_file()
    assert (tmp_path / "figures" / "routing_confusion.png").is_file()
    # Percentages with one decimal: final routed/oracle values, means, matrix, forgetting, routing.
    for value in ("91.2", "84.6", "96.6", "52.3", "87.0", "93.8", "86.1", "87.9", "89.9", "95.1", "3.9", "97.5"):
        assert value in text, value
    assert "–" in text  # null pixel metrics of the mask-less task, upper triangle, null forgetting
    assert "| solar_mono | 84.6 | – | – | – |" in text
    assert "12.34 ms" in text and "1,234,567" in text and "45,678" in text
    links = re.findall(r"\]\((figures/[^)]+\.png)\)", text)
    assert len(links) == 5
    for link in links:
        assert (tmp_path / link).is_file()
        assert Image.open(tmp_path / link).size[0] > 0
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no temporary files left behind


def test_write_report_single_task_without_oracle_or_examples(tmp_path: Path) -> None:
    results = fake_results()
    del results["metrics_oracle"], results["timing"], results["params"]
    results["tasks"] = ["bottle"]
    for sec in results["metrics"].values():
        sec["matrix"] = [sec["matrix"][0][:1]]
        sec["final"] = sec["matrix"][-1]
        sec["forgetting"] = None
    results["metrics"]["pixel_ap"]["final_mean"] = None
    results["routing"] = {"accuracy": None, "confusion": [[5]]}
    examples = {"bottle": fake_examples()["solar_mono"]}  # no masks at all
    text = write_report(tmp_path, results, examples).read_text(encoding="utf-8")
    assert "oracle" not in text.lower()
    assert "95.1" in text and "–" in text
    for link in re.findall(r"\]\((figures/[^)]+\.png)\)", text):
        assert (tmp_path / link).is_file()


def test_write_report_rejects_results_without_tasks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tasks"):
        write_report(tmp_path, {"metrics": {}}, {})


def test_task_examples_checks_lengths() -> None:
    ex = fake_examples()["bottle"]
    with pytest.raises(ValueError, match="one entry per example"):
        TaskExamples("x", ex.images, ex.maps[:1], ex.masks, ex.labels, ex.scores, ex.all_labels)


def test_pct() -> None:
    assert pct(0.9123) == "91.2"
    assert pct(1.0) == "100.0"
    assert pct(None) == "–" and pct(float("nan")) == "–"


def test_overlay_heatmap_shape_and_hot_corner() -> None:
    image = np.full((32, 48, 3), 128, dtype=np.uint8)
    amap = np.zeros((8, 12))  # smaller than the image: resized bilinearly
    amap[0, 0] = 1.0
    out = overlay_heatmap(image, amap, vmin=0.0, vmax=1.0, alpha=0.6)
    assert out.shape == image.shape and out.dtype == np.uint8
    red = out[..., 0].astype(int)
    # jet runs blue -> red; the map's maximum is the reddest point relative to the cold region
    assert red[0, 0] > red[16:, 24:].max()
    assert red[0, 0] > red[-1, -1] and out[-1, -1, 2] > out[-1, -1, 0]  # cold corner is blue
    assert out[0, 0, 0] > out[0, 0, 1] and out[0, 0, 0] > out[0, 0, 2]  # hot corner: red dominates
    # alpha = 0 leaves the image untouched
    assert np.array_equal(overlay_heatmap(image, amap, 0.0, 1.0, alpha=0.0), image)


def test_overlay_heatmap_rejects_bad_image() -> None:
    with pytest.raises(ValueError, match="uint8"):
        overlay_heatmap(np.zeros((8, 8, 3), dtype=np.float32), np.zeros((8, 8)), 0.0, 1.0)


def test_save_png_and_prediction_figure(tmp_path: Path) -> None:
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    save_png(image, tmp_path / "a" / "img.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "img.png")), image)
    mask = np.zeros((32, 32))
    mask[4:10, 4:10] = 1
    for m, name in ((mask, "with_mask.png"), (None, "no_mask.png")):
        path = save_prediction_figure(
            image,
            np.random.default_rng(2).random((16, 16)),
            tmp_path / name,
            title="bottle | score 1.23 | anomalous",
            center=0.2,
            threshold=0.7,
            defect=m,
        )
        assert path.is_file() and Image.open(path).size[0] > 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["no_mask.png", "with_mask.png"]


def test_product_scale_puts_the_threshold_in_the_middle_of_the_colour_bar() -> None:
    import matplotlib

    from moleflow.visualize import product_scale

    amap = np.array([[0.2, 0.7], [1.2, 5.0]])
    scaled = product_scale(amap, center=0.2, threshold=0.7)
    assert scaled.ravel().tolist() == pytest.approx([0.0, 1.0, 2.0, 9.6], rel=1e-6)
    grey = np.full((2, 2, 3), 128, np.uint8)
    out = overlay_heatmap(grey, scaled, 0.0, 2.0, alpha=1.0)  # the figure's range
    jet = matplotlib.colormaps["jet"]
    assert out[0, 1].tolist() == np.rint(np.asarray(jet(0.5)[:3]) * 255).astype(int).tolist()
    assert out[1, 0].tolist() == out[1, 1].tolist()  # everything beyond 2x the threshold looks the same


def test_format_summary_table() -> None:
    table = format_summary_table(fake_results())
    lines = table.splitlines()
    assert lines[0].split() == ["task", "img", "AUROC", "pix", "AUROC", "pix", "AP", "AUPRO", "oracle", "img"]
    bottle = next(line for line in lines if line.startswith("bottle"))
    assert bottle.split() == ["bottle", "91.2", "96.6", "52.3", "87.0", "93.8"]
    solar = next(line for line in lines if line.startswith("solar_mono"))
    assert solar.split() == ["solar_mono", "84.6", "–", "–", "–", "86.1"]
    mean = next(line for line in lines if line.startswith("mean"))
    assert mean.split() == ["mean", "87.9", "96.6", "52.3", "87.0", "89.9"]
    assert "routing accuracy: 97.5%" in table
    assert len({len(line) for line in lines[:-1] if not line.startswith("-")}) == 1  # fixed width columns
    # Without the oracle section the oracle column is all nulls, never an error.
    results = copy.deepcopy(fake_results())
    del results["metrics_oracle"]
    assert "oracle" in format_summary_table(results)


def test_newer_metrics_and_operating_points_show_when_present(tmp_path: Path) -> None:
    results = copy.deepcopy(fake_results())
    results["metrics"]["image_ap"] = _metric([[0.9, None], [0.8, 0.7]], 0.75, 0.1)
    results["metrics"]["pro_at_threshold"] = _metric([[0.5, None], [0.4321, None]], 0.4321, None)
    results["operating_points"] = {
        "bottle": {"image_f1_threshold": 1.5, "pixel_f1_threshold": 0.25, "pro_threshold": 2.0},
        "solar_mono": {"image_f1_threshold": 3.0, "pixel_f1_threshold": None, "pro_threshold": None},
    }
    lines = format_summary_table(results).splitlines()
    head = ["task", "img", "AUROC", "pix", "AUROC", "pix", "AP", "AUPRO", "img", "AP", "PRO@thr", "oracle", "img"]
    assert lines[0].split() == head
    assert "img F1" not in lines[0]  # absent from these results: no column of dashes
    bottle = next(line for line in lines if line.startswith("bottle"))
    assert bottle.split() == ["bottle", "91.2", "96.6", "52.3", "87.0", "80.0", "43.2", "93.8"]
    text = write_report(tmp_path, results, {}).read_text()
    assert "| Image AP | PRO at threshold |" in text  # summary columns after the first four
    assert "## Operating points" in text
    assert "| bottle | 1.5 | 0.25 | 2 |" in text and "| solar_mono | 3 | – | – |" in text
