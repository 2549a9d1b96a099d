"""The CLI task SPEC grammar: every source kind, derived names, and errors that say how to fix."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from data_builders import WritePng, rgb

from moleflow.data import DatasetError, resolve_task

MakeMvtec = Callable[..., Path]


def test_synthetic_with_and_without_name() -> None:
    assert resolve_task("synthetic:dots").name == "synthetic_dots"
    task = resolve_task("blobs=synthetic:disc")
    assert task.name == "blobs" and task.source.startswith("synthetic:disc")


def test_elpv_names() -> None:
    pytest.importorskip("elpv_dataset")
    assert resolve_task("elpv:poly").name == "elpv_poly"
    assert resolve_task(" cells=elpv:mono ").name == "cells"


def test_category_under_data_root(make_mvtec: MakeMvtec) -> None:
    root = make_mvtec()
    task = resolve_task(root.name, root.parent)
    assert task.name == root.name and len(task.train) == 3


def test_named_directory_absolute_and_relative_to_data_root(make_mvtec: MakeMvtec) -> None:
    root = make_mvtec()
    assert resolve_task(f"mine={root}").name == "mine"
    assert len(resolve_task(f"mine={root.name}", root.parent).test) == 5


def test_folder_spec(tmp_path: Path, write_png: WritePng) -> None:
    for i in range(5):
        write_png(tmp_path / "widgets" / "good" / f"{i}.png", rgb(i))
    write_png(tmp_path / "widgets" / "bad" / "x.png", rgb(9))
    good, bad = tmp_path / "widgets" / "good", tmp_path / "widgets" / "bad"
    assert resolve_task(f"folder:{good}").name == "widgets"
    task = resolve_task(f"w=folder:{good}:{bad}")
    assert task.name == "w" and task.n_anomalous == 1 and not task.has_masks
    with pytest.raises(DatasetError, match=r"folder:GOOD_DIR\[:BAD_DIR\[:MASK_DIR\]\]"):
        resolve_task(f"folder:{good}:{bad}:{bad}:{bad}")
    with pytest.raises(DatasetError, match="non-empty"):
        resolve_task(f"folder:{good}::{bad}")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("synthetic:waves", r"unknown kind; expected one of \('stripes'"),
        ("elpv:tri", "expected elpv:mono or elpv:poly"),
        ("bogus:thing", r"unknown source kind 'bogus'.*elpv:, synthetic:, folder:"),
        ("x=bogus:thing", r"unknown source kind 'bogus'"),
        ("=synthetic:disc", "NAME and SOURCE must both be non-empty"),
        ("x=", "NAME and SOURCE must both be non-empty"),
        ("bad name=synthetic:disc", "invalid task name 'bad name'"),
        ("hazelnut", r"no data root was given; pass --data ROOT.*hazelnut=/path/to/hazelnut"),
        ("/data/mvtec/bottle", r"looks like a path; name the task: bottle=/data/mvtec/bottle"),
    ],
)
def test_errors_say_how_to_fix(spec: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        resolve_task(spec)


def test_unknown_category_lists_the_root(make_mvtec: MakeMvtec) -> None:
    root = make_mvtec()
    with pytest.raises(DatasetError, match=rf"no category directory .*carpet.*'{root.name}/'"):
        resolve_task("carpet", root.parent)
    with pytest.raises(DatasetError, match="data root .* no such directory"):
        resolve_task("carpet", root / "absent")


def test_named_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such directory.*MVTec layout"):
        resolve_task(f"x={tmp_path / 'absent'}")
