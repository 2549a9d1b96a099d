"""Builders of tiny on-disk datasets (MVTec AD, MVTec 3D-AD, VisA, folders) for the data tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from data_builders import SHARED_DATASETS, WritePng, rgb, square_mask, write_image


@pytest.fixture
def write_png() -> WritePng:
    """``write_png(path, array)`` writes an image (creating directories) and returns the path."""
    return write_image


@pytest.fixture
def make_mvtec(tmp_path: Path) -> Callable[..., Path]:
    """``make_mvtec(mask_suffix="_mask", ext=".png", layout="2d")`` builds a category and returns its dir.

    Contents: train/good 3 images, test/good 2, test/crack 2 and test/hole 1 (with masks), plus a hidden
    file and a README that must be ignored.
    """

    def build(mask_suffix: str = "_mask", ext: str = ".png", layout: str = "2d") -> Path:
        root = tmp_path / f"cat_{layout}{mask_suffix}{ext.strip('.')}"
        sub = "rgb" if layout == "3d" else ""
        for i in range(3):
            write_image(root / "train" / "good" / sub / f"{i:03d}{ext}", rgb(10 + i))
        for i in range(2):
            write_image(root / "test" / "good" / sub / f"{i:03d}{ext}", rgb(20 + i))
        for defect, count in (("crack", 2), ("hole", 1)):
            for i in range(count):
                write_image(root / "test" / defect / sub / f"{i:03d}{ext}", rgb(100 + i))
                mask_dir = root / "test" / defect / "gt" if layout == "3d" else root / "ground_truth" / defect
                write_image(mask_dir / f"{i:03d}{mask_suffix}.png", square_mask())
        (root / "train" / "good" / sub / ".hidden.png").write_bytes(b"not an image")
        (root / "README.txt").write_text("ignored")
        return root

    return build


@pytest.fixture
def make_visa(tmp_path: Path) -> Callable[..., Path]:
    """``make_visa(rows=None)`` builds a VisA root with categories candle and pcb1; returns the root.

    Each category: 3 train normals, 2 test normals, 2 test anomalies with 0/1-valued masks (as VisA).
    ``rows`` replaces the CSV body (a list of lines) when given.
    """

    def build(rows: list[str] | None = None, header: str = "object,split,label,image,mask") -> Path:
        root = tmp_path / "visa"
        lines: list[str] = []
        for obj in ("candle", "pcb1"):
            for split, label, n in (("train", "normal", 3), ("test", "normal", 2), ("test", "anomaly", 2)):
                for i in range(n):
                    kind = "Normal" if label == "normal" else "Anomaly"
                    image = f"{obj}/Data/Images/{kind}/{split}{i:03d}.JPG"
                    write_image(root / image, rgb(50 + i))
                    mask = ""
                    if label == "anomaly":
                        mask = f"{obj}/Data/Masks/Anomaly/{split}{i:03d}.png"
                        write_image(root / mask, (square_mask() > 0).astype(np.uint8))
                    lines.append(f"{obj},{split},{label},{image},{mask}")
        csv_path = root / "split_csv" / "1cls.csv"
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        csv_path.write_text("\n".join([header, *(rows if rows is not None else lines)]) + "\n")
        return root

    return build


@pytest.fixture
def hazelnut_root() -> Path:
    """The shared hazelnut_toy root (skips the test if the shared datasets are absent)."""
    root = SHARED_DATASETS / "hazelnut_toy"
    if not (root / "hazelnut").is_dir():
        pytest.skip(f"shared dataset not found at {root}")
    return root


@pytest.fixture
def mpdd_plate() -> Path:
    """The shared MPDD metal_plate category directory (skips if absent)."""
    path = SHARED_DATASETS / "mpdd_metal_plate" / "metal_plate"
    if not path.is_dir():
        pytest.skip(f"shared dataset not found at {path}")
    return path
