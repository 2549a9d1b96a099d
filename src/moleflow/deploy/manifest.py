"""The export directory and its ``manifest.json`` (numpy-free, torch-free, onnx-free).

```
EXPORT/manifest.json                      what is exported (written last, atomically: the commit point)
EXPORT/backbone-<model id>.onnx           images (B, 3, S, S) -> patches, routing features[, context]
EXPORT/router.onnx                        routing features + prototypes (inputs) -> distances
EXPORT/products/<name>-<parts id>.onnx    one product's head: patches[, context] -> patch scores (B, h, w)
EXPORT/products/<name>-<parts id>.npz     its router prototype: mean (G,), precision (G, G), float64
```

File names carry the ids of what they hold (``model id`` = the run's base id and model fingerprint), so
an export never overwrites a file an older manifest names: a run exported again writes the files of new
or changed products beside the old ones, then the manifest, then deletes the files no manifest names.
A reader trusts the manifest alone and checks every file's size and SHA-256 against it.

Manifest keys: ``format``, ``moleflow`` (version), ``created_at``, ``run`` (the source run directory),
``base_id``, ``model_fingerprint``, ``preprocessing`` (image size, mean, std, resize rule), ``backbone``
(file, grid, widths, graph inputs and outputs), ``router`` (file, metric, feature, covariance), ``scoring`` (the
settings the thresholds were calibrated under) and ``products``: per product ``name``, ``parts_id``,
``head`` and ``prototype`` files, and ``record`` (the run's task record: source, when learned, and the
calibration: image threshold and centre, pixel threshold and centre, unknown-product routing threshold).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FORMAT", "MANIFEST", "ExportError", "FileEntry", "Manifest", "ProductEntry", "is_export"]

FORMAT = "moleflow-onnx-1"
MANIFEST = "manifest.json"
PRODUCTS = "products"
ROUTER_FILE = "router.onnx"


class ExportError(ValueError):
    """An export directory that cannot be written or read; the message names the file and what to do."""


def is_export(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an export directory (it holds a manifest)."""
    return (Path(path) / MANIFEST).is_file()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    """A file of the export, relative to its root, with its size and hash."""

    file: str
    sha256: str
    bytes: int

    @classmethod
    def of(cls, root: Path, path: Path) -> FileEntry:
        return cls(path.relative_to(root).as_posix(), sha256(path), path.stat().st_size)

    def matches(self, root: Path) -> bool:
        """The file exists with this size and hash (an unchanged file can be kept by a new export)."""
        path = root / self.file
        return path.is_file() and path.stat().st_size == self.bytes and sha256(path) == self.sha256

    def check(self, root: Path) -> Path:
        """The file's path; :class:`ExportError` naming it when it is missing or differs from the manifest."""
        path = root / self.file
        if not path.is_file():
            raise ExportError(f"{path}: missing (named by {root / MANIFEST}); export the run again (moleflow export)")
        if path.stat().st_size != self.bytes or sha256(path) != self.sha256:
            raise ExportError(f"{path}: differs from its hash in {root / MANIFEST} (changed or truncated); export again")
        return path


@dataclass(frozen=True)
class ProductEntry:
    name: str
    parts_id: str
    head: FileEntry
    prototype: FileEntry
    record: dict[str, Any]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProductEntry:
        return cls(
            name=data["name"],
            parts_id=data["parts_id"],
            head=FileEntry(**data["head"]),
            prototype=FileEntry(**data["prototype"]),
            record=dict(data["record"]),
        )


@dataclass
class Manifest:
    """The contents of ``manifest.json`` (module docstring)."""

    moleflow: str
    created_at: str
    run: str
    base_id: str
    model_fingerprint: str
    preprocessing: dict[str, Any]
    backbone: dict[str, Any]
    router: dict[str, Any]
    scoring: dict[str, Any]
    products: list[ProductEntry] = field(default_factory=list)
    format: str = FORMAT

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.products]

    @property
    def backbone_graph(self) -> FileEntry:
        return FileEntry(**self.backbone["graph"])

    @property
    def router_graph(self) -> FileEntry:
        return FileEntry(**self.router["graph"])

    def files(self) -> list[FileEntry]:
        """Every file the manifest names."""
        out = [self.backbone_graph, self.router_graph]
        for p in self.products:
            out += [p.head, p.prototype]
        return out

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def read(cls, root: str | os.PathLike[str]) -> Manifest:
        """The manifest of export directory ``root``; :class:`ExportError` with what to do when it is not one."""
        path = Path(root) / MANIFEST
        if not path.is_file():
            raise ExportError(f"{path.parent} is not an export directory (no {MANIFEST}); make one with moleflow export")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ExportError(f"{path} is corrupt ({e}); export the run again") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ExportError(f"{path}: format {got!r}, expected {FORMAT!r}; export the run again with this moleflow")
        try:
            products = [ProductEntry.from_json(p) for p in data.pop("products")]
            return cls(**data, products=products)
        except (KeyError, TypeError) as e:
            raise ExportError(f"{path}: malformed manifest ({e}); export the run again") from None
