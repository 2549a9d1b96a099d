"""The one exception type of :mod:`moleflow.data` (re-exported by :mod:`moleflow.data.base`)."""

from __future__ import annotations

from moleflow.errors import DatasetError

__all__ = ["DatasetError"]
