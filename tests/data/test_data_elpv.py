"""ELPV tasks from the elpv-dataset package: the documented split, counts, no masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data_builders import WritePng

from moleflow.data import DatasetError, load_elpv_task
from moleflow.data.elpv import ElpvRecord, default_labels_csv, parse_elpv_labels, split_elpv

pytest.importorskip("elpv_dataset")

# (train normals, test normals, test anomalous) with elpv-dataset 1.0.0
EXPECTED = {"mono": (441, 147, 313), "poly": (690, 230, 402)}


@pytest.mark.parametrize("kind", ["mono", "poly"])
def test_counts_and_only_certain_labels(kind: str) -> None:
    task = load_elpv_task(kind)
    n_train, n_test_normal, n_anomalous = EXPECTED[kind]
    assert task.name == f"elpv_{kind}" and not task.has_masks
    assert len(task.train) == n_train
    assert len(task.test) - task.n_anomalous == n_test_normal and task.n_anomalous == n_anomalous
    probability = {f"elpv/{r.kind}/{r.path.stem}": r.probability for r in parse_elpv_labels(default_labels_csv())}
    assert all(probability[s.name] == 0.0 for s in (*task.train, *task.test) if s.label == 0)
    assert all(probability[s.name] == 1.0 for s in task.test if s.label == 1)
    assert all(s.name.startswith(f"elpv/{kind}/") for s in (*task.train, *task.test))


def test_split_is_deterministic_and_disjoint() -> None:
    first, second = load_elpv_task("mono"), load_elpv_task("mono")
    assert [s.name for s in first.train] == [s.name for s in second.train]
    assert [s.name for s in first.test] == [s.name for s in second.test]
    assert not {s.name for s in first.train} & {s.name for s in first.test}
    poly = load_elpv_task("poly")
    assert not {s.name for s in first.test} & {s.name for s in poly.test}


def test_image_loads_as_rgb_without_mask() -> None:
    sample = load_elpv_task("poly").test[-1]
    image = sample.load_image()
    assert image.shape == (300, 300, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], image[..., 2])  # greyscale source
    assert sample.load_mask() is None


def test_split_rule_every_fourth_sorted_normal() -> None:
    records = tuple(ElpvRecord(Path(f"images/cell{i:04d}.png"), 0.0, "mono") for i in reversed(range(9)))
    records += (ElpvRecord(Path("images/cell0100.png"), 1.0, "mono"),)
    records += (ElpvRecord(Path("images/cell0101.png"), 1 / 3, "mono"),)
    train, test, anomalous = split_elpv(records, "mono")
    assert [r.path.stem for r in test] == ["cell0003", "cell0007"]
    assert len(train) == 7 and [r.path.stem for r in anomalous] == ["cell0100"]
    with pytest.raises(DatasetError, match="unknown elpv cell type"):
        split_elpv(records, "tri")


def test_custom_labels_file_and_bad_lines(tmp_path: Path, write_png: WritePng) -> None:
    for i in range(5):
        write_png(tmp_path / "images" / f"c{i}.png", np.full((6, 6), 40 * i, np.uint8))
    lines = [f"images/c{i}.png 0.0 poly" for i in range(4)] + ["images/c4.png 1.0 poly"]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    task = load_elpv_task("poly", name="cells", labels_csv=tmp_path / "labels.csv")
    assert task.name == "cells" and len(task.train) == 3 and [s.label for s in task.test] == [0, 1]
    assert (task.test[1].load_image() == 160).all()
    (tmp_path / "labels.csv").write_text("images/c0.png zero poly\n")
    with pytest.raises(DatasetError, match="line 1: expected 'PATH PROBABILITY TYPE'"):
        parse_elpv_labels(tmp_path / "labels.csv")
    (tmp_path / "labels.csv").write_text("images/c0.png 0.0 tri\n")
    with pytest.raises(DatasetError, match="type one of"):
        parse_elpv_labels(tmp_path / "labels.csv")
