"""Sample and TaskData invariants."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data_builders import WritePng, rgb

from moleflow.data import ArraySample, DatasetError, FileSample, TaskData


def _array(name: str, label: int = 0, defect: str = "good") -> ArraySample:
    mask = np.zeros((4, 4), np.float32)
    if label:
        mask[1, 1] = 1.0
    return ArraySample(name=name, label=label, defect=defect, image=np.zeros((4, 4, 3), np.uint8), mask=mask)


def test_label_and_defect_must_agree() -> None:
    with pytest.raises(DatasetError, match="label must be 0"):
        _array("x", label=2, defect="crack")
    with pytest.raises(DatasetError, match="defect must be 'good'"):
        _array("x", label=1, defect="good")
    with pytest.raises(DatasetError, match="defect must be 'good'"):
        _array("x", label=0, defect="crack")


def test_array_sample_returns_copies_of_read_only_arrays() -> None:
    source = np.full((4, 4, 3), 7, np.uint8)
    sample = ArraySample(name="a", label=0, defect="good", image=source, mask=np.zeros((4, 4), np.float32))
    source[:] = 0  # the caller's array is copied, not aliased
    image = sample.load_image()
    image[:] = 1
    np.testing.assert_array_equal(sample.load_image(), np.full((4, 4, 3), 7, np.uint8))
    assert sample.has_mask and sample.load_mask() is not None


def test_array_sample_rejects_bad_shapes() -> None:
    with pytest.raises(DatasetError, match=r"\(H, W, 3\) uint8"):
        ArraySample(name="a", label=0, defect="good", image=np.zeros((4, 4), np.uint8))
    with pytest.raises(DatasetError, match="mask shape"):
        ArraySample(name="a", label=0, defect="good", image=np.zeros((4, 4, 3), np.uint8), mask=np.zeros((3, 4)))


def test_file_sample_normal_mask_is_zero_of_image_size(tmp_path: Path, write_png: WritePng) -> None:
    path = write_png(tmp_path / "img.png", np.zeros((5, 7, 3), np.uint8))
    mask = FileSample(name="n", label=0, defect="good", image_path=path).load_mask()
    assert mask is not None and mask.shape == (5, 7) and mask.dtype == np.float32 and not mask.any()
    unmasked = FileSample(name="n", label=0, defect="good", image_path=path, masked=False)
    assert unmasked.load_mask() is None and not unmasked.has_mask


def test_file_sample_mask_size_mismatch_names_both_files(tmp_path: Path, write_png: WritePng) -> None:
    image = write_png(tmp_path / "img.png", rgb(1))
    mask = write_png(tmp_path / "img_mask.png", np.zeros((3, 3), np.uint8))
    sample = FileSample(name="d", label=1, defect="crack", image_path=image, mask_path=mask)
    with pytest.raises(DatasetError, match=r"img_mask\.png.*img\.png"):
        sample.load_mask()


def test_anomalous_file_sample_needs_a_mask_when_masked(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="has no mask"):
        FileSample(name="d", label=1, defect="crack", image_path=tmp_path / "x.png")


def test_task_data_validates() -> None:
    good, bad = _array("g"), _array("b", 1, "crack")
    task = TaskData(name="t", train=(good,), test=(_array("g2"), bad), has_masks=True, source="test")
    assert task.n_anomalous == 1
    with pytest.raises(DatasetError, match="must be normal"):
        TaskData(name="t", train=(bad,), test=(good,), has_masks=True, source="s")
    with pytest.raises(DatasetError, match="duplicate sample names"):
        TaskData(name="t", train=(good,), test=(good,), has_masks=True, source="s")
    with pytest.raises(DatasetError, match="invalid task name"):
        TaskData(name="a/b", train=(good,), test=(bad,), has_masks=True, source="s")
    with pytest.raises(DatasetError, match="no training images"):
        TaskData(name="t", train=(), test=(bad,), has_masks=True, source="s")
    with pytest.raises(DatasetError, match="has_masks=False"):
        TaskData(name="t", train=(good,), test=(bad,), has_masks=False, source="s")
