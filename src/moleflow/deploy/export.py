"""``export_run(run_dir, out_dir)``: a run's backbone, router and product heads as ONNX graphs + manifest.

Incremental: every file is named by a key of what it holds (:func:`_key`: the product's parts id, the
run's base id, the model fingerprint, moleflow's version), and a file the previous manifest names under
the same key, unchanged on disk, is kept. So exporting a run again after ``moleflow learn`` writes only
the new product's files, after ``moleflow forget`` deletes the forgotten product's files, and after
``moleflow calibrate`` writes only the manifest (thresholds are data, not graph constants). The order
(new files, then the manifest atomically, then the deletions) keeps the directory valid through a kill
at any instant (:mod:`moleflow.deploy.manifest`).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moleflow import __version__
from moleflow.atomic import write_bytes_atomic, write_json_atomic
from moleflow.deploy.manifest import (
    FORMAT,
    MANIFEST,
    PRODUCTS,
    ExportError,
    FileEntry,
    Manifest,
    ProductEntry,
    is_export,
)

__all__ = ["ExportReport", "export_run"]

log = logging.getLogger(__name__)
EXAMPLE_BATCH = 2  # traced with 2 images, so no size-1 batch axis is folded into the graph


@dataclass
class ExportReport:
    """What one export did: files written, kept from the previous export, and deleted (relative paths)."""

    out_dir: Path
    products: list[str]
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join((FORMAT, __version__, *parts)).encode()).hexdigest()[:16]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _check_out_dir(out: Path, run_dir: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a directory for the export")
    if out.resolve() == run_dir.resolve() or (out / "tasks.json").is_file():
        raise ExportError(f"--out {out} is a run directory; export into a directory of its own")
    if out.is_dir() and not is_export(out):
        stray = [p.name for p in out.iterdir() if p.name != ".lock" and not p.name.endswith(".tmp")]
        if stray:
            raise ExportError(
                f"--out {out} is not empty and holds no export ({MANIFEST} missing; it has {sorted(stray)[:3]}); "
                "give a new or empty directory, or an earlier export of this run"
            )


def _previous(out: Path) -> Manifest | None:
    """The previous export's manifest, if there is a readable one."""
    if not is_export(out):
        return None
    try:
        return Manifest.read(out)
    except ExportError as e:
        log.warning("previous export ignored, every graph is written anew: %s", e)
        return None


class _Writer:
    """Writes a file unless the previous manifest names it unchanged; records what it did."""

    def __init__(self, out: Path, previous: Manifest | None, report: ExportReport) -> None:
        self.out, self.report = out, report
        self.previous = {f.file: f for f in previous.files()} if previous is not None else {}

    def kept(self, relative: str) -> FileEntry | None:
        """The previous export's entry of ``relative`` when that file is there unchanged."""
        old = self.previous.get(relative)
        if old is not None and old.matches(self.out):
            self.report.kept.append(relative)
            return old
        return None

    def file(self, relative: str, write: Callable[[Path], object]) -> FileEntry:
        old = self.kept(relative)
        if old is not None:
            return old
        write(self.out / relative)
        self.report.written.append(relative)
        log.debug("wrote %s", self.out / relative)
        return FileEntry.of(self.out, self.out / relative)


def _save_prototype(path: Path, mean: torch.Tensor, precision: torch.Tensor) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, mean=mean.numpy().astype(np.float64), precision=precision.numpy().astype(np.float64))
    write_bytes_atomic(buffer.getvalue(), path)


def _backbone(det, writer: _Writer, previous: Manifest | None, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(backbone entry, preprocessing)`` of the manifest; the backbone is traced only when the previous
    export does not hold it already (building it alone costs seconds)."""
    from moleflow.deploy.graphs import BackboneGraph, export_module

    name = f"backbone-{key}.onnx"
    if previous is not None and previous.backbone["graph"]["file"] == name and writer.kept(name) is not None:
        return dict(previous.backbone), dict(previous.preprocessing)
    cfg, model = det.cfg, det.model.eval()
    extractor = det.extractor.set_memory_format(torch.contiguous_format)  # NCHW traces to plain Conv nodes
    graph = BackboneGraph(extractor, model, cfg.router.feature).eval()
    images = torch.zeros(EXAMPLE_BATCH, 3, extractor.image_size, extractor.image_size)
    with torch.no_grad():
        outputs = graph(images)
    names = ["patches", "routing"] + (["context"] if graph.with_context else [])
    entry = writer.file(name, lambda path: export_module(graph, (images,), path, ["images"], names))
    backbone = {
        "graph": asdict(entry),
        "name": cfg.model.backbone.name,
        "layers": list(cfg.model.backbone.layers),
        "grid": list(extractor.grid),
        "embed_dim": extractor.embed_dim,
        "routing_dim": int(outputs[1].shape[1]),
        "context_dim": int(outputs[2].shape[-1]) if graph.with_context else None,
        "inputs": ["images"],
        "outputs": names,
    }
    preprocessing = {
        "image_size": extractor.image_size,
        "mean": list(extractor.backbone.mean),
        "std": list(extractor.backbone.std),
        "resize": "RGB / 255, straight to image_size x image_size (aspect ratio not kept), bilinear with "
        "antialiasing, then (x - mean) / std; layout (B, 3, S, S) float32",
    }
    return backbone, preprocessing


def _product(det, writer: _Writer, name: str, backbone: dict[str, Any], key: str) -> ProductEntry:
    """A product's head graph and prototype (each written only when new or changed)."""
    from moleflow.deploy.graphs import HeadGraph, export_module

    (h, w), generator = backbone["grid"], torch.Generator().manual_seed(0)
    example = (torch.randn(EXAMPLE_BATCH, h, w, backbone["embed_dim"], generator=generator),)
    if backbone["context_dim"] is not None:
        example += (torch.randn(EXAMPLE_BATCH, h, w, backbone["context_dim"], generator=generator),)
    inputs = ["patches", "context"][: len(example)]
    record = det.records[name]
    stem = f"{PRODUCTS}/{name}-{_key(key, record.parts_id)}"
    head = writer.file(
        f"{stem}.onnx", lambda path: export_module(HeadGraph(det.model, name), example, path, inputs, ["scores"])
    )
    mean, precision = det.router.prototype(name)
    prototype = writer.file(f"{stem}.npz", lambda path: _save_prototype(path, mean, precision))
    return ProductEntry(name, record.parts_id, head, prototype, record.summary())


def export_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> ExportReport:
    """Export run ``run_dir`` into ``out_dir`` (new, empty, or an earlier export); see the module docstring."""
    from moleflow.checkpoint import model_fingerprint
    from moleflow.deploy.graphs import router_graph
    from moleflow.detector import Detector
    from moleflow.extras import require_extra
    from moleflow.rundir import RunDirectory

    require_extra("onnx", "moleflow export")
    det = Detector.load(run_dir, device="cpu", progress=False)
    if not det.products:
        raise ExportError(f"run {run_dir} has no products yet; learn one first (moleflow learn {run_dir} NAME=SOURCE)")
    if det.cfg.router.feature == "patch_gaussian":
        raise ExportError(f"run {run_dir} routes with router.feature=patch_gaussian, which the export does not support")
    if det.cfg.model.backbone.precision != "fp32":
        raise ExportError(
            f"run {run_dir} extracts features with model.backbone.precision={det.cfg.model.backbone.precision}; "
            "the exported backbone runs in float32 on onnxruntime, whose features differ from the run's by about "
            "2 % of their spread. Export a run created with model.backbone.precision=fp32"
        )
    out = Path(out_dir)
    _check_out_dir(out, Path(run_dir))
    fingerprint = model_fingerprint(det.cfg)
    key = _key(det.base_id, fingerprint)  # what every graph depends on besides a product's own parts
    report = ExportReport(out, det.products)
    with RunDirectory(out).writing():
        previous = _previous(out)
        writer = _Writer(out, previous, report)
        backbone, preprocessing = _backbone(det, writer, previous, key)
        router_bytes = router_graph().SerializeToString()
        router = writer.file(
            f"router-{hashlib.sha256(router_bytes).hexdigest()[:16]}.onnx",
            lambda path: write_bytes_atomic(router_bytes, path),
        )
        manifest = Manifest(
            moleflow=__version__,
            created_at=_now(),
            run=str(Path(run_dir).resolve()),
            base_id=det.base_id,
            model_fingerprint=fingerprint,
            preprocessing=preprocessing,
            backbone=backbone,
            router={
                "graph": asdict(router),
                "metric": det.cfg.router.metric,
                "feature": det.cfg.router.feature,
                "covariance": det.cfg.router.covariance,
            },
            scoring=det.scoring_settings(),
            products=[_product(det, writer, name, backbone, key) for name in det.products],
        )
        write_json_atomic(manifest.to_json(), out / MANIFEST)
        report.removed = _remove_unnamed(out, {f.file for f in manifest.files()})
    for relative in report.removed:
        log.debug("removed %s", out / relative)
    return report


def _remove_unnamed(out: Path, named: set[str]) -> list[str]:
    """Delete the graph and prototype files the manifest does not name (earlier exports' files)."""
    candidates = [*out.glob("backbone-*.onnx"), *out.glob("router-*.onnx"), *(out / PRODUCTS).glob("*.onnx")]
    candidates += list((out / PRODUCTS).glob("*.npz"))
    removed = []
    for path in sorted(candidates):
        relative = path.relative_to(out).as_posix()
        if relative not in named:
            path.unlink(missing_ok=True)
            removed.append(relative)
    return removed
