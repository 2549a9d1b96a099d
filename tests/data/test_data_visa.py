"""VisA raw layout driven by split_csv/1cls.csv."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from moleflow.data import DatasetError, load_visa_task, resolve_task
from moleflow.data.visa import visa_categories

MakeVisa = Callable[..., Path]


def test_parses_one_category(make_visa: MakeVisa) -> None:
    root = make_visa()
    assert visa_categories(root) == ("candle", "pcb1")
    task = load_visa_task(root, "candle")
    assert task.name == "candle" and task.has_masks
    assert len(task.train) == 3 and len(task.test) == 4 and task.n_anomalous == 2
    assert all(s.name.startswith("candle/") for s in (*task.train, *task.test))
    assert {s.defect for s in task.test} == {"good", "anomaly"}
    anomalous = next(s for s in task.test if s.label == 1)
    mask = anomalous.load_mask()  # stored as 0/1, binarised to {0, 1}
    assert mask is not None and mask.sum() == 4 and mask.max() == 1.0


def test_spec_detects_visa_root(make_visa: MakeVisa) -> None:
    task = resolve_task("pcb1", make_visa())
    assert task.name == "pcb1" and task.n_anomalous == 2


def test_unknown_category_lists_known(make_visa: MakeVisa) -> None:
    with pytest.raises(DatasetError, match=r"'fryum'.*known categories: \['candle', 'pcb1'\]"):
        load_visa_task(make_visa(), "fryum")


def test_wrong_header(make_visa: MakeVisa) -> None:
    root = make_visa(header="object,split,label,image")
    with pytest.raises(DatasetError, match=r"missing \['mask'\]"):
        load_visa_task(root, "candle")


def test_anomaly_without_mask(make_visa: MakeVisa) -> None:
    root = make_visa()
    row = "candle,test,anomaly,candle/Data/Images/Anomaly/test000.JPG,"
    (root / "split_csv" / "1cls.csv").write_text("object,split,label,image,mask\n" + row + "\n")
    with pytest.raises(DatasetError, match=r"line 2: anomalous image .*test000\.JPG needs a mask"):
        load_visa_task(root, "candle")


def test_anomaly_in_train_and_bad_labels(make_visa: MakeVisa) -> None:
    root = make_visa()
    csv_path = root / "split_csv" / "1cls.csv"
    image, mask = "candle/Data/Images/Anomaly/test000.JPG", "candle/Data/Masks/Anomaly/test000.png"
    csv_path.write_text(f"object,split,label,image,mask\ncandle,train,anomaly,{image},{mask}\n")
    with pytest.raises(DatasetError, match="training rows must be normal"):
        load_visa_task(root, "candle")
    csv_path.write_text(f"object,split,label,image,mask\ncandle,val,normal,{image},\n")
    with pytest.raises(DatasetError, match="split must be one of"):
        load_visa_task(root, "candle")


def test_missing_image_file(make_visa: MakeVisa) -> None:
    root = make_visa()
    (root / "candle" / "Data" / "Images" / "Normal" / "train000.JPG").unlink()
    with pytest.raises(DatasetError, match=r"train000\.JPG does not exist"):
        load_visa_task(root, "candle")
