"""The one rule for product (task) names.

A task name keys a run's files (``checkpoints/tasks/<name>.safetensors``), a ``torch.nn.ModuleDict`` entry
(which refuses dots) and results; so it must be a short, portable file name: a letter or digit first, then
letters, digits, ``_`` or ``-``, at most :data:`MAX_TASK_NAME_LENGTH` characters.
"""

from __future__ import annotations

import re

from moleflow.errors import DatasetError

__all__ = ["MAX_TASK_NAME_LENGTH", "TASK_NAME_PATTERN", "TaskNameError", "check_task_name", "task_name_from"]

MAX_TASK_NAME_LENGTH = 64
TASK_NAME_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_-]{{0,{MAX_TASK_NAME_LENGTH - 1}}}")


class TaskNameError(DatasetError):
    """A product name that cannot be used (see the module docstring)."""


def check_task_name(name: str) -> str:
    """Return ``name`` if it is a valid task name, else raise :class:`TaskNameError` saying why."""
    if not isinstance(name, str) or not TASK_NAME_PATTERN.fullmatch(name):
        length = f" ({len(name)} characters)" if isinstance(name, str) and len(name) > MAX_TASK_NAME_LENGTH else ""
        raise TaskNameError(
            f"invalid task name {name!r}{length}: use at most {MAX_TASK_NAME_LENGTH} letters, digits, '_' or '-', "
            "starting with a letter or digit, e.g. 'hazelnut' or 'my_parts-v2'; it names files in the run directory"
        )
    return name


def task_name_from(text: str) -> str:
    """A valid task name derived from a directory or file name (``"parts.v2"`` -> ``"parts_v2"``)."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_-")[:MAX_TASK_NAME_LENGTH] or "task"
    return check_task_name(cleaned)
