"""ONNX export and the onnxruntime detector: valid graphs with LoRA merged, a manifest holding the thresholds,
predictions equal to torch's (routing, verdicts, scores within 1e-4 of their scale, maps), incremental re-export,
and predicting an export with neither torch nor timm imported."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from moleflow.cli import main  # noqa: E402
from moleflow.data.synthetic import render_sample  # noqa: E402
from moleflow.deploy.manifest import MANIFEST, ExportError, Manifest  # noqa: E402
from moleflow.deploy.runtime import OnnxDetector  # noqa: E402
from moleflow.detector import Detector  # noqa: E402
from tests.helpers import learn_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCORE_RTOL = 1e-4
MAP_RTOL = 1e-4  # max |map difference| relative to the map's range


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "onnx"
    assert main(["export", str(tiny_run), "--format", "onnx", "--out", str(out), "--no-progress"]) == 0
    return out


def _images() -> tuple[list[np.ndarray], list[str]]:
    """Normal and defective images of both products, and images of no product (other kinds, noise, odd sizes)."""
    images, kinds = [], []
    for kind in ("stripes", "disc"):
        for i in range(2):
            for defective in (False, True):
                images.append(render_sample(kind, "test", 200 + i, defective=defective)[0])
                kinds.append(f"{kind}/{'defective' if defective else 'normal'}")
    rng = np.random.default_rng(3)
    foreign = [render_sample("dots", "test", 1, defective=False)[0], render_sample("grid", "test", 2, defective=True)[0]]
    foreign.append(rng.integers(0, 256, (300, 410, 3), dtype=np.uint8))  # not square, larger than 224
    return images + foreign, kinds + ["foreign"] * len(foreign)


def _hashes(directory: Path) -> dict[str, tuple[str, int]]:
    files = [p for p in directory.rglob("*") if p.is_file() and p.suffix in (".onnx", ".npz")]
    return {
        p.relative_to(directory).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in files
    }


# ----------------------------------------------------------------------------- the numpy side, by hand


def test_upsampling_and_smoothing_matrices_by_hand_and_against_torch() -> None:
    from moleflow.deploy.arrays import MapOperator, gaussian_matrix, image_scores, upsample_matrix
    from moleflow.scoring import aggregate, anomaly_maps

    # 2 -> 4 pixels, align_corners=False: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25 (upper neighbour clamped)
    assert np.allclose(upsample_matrix(2, 4), [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    g = gaussian_matrix(5, 0.5)  # radius 2: weights exp(-0.5 (k / 0.5)^2) for k = -2..2, normalised
    w = np.exp(-0.5 * (np.arange(-2, 3) / 0.5) ** 2)
    w /= w.sum()
    assert np.allclose(g[2], w) and np.allclose(g.sum(axis=1), 1.0)
    assert np.isclose(g[0, 0], w[0] + w[1] + w[2])  # edge replicated: three taps land on pixel 0
    scores = np.random.default_rng(0).normal(size=(3, 7, 5)).astype(np.float32) * 20
    for sigma in (4.0, 0.0):
        ours = MapOperator((7, 5), 64, sigma)(scores)
        ref = anomaly_maps(torch.from_numpy(scores), (64, 64), sigma).numpy()
        assert np.abs(ours - ref).max() <= 1e-5 * np.ptp(ref)
    for mode in ("top_k", "mean", "max"):
        np.testing.assert_allclose(image_scores(scores, mode, 3), aggregate(torch.from_numpy(scores), mode, 3), rtol=1e-6)


def test_preprocessing_matches_image_to_tensor_on_any_size() -> None:
    from moleflow.deploy.arrays import image_batch
    from moleflow.features.extractor import image_to_tensor

    rng = np.random.default_rng(1)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for shape in [(224, 224, 3), (300, 250, 3), (100, 90, 3), (17, 400, 3), (1000, 760, 3)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        ours = image_batch([image], 224, mean, std)[0]
        ref = (image_to_tensor(image, 224) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        assert np.abs(ours - ref.numpy()).max() < 1e-4, shape  # < 0.01 grey levels


def test_router_graph_is_the_mahalanobis_distance() -> None:
    import onnxruntime as ort

    from moleflow.deploy.graphs import router_graph

    rng = np.random.default_rng(2)
    x, means = rng.normal(size=(4, 6)), rng.normal(size=(3, 6))
    a = rng.normal(size=(3, 6, 6))
    precisions = a @ a.transpose(0, 2, 1) + np.eye(6)
    session = ort.InferenceSession(router_graph().SerializeToString(), providers=["CPUExecutionProvider"])
    (d,) = session.run(None, {"features": x, "means": means, "precisions": precisions})
    expected = [[(x[b] - means[t]) @ precisions[t] @ (x[b] - means[t]) for t in range(3)] for b in range(4)]
    np.testing.assert_allclose(d, expected, rtol=1e-12)


# ----------------------------------------------------------------------------- the export


def test_graphs_are_valid_and_heads_have_their_lora_merged(exported, tiny_run) -> None:
    manifest = Manifest.read(exported)
    cfg = Detector.load(tiny_run).cfg
    for entry in manifest.files():
        if entry.file.endswith(".onnx"):
            onnx.checker.check_model(str(exported / entry.file), full_check=True)
    for product in manifest.products:
        graph = onnx.load(str(exported / product.head.file)).graph
        linears = sum(node.op_type in ("MatMul", "Gemm") for node in graph.node)
        # merged: one matmul per subnet linear (2 per coupling) and per DIA linear (2 per block); unmerged LoRA
        # would add two more per coupling linear (A, then B)
        assert linears == 2 * cfg.model.flow.coupling_layers + 2 * cfg.model.dia.blocks
        assert [i.name for i in graph.input] == ["patches"] and [o.name for o in graph.output] == ["scores"]


def test_manifest_holds_thresholds_preprocessing_versions_and_ids(exported, tiny_run) -> None:
    from moleflow import __version__

    det = Detector.load(tiny_run)
    manifest = Manifest.read(exported)
    assert manifest.moleflow == __version__ and manifest.base_id == det.base_id
    assert manifest.names == det.products == ["stripes", "disc"]
    assert manifest.preprocessing["image_size"] == det.cfg.model.backbone.image_size == 224
    assert manifest.preprocessing["mean"] == list(det.extractor.backbone.mean)
    assert manifest.scoring == det.scoring_settings()
    for product in manifest.products:
        record = det.records[product.name]
        assert product.parts_id == record.parts_id
        cal = product.record["calibration"]
        for key in ("image_threshold", "image_center", "pixel_threshold", "pixel_center", "unknown_threshold"):
            assert cal[key] == getattr(record.calibration, key)


def _measure(torch_preds, onnx_preds) -> dict[str, float]:
    """Assert the parity bounds; return the worst relative score and map differences measured."""
    worst = {"score": 0.0, "normalized": 0.0, "map": 0.0, "mask_pixels": 0.0}
    for t, o in zip(torch_preds, onnx_preds, strict=True):
        assert (o.product, o.unknown, o.verdict, o.image_size) == (t.product, t.unknown, t.verdict, t.image_size)
        # the default's image score is standardised on normals (0 = a typical one, 1 = one spread), so its
        # rounding is relative to that scale, not to the score (which may lie near 0)
        scale = max(1.0, abs(t.score))
        worst["score"] = max(worst["score"], abs(o.score - t.score) / scale)
        assert o.score == pytest.approx(t.score, abs=SCORE_RTOL * scale)
        assert o.routing_distance == pytest.approx(t.routing_distance, rel=SCORE_RTOL)
        worst["normalized"] = max(worst["normalized"], abs(o.normalized_score - t.normalized_score))
        span = (t.threshold - t.score) / (1.0 - t.normalized_score) if t.normalized_score != 1.0 else 1.0  # thr - centre
        assert o.normalized_score == pytest.approx(t.normalized_score, abs=SCORE_RTOL * scale / abs(span))
        assert o.anomaly_map.shape == t.anomaly_map.shape and o.anomaly_map.dtype == np.float32
        worst["map"] = max(worst["map"], float(np.abs(o.anomaly_map - t.anomaly_map).max() / np.ptp(t.anomaly_map)))
        assert worst["map"] <= MAP_RTOL
        worst["mask_pixels"] = max(worst["mask_pixels"], float((o.mask != t.mask).mean()))
        assert worst["mask_pixels"] <= 1e-3  # only pixels within rounding of the threshold may differ
    return worst


def _rejudged(predictions, thresholds: dict[str, float]):
    """The predictions judged again under other image thresholds (same maps, scores and distances)."""
    from moleflow.prediction import make_prediction

    out = []
    for p, cal in ((p, thresholds[p.product]) for p in predictions):
        out.append(make_prediction(p.source, p.image_size, p.product, cal, p.score, p.routing_distance, p.anomaly_map))
    return out


def test_onnx_predictions_match_torch_for_every_product(exported, tiny_run) -> None:
    images, kinds = _images()
    torch_det, onnx_det = Detector.load(tiny_run), OnnxDetector.load(exported)
    assert all(r.calibration.fusion is not None for r in onnx_det.records.values())  # the default mixes scores
    torch_preds, onnx_preds = torch_det.predict(images, batch_size=5), onnx_det.predict(images, batch_size=5)
    known = [k.split("/")[0] for k in kinds if k != "foreign"]
    assert [p.product for p, k in zip(torch_preds, kinds, strict=True) if k != "foreign"] == known
    assert {p.verdict for p, k in zip(torch_preds, kinds, strict=True) if k == "foreign"} == {"unknown product"}
    worst = _measure(torch_preds, onnx_preds)
    # image thresholds between the products' scores: anomalous verdicts and defect masks are compared too
    thresholds = {}
    for name, record in torch_det.records.items():
        scores = sorted(p.score for p in torch_preds if p.product == name and not p.unknown)
        middle = len(scores) // 2
        thresholds[name] = record.calibration.with_threshold(0.5 * (scores[middle - 1] + scores[middle]))
    torch_preds, onnx_preds = _rejudged(torch_preds, thresholds), _rejudged(onnx_preds, thresholds)
    assert {"normal", "anomalous", "unknown product"} == {p.verdict for p in torch_preds}
    assert any(p.mask.any() for p in torch_preds)
    rejudged = _measure(torch_preds, onnx_preds)  # its normalised scores divide by the made-up thresholds' tiny spans
    print(
        f"\nonnx vs torch, {len(images)} images, calibrated thresholds: "
        + ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
        + f"; mid thresholds: mask_pixels {rejudged['mask_pixels']:.2e}"
    )


def test_detector_load_of_an_export_is_the_onnx_runtime(exported) -> None:
    det = Detector.load(exported)
    assert isinstance(det, OnnxDetector) and det.products == ["stripes", "disc"] and "disc" in det
    assert (
        det.records["disc"].calibration.image_threshold
        == Manifest.read(exported).products[1].record["calibration"]["image_threshold"]
    )


FORBID_TORCH = """
import importlib.abc, sys
class Forbid(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "timm", "torchvision"):
            raise ImportError("forbidden import: " + name)
sys.meta_path.insert(0, Forbid())
from moleflow.cli import main
code = main(sys.argv[1:])
assert not {"torch", "timm"} & set(sys.modules), sorted(sys.modules)
sys.exit(code)
"""


def test_predict_on_an_export_imports_neither_torch_nor_timm(exported, tmp_path) -> None:
    from PIL import Image

    images, _ = _images()
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images[:4] + images[-2:]):
        Image.fromarray(image).save(folder / f"{i}.png")
    out = tmp_path / "predictions"
    command = [
        sys.executable,
        "-c",
        FORBID_TORCH,
        "predict",
        "--runtime",
        "onnx",
        str(exported),
        str(folder),
        "--out",
        str(out),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((out / "predictions.json").read_text())
    expected = OnnxDetector.load(exported).predict(sorted(folder.iterdir()))
    assert [(r["nearest_product"], r["verdict"], r["score"]) for r in rows] == [
        (p.product, p.verdict, p.score) for p in expected
    ]
    assert all(Path(r["heatmap"]).is_file() for r in rows)


def test_predict_refuses_to_compile_an_export(exported, tmp_path, capsys) -> None:
    from PIL import Image

    Image.fromarray(_images()[0][0]).save(tmp_path / "a.png")
    out = tmp_path / "predictions"
    assert main(["predict", str(exported), str(tmp_path / "a.png"), "--out", str(out), "--compile"]) == 2
    assert "--compile is for the torch runtime" in capsys.readouterr().err
    assert not out.exists()


def test_the_runtime_library_needs_only_numpy_pillow_and_onnxruntime(exported, tmp_path) -> None:
    code = (
        "import sys\n"
        "from moleflow.deploy.runtime import OnnxDetector\n"
        f"p = OnnxDetector.load({str(exported)!r}).predict([__import__('numpy').zeros((50, 70, 3), 'uint8')])[0]\n"
        "assert p.anomaly_map.shape == (50, 70), p.anomaly_map.shape\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = set(done.stdout.split())
    assert {"numpy", "PIL", "onnxruntime"} <= loaded
    heavy = {"torch", "timm", "scipy", "matplotlib", "sklearn", "pydantic", "yaml", "tifffile", "safetensors", "onnx"}
    assert not heavy & loaded, heavy & loaded


def test_exporting_again_writes_only_what_changed(exported, run_copy, tmp_path, capsys) -> None:
    import shutil

    out = tmp_path / "export"
    shutil.copytree(exported, out)  # run_copy is a copy of tiny_run: the same base and parts ids
    first = _hashes(out)
    assert len(first) == 6  # backbone, router, and a head + a prototype per product

    assert main(learn_args(run_copy, "dots=synthetic:dots", extra=("--eval", "none"))) == 0
    capsys.readouterr()
    assert main(["export", str(run_copy), "--out", str(out)]) == 0
    assert "2 file(s) written, 6 kept, 0 removed" in capsys.readouterr().out
    second = _hashes(out)
    assert {k: v for k, v in second.items() if k in first} == first  # untouched: same bytes, same mtime
    new = sorted(set(second) - set(first))
    assert [Path(f).name.split("-")[0] for f in new] == ["dots", "dots"] and Manifest.read(out).names == [
        "stripes",
        "disc",
        "dots",
    ]
    dots = render_sample("dots", "test", 7, defective=True)[0]
    assert OnnxDetector.load(out).predict(dots)[0].score == pytest.approx(
        Detector.load(run_copy).predict(dots)[0].score, rel=SCORE_RTOL, abs=SCORE_RTOL
    )

    assert main(["forget", str(run_copy), "disc"]) == 0
    # below every normal's score (the default's score is standardised on normals: 0 is a typical one)
    assert main(["calibrate", str(run_copy), "stripes", "--threshold=-5", "--no-eval"]) == 0
    report = Detector.load(run_copy).export(out)
    assert report.written == [] and sorted(Path(f).name.split("-")[0] for f in report.removed) == ["disc", "disc"]
    third = _hashes(out)
    assert third == {k: v for k, v in second.items() if not Path(k).name.startswith("disc-")}  # nothing written
    det = OnnxDetector.load(out)
    assert det.products == ["stripes", "dots"] and det.records["stripes"].calibration.image_threshold == -5.0
    stripes = render_sample("stripes", "test", 0, defective=False)[0]
    assert det.predict(stripes)[0].verdict == "anomalous"  # the threshold is data: no graph changed, the verdict did


def test_export_without_the_onnx_extra_fails_in_one_line(tiny_run, tmp_path, monkeypatch, capsys) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'moleflow[onnx]'" in err and not (tmp_path / "e").exists()


def test_export_refuses_a_run_with_a_bf16_backbone(tiny_run, tmp_path, monkeypatch, capsys) -> None:
    from moleflow.config import apply_overrides

    real = Detector.load

    def load_as_bf16(cls, *args, **kwargs):
        det = real(*args, **kwargs)
        det.cfg = apply_overrides(det.cfg, ["model.backbone.precision=bf16"])
        return det

    monkeypatch.setattr(Detector, "load", classmethod(load_as_bf16))
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.backbone.precision=bf16" in err and not (tmp_path / "e").exists()


def test_bad_export_targets_and_damaged_exports_fail_in_one_line(exported, tiny_run, tmp_path, capsys) -> None:
    import shutil

    from PIL import Image

    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    assert main(["export", str(tiny_run), "--out", str(stray)]) == 2
    assert "not empty and holds no export" in capsys.readouterr().err
    assert (stray / "notes.txt").read_text() == "mine"
    assert main(["export", str(tiny_run), "--out", str(tiny_run)]) == 2
    assert "is a run directory" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "e")]) == 2
    assert "no run directory" in capsys.readouterr().err
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    assert main(["predict", "--runtime", "onnx", str(tiny_run), str(image)]) == 2
    assert "not an export directory" in capsys.readouterr().err
    assert main(["predict", "--runtime", "torch", str(exported), str(image)]) == 2
    assert "is an export directory" in capsys.readouterr().err

    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        Detector.load(tiny_run).export(tmp_path / "e", format="tflite")
    with pytest.raises(ValueError, match="bind the detector to a run directory"):
        Detector.create("offline").export(tmp_path / "e")
    assert not (tmp_path / "e").exists()

    damaged = tmp_path / "damaged"
    shutil.copytree(exported, damaged)
    head = damaged / Manifest.read(damaged).products[0].head.file
    head.write_bytes(head.read_bytes()[:-10])
    with pytest.raises(ExportError, match=f"^{head}: differs from its hash"):
        OnnxDetector.load(damaged)
    (damaged / MANIFEST).write_text("{")
    with pytest.raises(ExportError, match="is corrupt"):
        OnnxDetector.load(damaged)
