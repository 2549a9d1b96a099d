"""Where a product's images come from: resolving a learn SOURCE into a :class:`TaskData`, rebuilding it
later from what a run recorded, and choosing the normal images its thresholds are calibrated on."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moleflow.data.base import NORMAL_DEFECT, FileSample, Sample, TaskData
from moleflow.data.errors import DatasetError

__all__ = ["ResolvedSource", "calibration_samples", "holdout_split", "resolve_source"]

MIN_CALIBRATION_IMAGES = 2


def _location(directory: Path, run_path: Path | None) -> dict[str, str]:
    absolute = directory.resolve()
    out = {"absolute": absolute.as_posix()}
    if run_path is not None:
        out["relative"] = Path(os.path.relpath(absolute, Path(run_path).resolve())).as_posix()
    return out


def _from_location(location: dict[str, str], run_path: Path | None, data_root: str | os.PathLike[str] | None) -> Path | None:
    """The recorded directory: under ``data_root`` when one is given (the data moved), else relative to the
    run (the run moved together with its data), else at its absolute path."""
    absolute = Path(location.get("absolute", ""))
    candidates = []
    if data_root is not None:
        candidates.append(Path(data_root) / absolute.name)
    if run_path is not None and "relative" in location:
        candidates.append(Path(run_path) / location["relative"])
    candidates.append(absolute)
    return next((c for c in candidates if c.is_dir()), None)


@dataclass(frozen=True)
class ResolvedSource:
    """A product's data and how to find it again: the SPEC to record and, for a directory, its location."""

    task: TaskData
    spec: str | None
    location: dict[str, str] | None
    limits: tuple[int, int] | None = None


def resolve_source(
    name: str,
    source: str | os.PathLike[str] | TaskData | ResolvedSource | None,
    data_root: str | os.PathLike[str] | None,
    limits: Sequence[int] | None,
    run_path: Path | None,
    spec: str | None = None,
    location: dict[str, str] | None = None,
) -> ResolvedSource:
    """The data of product ``name`` (renamed to it) with the spec and location to record.

    ``source``: a SOURCE string or path (``moleflow.data.spec``), a ready :class:`TaskData`, or ``None`` to
    rebuild from a recorded ``location`` / ``spec``. ``limits``: ``(max train, max test)`` subsampling.
    """
    from moleflow.data.spec import resolve_task
    from moleflow.data.subsample import subsample_task

    if isinstance(source, ResolvedSource):
        return source
    if isinstance(source, TaskData):
        task = source if source.name == name else dataclasses.replace(source, name=name)
    else:
        if source is None:
            directory = _from_location(location, run_path, data_root) if location else None
            if directory is None and spec is None:
                raise DatasetError(
                    f"product {name!r}: its images were at {(location or {}).get('absolute')} and are no longer there"
                )
            source_text = str(directory) if directory is not None else None
        else:
            source_text = os.fspath(source)
        if source_text is not None:
            spec = spec or f"{name}={source_text}"
            task = resolve_task(f"{name}={source_text}", data_root)
            path = Path(source_text).expanduser()
            if path.is_dir():
                location = _location(path, run_path)
            elif data_root is not None and (Path(data_root) / path).is_dir():
                location = _location(Path(data_root) / path, run_path)
        else:
            task = resolve_task(spec, data_root)
            task = task if task.name == name else dataclasses.replace(task, name=name)
    if limits is not None:
        task = subsample_task(task, *limits)
    return ResolvedSource(task, spec, location, tuple(limits) if limits is not None else None)


def holdout_split(samples: Sequence[Sample], fraction: float) -> tuple[list[Sample], list[Sample]]:
    """``(train, held out)``: ``floor(fraction * n)`` samples evenly spaced over the given order are held out.

    Nothing is held out (``held out == []``) when that would leave fewer than 2 on either side.
    """
    n = len(samples)
    k = math.floor(fraction * n + 1e-9)
    if k < MIN_CALIBRATION_IMAGES or n - k < MIN_CALIBRATION_IMAGES:
        return list(samples), []
    held = {min(n - 1, math.floor((i + 0.5) * n / k)) for i in range(k)}
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]


def calibration_samples(calib: str | os.PathLike[str] | Sequence[Sample]) -> list[Sample]:
    """Normal calibration images: a directory of images (hidden and non-image files skipped), or samples."""
    from moleflow.data.io import require_images

    if isinstance(calib, (str, os.PathLike)):
        paths = require_images(Path(calib).expanduser(), "a calibration directory of normal images")
        samples: list[Sample] = [
            FileSample(name=f"calib/{p.name}", label=0, defect=NORMAL_DEFECT, image_path=p, masked=False) for p in paths
        ]
    else:
        samples = list(calib)
    if len(samples) < MIN_CALIBRATION_IMAGES:
        raise DatasetError(f"calibration needs at least {MIN_CALIBRATION_IMAGES} normal images, got {len(samples)}")
    anomalous = [s.name for s in samples if s.label != 0]
    if anomalous:
        raise DatasetError(f"calibration images must be normal; anomalous: {anomalous[:5]}")
    return samples
