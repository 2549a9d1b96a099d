"""``moleflow predict RUN_DIR IMAGE_OR_DIR...``: routed product, score, verdict and heatmap per image.

Directories are walked recursively in name order; hidden files and directories, non-regular files (FIFOs,
sockets, dangling links), non-image files and ``ground_truth`` directories (MVTec masks) are skipped.
Heatmaps mirror each image's path relative to the directory it was found in, so two images with the same
file name never overwrite each other. One unreadable image does not stop the others: it is reported in
``predictions.json`` / ``predictions.csv`` and the exit status is 1.

``RUN_DIR`` may also be an export directory (``moleflow export``): it is then predicted with onnxruntime
(``--runtime onnx``, the default for an export), and neither torch nor timm is imported.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("moleflow")

SKIPPED_DIRS = ("ground_truth",)
CSV_FIELDS = (
    "image",
    "product",
    "nearest_product",
    "verdict",
    "score",
    "normalized_score",
    "threshold",
    "routing_distance",
    "routing_threshold",
    "defect_pixels",
    "heatmap",
    "error",
)


def add_parser(sub, common) -> None:
    r = sub.add_parser("predict", help="routed product, score, verdict and heatmap per image")
    r.add_argument("run_dir", metavar="RUN_OR_EXPORT_DIR")
    r.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    r.add_argument(
        "--runtime",
        choices=("torch", "onnx"),
        help="torch (a run directory) or onnx (an export directory, no torch needed); default: by the directory",
    )
    r.add_argument("--out", help="output directory (default: RUN_DIR/predictions)")
    r.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the run's config)")
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--no-heatmaps", action="store_true", help="write predictions.json/.csv only")
    r.add_argument(
        "--compile",
        action="store_true",
        help="torch runtime: run the backbone under torch.compile (same features, faster per image after a first "
        "call that compiles it: seconds to a minute; pays for many images)",
    )
    common(r)
    r.set_defaults(func=cmd_predict)


@dataclass(frozen=True)
class InputImage:
    path: Path
    relative: Path  # where its outputs go, under the output directory


def collect_inputs(items: list[str]) -> list[InputImage]:
    """Image files of ``items`` (files or directories; module docstring), with their output paths."""
    from moleflow.data.io import IMAGE_EXTENSIONS

    found: list[InputImage] = []
    directories = [Path(i) for i in items if Path(i).is_dir()]
    for item in map(Path, items):
        if item.is_dir():
            prefix = Path(item.resolve().name) if len(directories) > 1 else Path()
            for root, dirs, files in os.walk(item):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS)
                for name in sorted(files):
                    path = Path(root) / name
                    if name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
                        continue
                    found.append(InputImage(path, prefix / path.relative_to(item)))
        elif item.exists() and not item.is_file():
            raise ValueError(f"{item}: not a regular file (a FIFO, socket or device?); give image files or directories")
        elif item.exists() or item.is_symlink():
            found.append(InputImage(item, Path(item.name)))
        else:
            raise FileNotFoundError(f"{item}: no such image or directory")
    return found


def _heatmap_path(out_dir: Path, image: InputImage, taken: set[Path]) -> Path:
    stem = image.relative.with_suffix("")
    path = out_dir / f"{stem}_heatmap.png"
    k = 1
    while path in taken:
        path, k = out_dir / f"{stem}_{k}_heatmap.png", k + 1
    taken.add(path)
    return path


def _load(directory: str, runtime: str | None, options: dict):
    """The torch :class:`~moleflow.detector.Detector` of a run, or the onnxruntime detector of an export
    (imported only then, so that predicting an export never imports torch)."""
    from moleflow.deploy.manifest import is_export

    exported = is_export(directory)
    runtime = runtime or ("onnx" if exported else "torch")
    if runtime == "onnx":
        if not exported:
            raise ValueError(
                f"{directory} is not an export directory (no manifest.json); make one with "
                f"`moleflow export {directory} --out DIR`, or predict with --runtime torch"
            )
        from moleflow.deploy.runtime import OnnxDetector

        return OnnxDetector.load(directory, **options)
    if exported:
        raise ValueError(f"{directory} is an export directory: predict it with --runtime onnx (or give the run)")
    from moleflow.detector import Detector

    return Detector.load(directory, **options)


def cmd_predict(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    inputs = collect_inputs(args.images)
    if not inputs:
        raise ValueError(f"no image files found in {' '.join(args.images)} (hidden files and ground_truth/ are skipped)")
    options = {"progress": False} | ({"device": args.device} if args.device else {})
    if args.compile:
        from moleflow.deploy.manifest import is_export

        if args.runtime == "onnx" or is_export(args.run_dir):
            raise ValueError("--compile is for the torch runtime (a run directory); onnxruntime optimises an export itself")
    detector = _load(args.run_dir, args.runtime, options)
    if args.compile:
        detector.extractor.compile_backbone()
    out_dir = Path(args.out or Path(args.run_dir) / "predictions")
    rows, taken = [], set()
    for start in range(0, len(inputs), args.batch_size):
        rows += _predict_batch(detector, inputs[start : start + args.batch_size], out_dir, taken, not args.no_heatmaps)
    _write_outputs(rows, out_dir)
    failed = [r for r in rows if r.get("error")]
    summary = {v: sum(r.get("verdict") == v for r in rows) for v in ("normal", "anomalous", "unknown product")}
    print(
        f"\n{len(rows)} image(s): {summary['normal']} normal, {summary['anomalous']} anomalous, "
        f"{summary['unknown product']} unknown product, {len(failed)} unreadable; results in {out_dir / 'predictions.json'}"
    )
    return 1 if failed else 0


def _predict_batch(detector, batch: list[InputImage], out_dir: Path, taken: set[Path], heatmaps: bool) -> list[dict]:
    from moleflow.data.io import image_size, read_image

    images, readable, rows = [], [], []
    for item in batch:
        try:
            images.append(read_image(item.path, max_side=_max_side()))
            readable.append(item)
        except (ValueError, OSError) as e:
            log.warning("skipping %s: %s", item.path, e)
            rows.append({"image": str(item.path), "error": str(e)})
    for item, image, pred in zip(readable, images, detector.predict(images) if images else [], strict=True):
        row = {**pred.to_json(), "image": str(item.path), "image_size": list(image_size(item.path))}  # as stored
        if heatmaps:
            row["heatmap"] = str(_save_heatmap(detector, image, pred, _heatmap_path(out_dir, item, taken)))
        rows.append(row)
        print(
            f"{item.path}\tproduct={pred.product}\tscore={pred.score:.3f}\tnormalized={pred.normalized_score:.2f}"
            f"\t{pred.verdict}" + (f"\t{row['heatmap']}" if heatmaps else "")
        )
    return rows


def _max_side() -> int:
    from moleflow.maps import MAX_MAP_SIDE

    return MAX_MAP_SIDE


def _save_heatmap(detector, image, pred, path: Path) -> Path:
    from PIL import Image

    from moleflow.visualize import save_prediction_figure

    cal = detector.records[pred.product].calibration
    if image.shape[:2] != pred.anomaly_map.shape:
        image = Image.fromarray(image).resize(pred.anomaly_map.shape[::-1], Image.BILINEAR)
    title = f"{pred.product}: {pred.verdict} (score {pred.normalized_score:.2f} of threshold 1)"
    if pred.unknown:
        title = f"unknown product (nearest: {pred.product}, routing distance {pred.routing_distance:.3g})"
    import numpy as np

    return save_prediction_figure(
        np.asarray(image),
        pred.anomaly_map,
        path,
        title,
        center=cal.pixel_center,
        threshold=cal.pixel_threshold,
        defect=pred.mask if pred.anomalous else None,
    )


def _write_outputs(rows: list[dict], out_dir: Path) -> None:
    from moleflow.atomic import write_json_atomic, write_text_atomic

    write_json_atomic(rows, out_dir / "predictions.json")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(buffer.getvalue(), out_dir / "predictions.csv")
