"""Plain folder tasks: the documented split rule, optional bad images and masks, and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data_builders import WritePng, rgb, square_mask

from moleflow.data import DatasetError, load_folder_task
from moleflow.data.folder import folder_task_name


def _goods(root: Path, write_png: WritePng, count: int) -> Path:
    for i in range(count):
        write_png(root / f"{i:02d}.png", rgb(i))
    return root


def test_every_fifth_good_is_held_out_with_masks(tmp_path: Path, write_png: WritePng) -> None:
    good = _goods(tmp_path / "screws" / "good", write_png, 12)
    bad, masks = tmp_path / "bad", tmp_path / "masks"
    write_png(bad / "b0.png", rgb(200))
    write_png(bad / "b1.jpg", rgb(210))
    write_png(masks / "b0_mask.png", square_mask())
    write_png(masks / "b1.png", square_mask())
    task = load_folder_task(good, bad, masks)
    assert task.name == "screws" and task.has_masks
    assert [s.name for s in task.train] == [f"good/{i:02d}.png" for i in range(12) if i not in (4, 9)]
    assert [s.name for s in task.test] == ["good/04.png", "good/09.png", "bad/b0.png", "bad/b1.jpg"]
    assert [s.label for s in task.test] == [0, 0, 1, 1]
    mask = task.test[3].load_mask()
    assert mask is not None and mask.sum() == 4
    normal_mask = task.test[0].load_mask()
    assert normal_mask is not None and not normal_mask.any()
    np.testing.assert_array_equal(task.test[0].load_image(), rgb(4))


def test_without_bad_dir_test_holds_the_held_out_goods(tmp_path: Path, write_png: WritePng) -> None:
    task = load_folder_task(_goods(tmp_path / "parts", write_png, 5), name="p")
    assert task.name == "p" and not task.has_masks
    assert len(task.train) == 4 and [s.name for s in task.test] == ["good/04.png"]
    assert task.test[0].load_mask() is None


def test_bad_without_masks_has_no_pixel_metrics(tmp_path: Path, write_png: WritePng) -> None:
    write_png(tmp_path / "bad" / "x.png", rgb(1))
    task = load_folder_task(_goods(tmp_path / "good", write_png, 2), tmp_path / "bad")
    assert not task.has_masks and task.n_anomalous == 1 and len(task.train) == 2
    assert task.test[0].load_mask() is None


def test_too_few_goods_without_bad_dir(tmp_path: Path, write_png: WritePng) -> None:
    with pytest.raises(DatasetError, match="at least 5 images or a BAD_DIR"):
        load_folder_task(_goods(tmp_path / "good", write_png, 4))


def test_bad_image_without_mask_is_named(tmp_path: Path, write_png: WritePng) -> None:
    write_png(tmp_path / "bad" / "scratch7.png", rgb(1))
    (tmp_path / "masks").mkdir()
    with pytest.raises(DatasetError, match=r"scratch7\.png.*Add the masks"):
        load_folder_task(_goods(tmp_path / "good", write_png, 5), tmp_path / "bad", tmp_path / "masks")


def test_mask_dir_needs_bad_dir_and_dirs_must_exist(tmp_path: Path, write_png: WritePng) -> None:
    good = _goods(tmp_path / "good", write_png, 5)
    with pytest.raises(DatasetError, match="MASK_DIR was given without a BAD_DIR"):
        load_folder_task(good, None, tmp_path)
    with pytest.raises(DatasetError, match="GOOD_DIR.*no such directory"):
        load_folder_task(tmp_path / "nothing")
    with pytest.raises(DatasetError, match="BAD_DIR.*no image files"):
        load_folder_task(good, tmp_path / "good" / "..")


def test_folder_task_name() -> None:
    assert folder_task_name("/data/metal nuts/good") == "metal_nuts"
    assert folder_task_name("/data/widgets") == "widgets"
