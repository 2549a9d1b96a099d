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
from dataclasses import asdict, dataclass, field
from pathlib import Path

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


def _previous(out: Path) -> dict[str, FileEntry]:
    """Files the previous manifest names, by relative path (none when there is no readable manifest)."""
    if not is_export(out):
        return {}
    try:
        return {f.file: f for f in Manifest.read(out).files()}
    except ExportError as e:
        log.warning("previous export ignored, every graph is written anew: %s", e)
        return {}


class _Writer:
    """Writes a file unless the previous manifest names it unchanged; records what it did."""

    def __init__(self, out: Path, previous: dict[str, FileEntry], report: ExportReport) -> None:
        self.out, self.previous, self.report = out, previous, report

    def file(self, relative: str, write) -> FileEntry:
        old = self.previous.get(relative)
        if old is not None and old.matches(self.out):
            self.report.kept.append(relative)
            return old
        write(self.out / relative)
        self.report.written.append(relative)
        log.info("wrote %s", self.out / relative)
        return FileEntry.of(self.out, self.out / relative)


def _save_prototype(path: Path, mean: torch.Tensor, precision: torch.Tensor) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, mean=mean.numpy().astype(np.float64), precision=precision.numpy().astype(np.float64))
    write_bytes_atomic(buffer.getvalue(), path)


def export_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> ExportReport:
    """Export run ``run_dir`` into ``out_dir`` (new, empty, or an earlier export); see the module docstring."""
    from moleflow.checkpoint import model_fingerprint
    from moleflow.deploy.graphs import BackboneGraph, HeadGraph, export_module, router_graph
    from moleflow.detector import Detector
    from moleflow.extras import require_extra
    from moleflow.rundir import RunDirectory

    require_extra("onnx", "moleflow export")
    det = Detector.load(run_dir, device="cpu", progress=False)
    if not det.products:
        raise ExportError(f"run {run_dir} has no products yet; learn one first (moleflow learn {run_dir} NAME=SOURCE)")
    out = Path(out_dir)
    _check_out_dir(out, Path(run_dir))
    cfg, model = det.cfg, det.model.eval()
    fingerprint = model_fingerprint(cfg)
    extractor = det.extractor.set_memory_format(torch.contiguous_format)  # NCHW traces to plain Conv nodes
    graph = BackboneGraph(extractor, model, cfg.router.feature).eval()
    (h, w), size, dim = extractor.grid, extractor.image_size, extractor.embed_dim
    images = torch.zeros(EXAMPLE_BATCH, 3, size, size)
    with torch.no_grad():
        backbone_outputs = graph(images)
    outputs = ["patches", "routing"] + (["context"] if graph.with_context else [])
    report = ExportReport(out, det.products)
    with RunDirectory(out).writing():
        writer = _Writer(out, _previous(out), report)
        backbone_file = writer.file(
            f"backbone-{_key(det.base_id, fingerprint)}.onnx",
            lambda path: export_module(graph, (images,), path, ["images"], outputs),
        )
        router_bytes = router_graph().SerializeToString()
        router_file = writer.file(
            f"router-{hashlib.sha256(router_bytes).hexdigest()[:16]}.onnx",
            lambda path: write_bytes_atomic(router_bytes, path),
        )
        head_inputs = ["patches"] + (["context"] if graph.with_context else [])
        example = (backbone_outputs[0],) + ((backbone_outputs[2],) if graph.with_context else ())
        products = []
        for name in det.products:
            record = det.records[name]
            stem = f"{PRODUCTS}/{name}-{_key(det.base_id, fingerprint, record.parts_id)}"
            head = writer.file(
                f"{stem}.onnx",
                lambda path, name=name: export_module(HeadGraph(model, name), example, path, head_inputs, ["scores"]),
            )
            mean, precision = det.router.prototype(name)
            prototype = writer.file(f"{stem}.npz", lambda path, m=mean, p=precision: _save_prototype(path, m, p))
            products.append(ProductEntry(name, record.parts_id, head, prototype, record.summary()))
        manifest = Manifest(
            moleflow=__version__,
            created_at=_now(),
            run=str(Path(run_dir).resolve()),
            base_id=det.base_id,
            model_fingerprint=fingerprint,
            preprocessing={
                "image_size": size,
                "mean": list(extractor.backbone.mean),
                "std": list(extractor.backbone.std),
                "resize": "RGB / 255, straight to image_size x image_size (aspect ratio not kept), "
                "bilinear with antialiasing, then (x - mean) / std; layout (B, 3, S, S) float32",
            },
            backbone={
                "graph": asdict(backbone_file),
                "name": cfg.model.backbone.name,
                "layers": list(cfg.model.backbone.layers),
                "grid": [h, w],
                "embed_dim": dim,
                "routing_dim": int(backbone_outputs[1].shape[1]),
                "context_dim": int(backbone_outputs[2].shape[-1]) if graph.with_context else None,
                "inputs": ["images"],
                "outputs": outputs,
            },
            router={"graph": asdict(router_file), "metric": cfg.router.metric, "feature": cfg.router.feature},
            scoring=det.scoring_settings(),
            products=products,
        )
        write_json_atomic(manifest.to_json(), out / MANIFEST)
        report.removed = _remove_unnamed(out, {f.file for f in manifest.files()})
    for relative in report.removed:
        log.info("removed %s", out / relative)
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
