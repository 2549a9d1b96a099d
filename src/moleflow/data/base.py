"""The records every dataset loader returns: :class:`Sample` and :class:`TaskData`.

A loader is a pure parse step: it lists files (or generates arrays) and returns a :class:`TaskData` of
lazy samples; pixels are decoded only when :meth:`Sample.load_image` / :meth:`Sample.load_mask` is
called. Two kinds of sample exist, both behind the one :class:`Sample` interface:

- :class:`FileSample` -- an image file, and an optional mask file (MVTec, VisA, folders, elpv);
- :class:`ArraySample` -- arrays held in memory (the synthetic generator).

Conventions shared by every loader:

- ``label`` is 0 for normal and 1 for anomalous, and ``defect`` is ``"good"`` exactly when ``label == 0``;
- images are RGB ``uint8`` of shape ``(H, W, 3)``; masks are ``float32`` in ``{0, 1}`` of shape ``(H, W)``,
  all zero for normal images, and ``None`` only when the whole dataset carries no masks;
- ``name`` is unique within a task and stable across runs (reports and result files key on it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moleflow.data.errors import DatasetError
from moleflow.data.io import image_size, read_image, read_mask_for
from moleflow.names import check_task_name

__all__ = ["DatasetError", "Sample", "FileSample", "ArraySample", "TaskData", "check_task_name"]

NORMAL_DEFECT = "good"
CHECK_SIDE = 64  # a checked image is decoded to this size
LABELS = (0, 1)


@dataclass(frozen=True)
class Sample(ABC):
    """One image of a task, loaded lazily.

    Attributes:
        name: stable id for reports, unique within the task, e.g. ``"test/crack/000.png"``.
        label: 0 = normal, 1 = anomalous.
        defect: ``"good"`` for normals, otherwise the defect type name.
    """

    name: str
    label: int
    defect: str

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise DatasetError(f"sample {self.name!r}: label must be 0 (normal) or 1 (anomalous), got {self.label!r}")
        if (self.label == 0) != (self.defect == NORMAL_DEFECT):
            raise DatasetError(
                f"sample {self.name!r}: defect must be {NORMAL_DEFECT!r} exactly when label is 0; "
                f"got label={self.label}, defect={self.defect!r}"
            )

    @property
    @abstractmethod
    def has_mask(self) -> bool:
        """Whether :meth:`load_mask` returns an array (``False``: the dataset has no masks)."""

    @abstractmethod
    def load_image(self, max_side: int | None = None) -> np.ndarray:
        """Decode the image: ``(H, W, 3)`` RGB ``uint8`` (long side at most ``max_side`` when given);
        DatasetError naming the file if unreadable."""

    @abstractmethod
    def load_mask(self) -> np.ndarray | None:
        """Ground truth ``(H, W)`` ``float32`` in ``{0, 1}`` (the image's size); ``None``: no masks."""

    def check(self) -> None:
        """Raise DatasetError naming the file unless the image (and mask) can be read; cheap where possible."""
        self.load_image()
        if self.has_mask:
            self.load_mask()


@dataclass(frozen=True)
class FileSample(Sample):
    """A sample backed by files on disk.

    Attributes:
        image_path: the image file.
        mask_path: the mask file; ``None`` for normal images (their mask is all zero) or unmasked datasets.
        masked: whether the dataset carries masks at all; if ``False`` :meth:`load_mask` returns ``None``.
    """

    image_path: Path
    mask_path: Path | None = None
    masked: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask_path is not None and not self.masked:
            raise DatasetError(f"sample {self.name!r}: a mask file was given but masked=False")
        if self.masked and self.label == 1 and self.mask_path is None:
            raise DatasetError(f"sample {self.name!r}: anomalous image {self.image_path} has no mask file")

    @property
    def has_mask(self) -> bool:
        return self.masked

    def load_image(self, max_side: int | None = None) -> np.ndarray:
        """``max_side``: downscale on load (a large JPEG is decoded at reduced size) to this long side."""
        return read_image(self.image_path, max_side)

    def check(self) -> None:
        read_image(self.image_path, CHECK_SIDE)  # decodes the whole file (a truncated one fails), small
        if self.mask_path is not None:
            self.load_mask()

    def load_mask(self) -> np.ndarray | None:
        if not self.masked:
            return None
        if self.mask_path is None:
            return np.zeros(image_size(self.image_path), dtype=np.float32)
        return read_mask_for(self.mask_path, self.image_path)  # sizes checked, orientation rule applied


@dataclass(frozen=True)
class ArraySample(Sample):
    """A sample held in memory (synthetic data). The arrays are stored read-only; loads return copies.

    Attributes:
        image: ``(H, W, 3)`` RGB ``uint8``.
        mask: ``(H, W)`` ``float32`` in ``{0, 1}``, or ``None`` when the dataset has no masks.
    """

    image: np.ndarray = field(compare=False, repr=False)
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image.dtype != np.uint8 or self.image.ndim != 3 or self.image.shape[2] != 3:
            raise DatasetError(
                f"sample {self.name!r}: image must be (H, W, 3) uint8, got {self.image.shape} {self.image.dtype}"
            )
        image = self.image.copy()
        image.flags.writeable = False
        object.__setattr__(self, "image", image)  # frozen: the read-only copy is set once, here
        if self.mask is not None:
            if self.mask.shape != self.image.shape[:2]:
                raise DatasetError(
                    f"sample {self.name!r}: mask shape {self.mask.shape} != image shape {self.image.shape[:2]}"
                )
            mask = (self.mask > 0).astype(np.float32)
            mask.flags.writeable = False
            object.__setattr__(self, "mask", mask)

    @property
    def has_mask(self) -> bool:
        return self.mask is not None

    def load_image(self, max_side: int | None = None) -> np.ndarray:
        return self.image.copy()

    def check(self) -> None:
        return None  # validated when it was made

    def load_mask(self) -> np.ndarray | None:
        return None if self.mask is None else self.mask.copy()


@dataclass(frozen=True)
class TaskData:
    """One task (product category) of the continual stream.

    Attributes:
        name: task name, e.g. ``"hazelnut"``; a valid file name (see :mod:`moleflow.names`).
        train: normal images only.
        test: normal and anomalous images.
        has_masks: pixel metrics are computed only if ``True``; then every sample has a mask.
        source: human-readable origin, e.g. ``"MVTec layout at /data/hazelnut"``.
    """

    name: str
    train: tuple[Sample, ...]
    test: tuple[Sample, ...]
    has_masks: bool
    source: str

    def __post_init__(self) -> None:
        check_task_name(self.name)
        if not self.train:
            raise DatasetError(f"task {self.name!r} ({self.source}): no training images")
        if not self.test:
            raise DatasetError(f"task {self.name!r} ({self.source}): no test images")
        anomalous = [s.name for s in self.train if s.label != 0]
        if anomalous:
            raise DatasetError(
                f"task {self.name!r} ({self.source}): training images must be normal; anomalous: {anomalous[:5]}"
            )
        inconsistent = [s.name for s in (*self.train, *self.test) if s.has_mask != self.has_masks]
        if inconsistent:
            raise DatasetError(
                f"task {self.name!r} ({self.source}): has_masks={self.has_masks} but these samples "
                f"disagree: {inconsistent[:5]}"
            )
        names = [s.name for s in (*self.train, *self.test)]
        if len(set(names)) != len(names):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            raise DatasetError(f"task {self.name!r} ({self.source}): duplicate sample names {duplicates[:5]}")

    @property
    def n_anomalous(self) -> int:
        """Number of anomalous test images."""
        return sum(s.label for s in self.test)
