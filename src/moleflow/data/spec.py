"""Task SPEC strings (``moleflow train --tasks SPEC[,SPEC...]``) -> :class:`TaskData`.

Grammar (DESIGN.md, CLI)::

    SPEC   := CATEGORY | [NAME=]SOURCE
    SOURCE := DIRECTORY                          (NAME= required; a category in MVTec layout)
            | elpv:mono | elpv:poly              (the elpv-dataset package)
            | synthetic:KIND                     (KIND in stripes, dots, grid, disc)
            | folder:GOOD_DIR[:BAD_DIR[:MASK_DIR]]

- ``CATEGORY`` is a name under the data root: VisA if ``ROOT/split_csv/1cls.csv`` exists, else the
  directory ``ROOT/CATEGORY`` in MVTec AD / MPDD / MVTec 3D-AD layout (detected from its contents).
- ``NAME=DIRECTORY``: a relative ``DIRECTORY`` is taken from the working directory, or else from the
  data root if it exists there.
- Without ``NAME=``, elpv/synthetic/folder sources are named ``elpv_mono``, ``synthetic_KIND`` and after
  the folder (:func:`moleflow.data.folder.folder_task_name`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from moleflow.data.base import TaskData, check_task_name
from moleflow.data.elpv import ELPV_KINDS, load_elpv_task
from moleflow.data.errors import DatasetError
from moleflow.data.folder import load_folder_task
from moleflow.data.io import describe_directory
from moleflow.data.mvtec import load_mvtec_task
from moleflow.data.synthetic import SYNTHETIC_KINDS, make_synthetic_task
from moleflow.data.visa import is_visa_root, load_visa_task, visa_categories

SOURCE_SCHEMES = ("elpv", "synthetic", "folder")
SPEC_HELP = (
    "a SPEC is CATEGORY (a directory under --data ROOT, or a VisA category), NAME=DIRECTORY (MVTec layout), "
    "[NAME=]elpv:mono|poly, [NAME=]synthetic:KIND (KIND: " + ", ".join(SYNTHETIC_KINDS) + ") or "
    "[NAME=]folder:GOOD_DIR[:BAD_DIR[:MASK_DIR]]"
)


def _scheme(source: str) -> tuple[str, str] | None:
    """``("elpv", "mono")`` for ``"elpv:mono"``; None if ``source`` names no known scheme."""
    scheme, sep, rest = source.partition(":")
    return (scheme, rest) if sep and scheme in SOURCE_SCHEMES else None


def _unknown_scheme(spec: str, source: str) -> DatasetError:
    return DatasetError(
        f"task spec {spec!r}: unknown source kind {source.split(':')[0]!r} (and no such directory); "
        f"known kinds: {', '.join(s + ':' for s in SOURCE_SCHEMES)}. {SPEC_HELP}"
    )


def _from_scheme(scheme: str, argument: str, name: str | None) -> TaskData:
    if scheme == "elpv":
        if argument not in ELPV_KINDS:
            raise DatasetError(f"elpv:{argument}: expected elpv:mono or elpv:poly")
        return load_elpv_task(argument, name=name)
    if scheme == "synthetic":
        if argument not in SYNTHETIC_KINDS:
            raise DatasetError(f"synthetic:{argument}: unknown kind; expected one of {SYNTHETIC_KINDS}")
        return make_synthetic_task(argument, name=name)
    parts = argument.split(":")
    if len(parts) > 3 or not all(parts):
        raise DatasetError(f"folder:{argument}: expected folder:GOOD_DIR[:BAD_DIR[:MASK_DIR]] with non-empty directories")
    good, bad, masks = (*parts, None, None)[:3]
    return load_folder_task(good, bad, masks, name=name)


def _resolve_directory(source: str, data_root: Path | None) -> Path:
    path = Path(source).expanduser()
    if not path.is_absolute() and not path.exists() and data_root is not None and (data_root / path).exists():
        return data_root / path
    return path


def _from_category(category: str, data_root: Path | None) -> TaskData:
    if data_root is None:
        raise DatasetError(
            f"task {category!r} is a category name but no data root was given; pass --data ROOT "
            f"(the directory holding {category}/), or write {category}=/path/to/{category}. {SPEC_HELP}"
        )
    if not data_root.is_dir():
        raise DatasetError(f"data root {data_root} is {describe_directory(data_root)}; expected a directory")
    if is_visa_root(data_root):
        if category not in visa_categories(data_root):
            raise DatasetError(
                f"{category!r} is not a VisA category of {data_root}; known: {list(visa_categories(data_root))}"
            )
        return load_visa_task(data_root, category)
    if not (data_root / category).is_dir():
        raise DatasetError(
            f"no category directory {data_root / category}; the data root holds {describe_directory(data_root)}. {SPEC_HELP}"
        )
    return load_mvtec_task(data_root / category, name=category)


def resolve_task(spec: str, data_root: str | Path | None = None) -> TaskData:
    """Parse one SPEC (grammar in the module docstring) and load its task; DatasetError if invalid."""
    spec = spec.strip()
    root = Path(data_root).expanduser() if data_root is not None else None
    name, sep, source = spec.partition("=")
    if not sep:
        name, source = "", spec
    elif not name or not source:
        raise DatasetError(f"invalid task spec {spec!r}: NAME and SOURCE must both be non-empty. {SPEC_HELP}")
    task_name = check_task_name(name) if name else None
    scheme = _scheme(source)
    if scheme is not None:
        return _from_scheme(*scheme, task_name)
    if task_name is not None:
        directory = _resolve_directory(source, root)
        if not directory.is_dir() and ":" in source:
            raise _unknown_scheme(spec, source)
        return load_mvtec_task(directory, name=task_name)
    if "/" in source or "\\" in source:
        suggested = Path(source).name or "NAME"
        raise DatasetError(f"task spec {spec!r} looks like a path; name the task: {suggested}={source}. {SPEC_HELP}")
    if ":" in source:
        raise _unknown_scheme(spec, source)
    return _from_category(source, root)


def resolve_tasks(
    specs: Sequence[str], data_root: str | Path | None = None, limits: tuple[int, int] | None = None
) -> list[TaskData]:
    """Resolve several SPECs; ``limits = (max train, max test)`` subsamples each task deterministically.

    Task names must be unique (they key checkpoints and results).
    """
    from moleflow.data.subsample import subsample_task

    if not specs:
        raise DatasetError("no tasks given; pass --tasks SPEC,SPEC,... (e.g. synthetic:stripes,synthetic:disc)")
    tasks = [resolve_task(spec, data_root) for spec in specs]
    if limits is not None:
        tasks = [subsample_task(t, *limits) for t in tasks]
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetError(f"task names must be unique, got {duplicates} more than once; name them: NAME=SOURCE")
    return tasks


def parse_limits(text: str | None) -> tuple[int, int] | None:
    """``"60,80"`` -> ``(60, 80)`` (max train, max test images per task); None stays None."""
    if text is None:
        return None
    try:
        train, test = (int(v) for v in text.split(","))
    except ValueError:
        raise DatasetError(f"--limits must look like TRAIN,TEST (e.g. 60,80), got {text!r}") from None
    if train < 2 or test < 2:
        raise DatasetError(f"--limits needs at least 2 training and 2 test images per task, got {text!r}")
    return train, test
