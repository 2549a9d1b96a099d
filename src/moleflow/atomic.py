"""The one way moleflow writes a file: to a temporary file beside it, flushed, then renamed into place.

A reader (or a process killed with ``kill -9`` at any instant) therefore sees either the old file or the
new one, never a half-written one. Temporary files are named ``.NAME.<random>.tmp``; one left behind by a
killed process is removed by :func:`remove_stale_temporaries` the next time the directory is written.

Permissions follow the process umask like any ``open(..., "w")`` would (``mkstemp`` alone would make every
file ``0600`` and a run directory unreadable to colleagues).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "TEMP_SUFFIX",
    "atomic_write",
    "remove_stale_temporaries",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

TEMP_SUFFIX = ".tmp"
_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported here (e.g. some network file systems); the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it to ``path``.

    The temporary file is synced to disk before the rename and removed if ``write`` fails (or the
    process is interrupted); on any error ``path`` is left exactly as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def write_bytes_atomic(data: bytes, path: str | os.PathLike[str]) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text_atomic(text: str, path: str | os.PathLike[str]) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json_atomic(data: Any, path: str | os.PathLike[str]) -> Path:
    """JSON with ``NaN``/``inf`` refused (they are not JSON); indented for people who open the file."""
    return write_text_atomic(json.dumps(data, indent=2, allow_nan=False) + "\n", path)


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete ``.NAME.*.tmp`` files under ``directory`` (left by a killed writer); returns what was removed.

    Call it only while holding the directory's write lock: a live writer's temporary file looks the same.
    """
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for tmp in directory.rglob(f".*{TEMP_SUFFIX}"):
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
