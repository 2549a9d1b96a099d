"""MVTec AD / MPDD / MVTec 3D-AD layouts: parsing, both mask namings, helpful errors, real shared data."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from data_builders import SIZE, WritePng, rgb

from moleflow.data import DatasetError, load_mvtec_task, resolve_task

MakeMvtec = Callable[..., Path]
EXPECTED_TEST = (
    "test/crack/000.png",
    "test/crack/001.png",
    "test/good/000.png",
    "test/good/001.png",
    "test/hole/000.png",
)


@pytest.mark.parametrize("mask_suffix", ["_mask", ""])
def test_2d_layout_with_both_mask_namings(make_mvtec: MakeMvtec, mask_suffix: str) -> None:
    root = make_mvtec(mask_suffix=mask_suffix)
    task = load_mvtec_task(root, name="cat")
    assert task.name == "cat" and task.has_masks
    assert [s.name for s in task.train] == ["train/good/000.png", "train/good/001.png", "train/good/002.png"]
    assert tuple(s.name for s in task.test) == EXPECTED_TEST
    assert [s.label for s in task.test] == [1, 1, 0, 0, 1]
    assert [s.defect for s in task.test] == ["crack", "crack", "good", "good", "hole"]
    defective = task.test[0].load_mask()
    assert defective is not None and defective.sum() == 4 and defective[2:4, 2:4].all()
    normal = task.test[2].load_mask()
    assert normal is not None and normal.shape == (SIZE, SIZE) and not normal.any()
    np.testing.assert_array_equal(task.train[1].load_image(), rgb(11))


def test_jpeg_images_with_png_masks(make_mvtec: MakeMvtec) -> None:
    task = load_mvtec_task(make_mvtec(mask_suffix="", ext=".jpg"))
    mask_paths = [s.mask_path for s in task.test if s.label == 1]
    assert all(p is not None and p.suffix == ".png" for p in mask_paths)
    assert task.test[0].load_image().shape == (SIZE, SIZE, 3)


def test_mvtec_3d_rgb_layout(make_mvtec: MakeMvtec) -> None:
    task = load_mvtec_task(make_mvtec(layout="3d"))
    assert [s.name for s in task.train][0] == "train/good/rgb/000.png"
    assert [s.name for s in task.test] == [n.replace("/0", "/rgb/0") for n in EXPECTED_TEST]
    assert all(s.mask_path is not None and s.mask_path.parent.name == "gt" for s in task.test if s.label)
    assert "3D" in task.source
    mask = task.test[4].load_mask()
    assert mask is not None and mask.sum() == 4


def test_name_defaults_to_directory(make_mvtec: MakeMvtec) -> None:
    root = make_mvtec()
    assert load_mvtec_task(root).name == root.name


def test_missing_train_good_says_what_was_expected(make_mvtec: MakeMvtec) -> None:
    root = make_mvtec()
    shutil.rmtree(root / "train")
    with pytest.raises(DatasetError, match=r"expected CATEGORY/train/good.*found.*'ground_truth/'.*'test/'"):
        load_mvtec_task(root)


def test_empty_train_good_is_an_error(make_mvtec: MakeMvtec) -> None:
    root = make_mvtec()
    for path in (root / "train" / "good").glob("*.png"):
        path.unlink()
    with pytest.raises(DatasetError, match=r"CATEGORY/train/good with images.*no image files"):
        load_mvtec_task(root)


def test_empty_defect_directory_is_an_error(make_mvtec: MakeMvtec) -> None:
    root = make_mvtec()
    (root / "test" / "scratch").mkdir()
    with pytest.raises(DatasetError, match=r"CATEGORY/test/scratch with images"):
        load_mvtec_task(root)


def test_missing_test_directory_is_an_error(make_mvtec: MakeMvtec) -> None:
    root = make_mvtec()
    shutil.rmtree(root / "test")
    with pytest.raises(DatasetError, match=r"expected CATEGORY/test/good and CATEGORY/test/DEFECT"):
        load_mvtec_task(root)


def test_defect_image_without_mask_is_named(make_mvtec: MakeMvtec) -> None:
    root = make_mvtec()
    (root / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"(?s)1 defective.*test/crack/001\.png.*ground_truth/crack/001_mask"):
        load_mvtec_task(root)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such directory"):
        load_mvtec_task(tmp_path / "absent")


def test_corrupt_image_fails_at_load_naming_the_file(make_mvtec: MakeMvtec, write_png: WritePng) -> None:
    root = make_mvtec()
    (root / "test" / "good" / "001.png").write_bytes(b"\x89PNG garbage")
    task = load_mvtec_task(root)  # parsing lists files only
    with pytest.raises(DatasetError, match=r"test/good/001\.png"):
        task.test[3].load_image()


def test_real_hazelnut_toy(hazelnut_root: Path) -> None:
    task = resolve_task("hazelnut", hazelnut_root)
    assert (len(task.train), len(task.test), task.n_anomalous) == (28, 23, 17)
    sample = next(s for s in task.test if s.label == 1)
    image, mask = sample.load_image(), sample.load_mask()
    assert image.dtype == np.uint8 and image.shape[2] == 3
    assert mask is not None and mask.shape == image.shape[:2] and 0 < mask.sum() < mask.size
    assert set(np.unique(mask)) <= {0.0, 1.0}


def test_real_mpdd_metal_plate(mpdd_plate: Path) -> None:
    task = resolve_task(f"plate={mpdd_plate}")
    assert task.name == "plate"
    assert (len(task.train), len(task.test), task.n_anomalous) == (54, 107, 81)
    defective = next(s for s in task.test if s.label == 1)
    assert defective.mask_path is not None and defective.mask_path.name.endswith("_mask.png")
    mask = defective.load_mask()
    assert mask is not None and mask.any()
