"""Exception types shared across packages (importing this module imports nothing else)."""

from __future__ import annotations


class DatasetError(ValueError):
    """A data problem: the message says which file or directory, what was expected and how to fix it."""
