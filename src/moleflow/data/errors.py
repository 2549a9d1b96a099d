"""The one exception type of :mod:`moleflow.data` (re-exported by :mod:`moleflow.data.base`)."""

from __future__ import annotations


class DatasetError(ValueError):
    """A data problem: the message says which file or directory, what was expected and how to fix it."""
