"""The run directory: the one module that reads and writes it (DESIGN.md, "Run directory").

```
RUN_DIR/config.yaml            resolved config (every default written out)
RUN_DIR/tasks.json             the index: which products the run holds, with their records (written last)
RUN_DIR/checkpoints/           base.safetensors, router.safetensors, tasks/<task>.safetensors
RUN_DIR/results.json           evaluation results (DESIGN.md schema)
RUN_DIR/report.md, figures/    human-readable report
RUN_DIR/train.log              log of every command that changed the run
```

Crash safety. Every file is replaced atomically, and the index (``tasks.json``) is the commit point. A
command first writes what it adds (a learned product to a staged file ``tasks/<name>.<parts_id>.safetensors``,
the base when the first product is learned), then the results and the report derived from the new state,
then the index. Only after that are staged files moved to their names, the router file rewritten and
files the index no longer names deleted, steps the next command redoes if a kill interrupted them.
Readers trust the index alone: each product is read from the file holding the parts id the index names,
anything else is ignored.

A command that learns many products (``moleflow learn --parallel ray``) commits each one as it finishes
(its file, then the index) but writes the files derived from all of them, ``router.safetensors``,
``results.json`` and ``report.md``, once at its end: rewriting them per product costs O(products) each
time. Until then they lag the index, which readers allow for: router rows are matched by (product, parts
id), so a product the router file lacks takes its prototype from its own file, and results gain empty rows
for products they lack. So a process killed at any instant leaves the run as it was before the command,
or with the command's products whole and finished. Commands that write take an exclusive lock (``.lock``)
and remove the temporaries a killed writer left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from moleflow import __version__
from moleflow.atomic import remove_stale_temporaries, write_json_atomic, write_text_atomic
from moleflow.calibration import Calibration

__all__ = ["INDEX_FILE", "RunDirectory", "RunDirectoryError", "RunIndex", "RunLockedError", "TaskRecord"]

INDEX_FILE = "tasks.json"
CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"
RUN_FORMAT = "moleflow-run-2"
CHECKPOINTS = "checkpoints"


class RunDirectoryError(ValueError):
    """A path that is not a (readable, complete) run directory; the message says what to do."""


class RunLockedError(RunDirectoryError):
    """Another moleflow command is writing this run directory."""


@dataclass
class TaskRecord:
    """What a run knows about one learned product.

    ``spec``: the task SPEC it was learned from, when it came from one (``moleflow eval`` rebuilds the test
    set from it); ``location``: for a directory source, the path relative to the run directory and the
    absolute path, so a run copied together with its data still finds it. ``train_images``: images the
    flow trained on (calibration images excluded). ``seconds``: features / train / calibration.
    ``parts_id``: names the product file of this learning (see the module docstring).
    """

    name: str
    source: str
    learned_at: str
    train_images: int
    seed: int
    calibration: Calibration
    parts_id: str
    spec: str | None = None
    location: dict[str, str] | None = None
    limits: list[int] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        # shallow: asdict would deep-copy the calibration's stored values only for them to be replaced, and
        # the index is rewritten at every commit (its cost grows with the products)
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["calibration"] = self.calibration.to_json()
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TaskRecord:
        data = dict(data)
        data["calibration"] = Calibration.from_json(data["calibration"])
        return cls(**data)

    def summary(self) -> dict[str, Any]:
        """The record without the stored calibration values (for tables, ``moleflow tasks --json``)."""
        out = self.to_json()
        out["calibration"] = self.calibration.summary()
        return out


@dataclass
class RunIndex:
    """The contents of ``tasks.json``: the products in order and the id of the base they belong to."""

    base_id: str | None = None
    tasks: list[TaskRecord] = field(default_factory=list)
    data_root: str | None = None

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RUN_FORMAT,
            "moleflow": __version__,
            "base_id": self.base_id,
            "data_root": self.data_root,
            "tasks": [t.to_json() for t in self.tasks],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: Path) -> RunIndex:
        if data.get("format") != RUN_FORMAT:
            raise RunDirectoryError(
                f"{where} is not a moleflow {RUN_FORMAT} index (format {data.get('format')!r}); it was written by "
                "another moleflow version: retrain the run with this one"
            )
        try:
            tasks = [TaskRecord.from_json(t) for t in data.get("tasks", [])]
        except (TypeError, KeyError, ValueError) as e:
            raise RunDirectoryError(f"{where}: a task record is malformed ({e}); restore the file from a backup") from e
        return cls(base_id=data.get("base_id"), tasks=tasks, data_root=data.get("data_root"))


class RunDirectory:
    """Paths of a run directory and every read and write of its files (module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.path)!r})"

    # ------------------------------------------------------------------ paths

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def index_path(self) -> Path:
        return self.path / INDEX_FILE

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def log_path(self) -> Path:
        return self.path / "train.log"

    # ------------------------------------------------------------------ state

    def is_run(self) -> bool:
        """Whether the directory holds a run (an index and a config)."""
        return self.index_path.is_file() and self.config_path.is_file()

    def is_empty(self) -> bool:
        """No directory yet, or one holding nothing but a log or lock file (the CLI opens its log first)."""
        if not self.path.exists():
            return True
        return self.path.is_dir() and all(p.name in ("train.log", ".lock") for p in self.path.iterdir())

    def require(self) -> RunDirectory:
        """Raise :class:`RunDirectoryError` with a message saying what is wrong unless this is a run."""
        p = self.path
        if not p.exists():
            raise RunDirectoryError(
                f"no run directory {p}; create one with `moleflow learn {p} NAME=SOURCE` or `moleflow train ... --out {p}`"
            )
        if not p.is_dir():
            raise RunDirectoryError(f"{p} is a file, not a run directory")
        if not os.access(p, os.R_OK | os.X_OK):
            raise RunDirectoryError(f"run directory {p} is not readable by this user; check its permissions")
        if self.is_run():
            return self
        if (p / "train").is_dir() or (p / "test").is_dir() or (p / "split_csv").is_dir():
            raise RunDirectoryError(
                f"{p} looks like a dataset, not a run directory; give the run directory (--out of train)"
            )
        missing = [name for name in (CONFIG_FILE, INDEX_FILE) if not (p / name).is_file()]
        raise RunDirectoryError(
            f"{p} is not a complete run directory: {' and '.join(missing)} missing "
            "(a run is made by `moleflow learn` or `moleflow train`; if you deleted the file, restore it)"
        )

    @contextlib.contextmanager
    def writing(self) -> Iterator[RunDirectory]:
        """Exclusive write access: a lock file, then stale temporaries removed (module docstring)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise RunDirectoryError(f"{self.path} exists and is not a directory; choose another run directory") from None
        except PermissionError as e:
            raise RunDirectoryError(f"cannot create run directory {self.path}: {e.strerror}") from None
        if not os.access(self.path, os.W_OK):
            raise RunDirectoryError(f"run directory {self.path} is not writable by this user (read-only?)")
        with _exclusive_lock(self.path / ".lock"):
            remove_stale_temporaries(self.path)
            yield self

    # ------------------------------------------------------------------ config, index, results

    def read_config(self):
        from moleflow.config import ConfigError, load_run_config

        self.require()
        try:
            return load_run_config(self.config_path)
        except ConfigError as e:
            raise RunDirectoryError(f"{self.config_path}: {e}") from e

    def write_config(self, cfg) -> None:
        from moleflow.config import dump_yaml

        write_text_atomic(dump_yaml(cfg), self.config_path)

    def read_index(self) -> RunIndex:
        self.require()
        return RunIndex.from_json(_read_json(self.index_path), self.index_path)

    def write_index(self, index: RunIndex) -> None:
        write_json_atomic(index.to_json(), self.index_path)

    def read_results(self) -> dict[str, Any] | None:
        return _read_json(self.results_path) if self.results_path.is_file() else None

    def write_results(self, results: Mapping[str, Any]) -> None:
        write_json_atomic(dict(results), self.results_path)

    # ------------------------------------------------------------------ checkpoints

    def task_files(self, index: RunIndex):
        """Where each product of ``index`` is read from: its file, or the staged file of a command that
        was interrupted after its commit (module docstring)."""
        from moleflow.checkpoint import TaskFile, task_file

        files = []
        for record in index.tasks:
            final, staged = (
                task_file(self.checkpoints, record.name),
                task_file(self.checkpoints, record.name, record.parts_id),
            )
            files.append(TaskFile(record.name, staged if staged.is_file() else final, record.parts_id))
        return files

    def load_model(self, cfg, index: RunIndex, parts: bool = True):
        """``(MoLEFlow, Router)`` of the products in ``index``, every file checked against its base and parts ids
        (``parts=False``: the base and the prototypes only; see :meth:`load_parts`)."""
        from moleflow.checkpoint import load_model

        return load_model(cfg, self.checkpoints, self.task_files(index), base_id=index.base_id, parts=parts)

    def load_parts(self, cfg, record: TaskRecord, base_id: str):
        """The parts of the committed product ``record`` (task-neutral keys), its file checked."""
        from moleflow.checkpoint import load_parts

        return load_parts(cfg, self.task_files(RunIndex(base_id, [record]))[0], base_id)

    def write_base(self, model, cfg, base_id: str) -> None:
        from moleflow.checkpoint import save_base

        save_base(model, cfg, self.checkpoints, base_id)

    def stage(self, model, router, cfg, record: TaskRecord, base_id: str) -> None:
        """Write a (re)learned product to its staged file; the run uses it once the index names it."""
        from moleflow.checkpoint import save_task, task_file

        path = task_file(self.checkpoints, record.name, record.parts_id)
        save_task(model, router, cfg, record.name, path, base_id, record.parts_id)

    def commit(
        self, index: RunIndex, router, cfg, before_index: Callable[[], None] | None = None, write_router: bool = True
    ) -> None:
        """``before_index()`` (results and report), the index (the commit point), then :meth:`finalize`."""
        if before_index is not None:
            before_index()
        self.write_index(index)
        self.finalize(index, router, cfg, write_router)

    def finalize(self, index: RunIndex, router, cfg, write_router: bool = True) -> None:
        """After a commit: staged product files move to their names, the router file is rewritten (unless
        ``write_router=False``: a many-product command writes it once, at its end), and product files the
        index does not name are deleted. Every step can be redone after a kill."""
        from moleflow.checkpoint import TASKS_DIR, save_router, task_file

        for record in index.tasks:
            staged = task_file(self.checkpoints, record.name, record.parts_id)
            if staged.is_file():
                os.replace(staged, task_file(self.checkpoints, record.name))
        if index.base_id is not None and write_router:
            save_router(router, cfg, self.checkpoints, index.base_id, [t.parts_id for t in index.tasks])
        keep = {task_file(self.checkpoints, name).name for name in index.names}
        folder = self.checkpoints / TASKS_DIR
        for path in folder.glob("*.safetensors") if folder.is_dir() else ():
            if path.name not in keep:
                path.unlink(missing_ok=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except PermissionError:
        raise RunDirectoryError(f"{path} is not readable by this user; check its permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirectoryError(f"{path} is corrupt ({e}); restore it from a backup or rerun the command") from None


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """``flock`` on ``path``; refuse at once (no waiting) if another process holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no inter-process lock
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(f"another moleflow command is writing {path.parent}; wait for it to finish") from None
        yield
    finally:
        os.close(fd)
