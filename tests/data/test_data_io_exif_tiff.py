"""EXIF orientation on images and masks, and 16-bit / float TIFFs, on files built in a temp dir."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image, ImageOps

from moleflow.data import DatasetError, read_image, read_mask
from moleflow.data.base import FileSample
from moleflow.data.io import image_size, read_mask_for
from moleflow.data.orientation import ORIENTATION_TAG, apply_orientation

tifffile = pytest.importorskip("tifffile")


def _with_orientation(array: np.ndarray, path: Path, orientation: int, **save) -> Path:
    image = Image.fromarray(array)
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    image.save(path, exif=exif, **save)
    return path


def _stored() -> np.ndarray:
    """A 4x6 (HxW) RGB array whose every pixel differs, so any wrong turn shows."""
    return (np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 2) + 1


def _scaled16(values: np.ndarray) -> np.ndarray:
    return np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_turns_like_pillows_exif_transpose(orientation: int) -> None:
    stored = _stored()
    image = Image.fromarray(stored)
    image.getexif()[ORIENTATION_TAG] = orientation
    expected = np.asarray(ImageOps.exif_transpose(image))
    np.testing.assert_array_equal(apply_orientation(stored, orientation), expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_png_with_exif_is_read_as_displayed(tmp_path: Path, orientation: int) -> None:
    path = _with_orientation(_stored(), tmp_path / "o.png", orientation)
    out = read_image(path)
    np.testing.assert_array_equal(out, apply_orientation(_stored(), orientation))
    assert image_size(path) == out.shape[:2]


def test_rotated_phone_jpeg_comes_out_upright(tmp_path: Path) -> None:
    upright = np.zeros((60, 40, 3), np.uint8)  # tall image, bright top band
    upright[:10] = 255
    stored = np.rot90(upright, 1)  # the camera stored it turned 90 degrees counter-clockwise; tag 6 undoes it
    path = _with_orientation(np.ascontiguousarray(stored), tmp_path / "phone.jpg", 6, quality=95)
    out = read_image(path)
    assert out.shape == (60, 40, 3) and image_size(path) == (60, 40)
    assert out[:8].mean() > 240 and out[12:].mean() < 15  # the band is at the top again


def test_mask_drawn_as_displayed_is_accepted_and_left_alone(tmp_path: Path) -> None:
    image = _with_orientation(_stored(), tmp_path / "img.png", 6)  # displayed 6x4 (HxW)
    displayed = np.zeros((6, 4), np.uint8)
    displayed[0, 0] = 255
    mask = tmp_path / "img_mask.png"
    Image.fromarray(displayed).save(mask)
    np.testing.assert_array_equal(read_mask_for(mask, image), displayed > 0)
    sample = FileSample(name="d", label=1, defect="crack", image_path=image, mask_path=mask)
    assert sample.load_image().shape[:2] == sample.load_mask().shape


def test_mask_with_its_own_orientation_tag_is_turned_too(tmp_path: Path) -> None:
    image = _with_orientation(_stored(), tmp_path / "img.png", 6)
    stored_mask = np.zeros((4, 6), np.uint8)
    stored_mask[3, 0] = 255  # bottom-left as stored -> top-left after turning clockwise
    mask = _with_orientation(stored_mask, tmp_path / "img_mask.png", 6)
    out = read_mask_for(mask, image)
    assert out.shape == (6, 4) and out[0, 0] == 1 and out.sum() == 1


def test_mask_of_the_stored_pixels_is_refused_with_the_reason(tmp_path: Path) -> None:
    image = _with_orientation(_stored(), tmp_path / "img.png", 8)
    mask = tmp_path / "img_mask.png"
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(mask)
    with pytest.raises(DatasetError, match=r"img_mask\.png.*img\.png.*rotated 270 degrees.*displayed orientation"):
        read_mask_for(mask, image)
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(mask)
    with pytest.raises(DatasetError, match="masks must have the image's size"):
        read_mask_for(mask, image)


def test_normal_image_mask_has_the_displayed_size(tmp_path: Path) -> None:
    image = _with_orientation(_stored(), tmp_path / "img.png", 5)
    mask = FileSample(name="n", label=0, defect="good", image_path=image).load_mask()
    assert mask is not None and mask.shape == (6, 4) and not mask.any()


def test_damaged_orientation_value_is_ignored(tmp_path: Path) -> None:
    path = _with_orientation(_stored(), tmp_path / "o.png", 42)
    np.testing.assert_array_equal(read_image(path), _stored())


# --------------------------------------------------------------------------- TIFF bit depths


def test_sixteen_bit_rgb_tiff_keeps_its_precision(tmp_path: Path) -> None:
    values = np.array([[[0, 257, 65535], [1000, 30000, 32896]]], dtype=np.uint16)  # 1x2 RGB
    path = tmp_path / "rgb16.tif"
    tifffile.imwrite(path, values, photometric="rgb")
    with Image.open(path) as image:
        assert image.mode == "RGB"  # Pillow would hand us the high byte only
    out = read_image(path)
    np.testing.assert_array_equal(out, _scaled16(values))  # 1000 -> 4 (Pillow's high byte: 3)
    assert out[0, 1].tolist() == [4, 117, 128]


def test_sixteen_bit_rgba_and_planar_tiffs(tmp_path: Path) -> None:
    rgba = np.zeros((2, 3, 4), dtype=np.uint16)
    rgba[..., 0], rgba[..., 3] = 65535, 123  # red, alpha dropped
    tifffile.imwrite(tmp_path / "a.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    assert (read_image(tmp_path / "a.tif") == [255, 0, 0]).all()
    planar = np.stack([np.full((2, 3), v, np.uint16) for v in (65535, 0, 32896)])  # (3, H, W)
    tifffile.imwrite(tmp_path / "p.tif", planar, photometric="rgb", planarconfig="separate")
    out = read_image(tmp_path / "p.tif")
    assert out.shape == (2, 3, 3) and (out == [255, 0, 128]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_tiffs_grey_and_rgb_read_as_unit_range(tmp_path: Path, dtype: type) -> None:
    grey = np.array([[0.0, 0.5, 1.0, 2.0, -1.0]], dtype=dtype)
    tifffile.imwrite(tmp_path / "g.tif", grey)
    np.testing.assert_array_equal(read_image(tmp_path / "g.tif")[0, :, 0], [0, 128, 255, 255, 0])
    rgb = np.stack([grey, grey / 2, np.zeros_like(grey)], axis=-1)
    tifffile.imwrite(tmp_path / "c.tif", rgb, photometric="rgb")
    out = read_image(tmp_path / "c.tif")
    np.testing.assert_array_equal(out[0, :, 1], [0, 64, 128, 255, 0])
    assert image_size(tmp_path / "c.tif") == (1, 5)


def test_tiff_orientation_tag_is_applied_on_the_tifffile_path(tmp_path: Path) -> None:
    values = (np.arange(4 * 6 * 3).reshape(4, 6, 3) * 1000).astype(np.uint16)
    path = tmp_path / "o.tif"
    tifffile.imwrite(path, values, photometric="rgb", extratags=[(274, "H", 1, 6, False)])
    out = read_image(path)
    np.testing.assert_array_equal(out, apply_orientation(_scaled16(values), 6))
    assert image_size(path) == (6, 4)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_eight_bit_tiff_orientation_on_the_pillow_path(tmp_path: Path, orientation: int) -> None:
    path = tmp_path / "o8.tif"
    tifffile.imwrite(path, _stored(), photometric="rgb", extratags=[(274, "H", 1, orientation, False)])
    expected = apply_orientation(_stored(), orientation)  # turned once, whatever Pillow does by itself
    np.testing.assert_array_equal(read_image(path), expected)
    assert image_size(path) == expected.shape[:2]


def test_sixteen_bit_tiff_mask_binarises(tmp_path: Path) -> None:
    mask = np.zeros((2, 2, 3), np.uint16)
    mask[0, 1] = 65535
    tifffile.imwrite(tmp_path / "m.tif", mask, photometric="rgb")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.tif"), [[0, 1], [0, 0]])


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_garbage_tiff_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.tif"
    path.write_bytes(b"II*\x00garbage")
    with pytest.raises(DatasetError, match=r"bad\.tif"):
        read_image(path)


@settings(max_examples=25, deadline=None)
@given(values=hnp.arrays(np.uint16, hnp.array_shapes(min_dims=2, max_dims=2, max_side=6)), rgb=st.booleans())
def test_sixteen_bit_scaling_property(tmp_path_factory: pytest.TempPathFactory, values: np.ndarray, rgb: bool) -> None:
    path = tmp_path_factory.mktemp("t") / "v.tif"
    array = np.stack([values, values[::-1, ::-1], values], axis=-1) if rgb else values
    tifffile.imwrite(path, array, photometric="rgb" if rgb else "minisblack")
    expected = _scaled16(array) if rgb else np.repeat(_scaled16(values)[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(read_image(path), expected)
