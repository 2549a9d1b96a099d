"""Checking every image of every product before any work: an hour of training is never lost to a corrupt
test image of the second product, or to a mask that does not fit its image.

Every sample is decoded (small: :meth:`moleflow.data.base.Sample.check`), and its mask read where it has
one, in a few threads (image decoding releases the GIL); the problems of all of them are reported in one
:class:`~moleflow.errors.DatasetError`, one line per file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from moleflow.data.base import Sample, TaskData
from moleflow.errors import DatasetError

__all__ = ["MAX_LISTED", "validate_samples", "validate_tasks"]

log = logging.getLogger(__name__)
MAX_LISTED = 20


def _problem(item: tuple[str, Sample]) -> str | None:
    where, sample = item
    try:
        sample.check()
    except (DatasetError, OSError, ValueError) as e:
        return f"{where}: {e}"
    return None


def validate_samples(items: Iterable[tuple[str, Sample]], what: str = "images") -> int:
    """Check ``(label, sample)`` pairs; raise one DatasetError listing every problem. Returns the count."""
    items = list(items)
    threads = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        problems = [p for p in pool.map(_problem, items) if p]
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DatasetError(
            f"{len(problems)} of {len(items)} {what} cannot be used (checked before any training; nothing was "
            f"changed); fix or remove them:\n  {listed}{more}"
        )
    log.debug("checked %d %s", len(items), what)
    return len(items)


def validate_tasks(tasks: Sequence[TaskData], extra: Sequence[Sample] = ()) -> int:
    """Every train and test image (and mask) of ``tasks``, plus ``extra`` samples (calibration images)."""
    items = [(t.name, s) for t in tasks for s in (*t.train, *t.test)] + [("calibration", s) for s in extra]
    return validate_samples(items, "images")
