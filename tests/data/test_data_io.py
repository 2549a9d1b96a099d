"""Image and mask reading: every mode to RGB uint8 with the right values; broken files name themselves."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moleflow.data import DatasetError, list_images, read_image, read_mask
from moleflow.data.io import image_size


def _save(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


def test_grey_l_is_repeated_to_three_channels(tmp_path: Path) -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = read_image(_save(Image.fromarray(grey, mode="L"), tmp_path / "g.png"))
    assert out.dtype == np.uint8 and out.shape == (3, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], grey)


def test_rgba_drops_alpha_and_keeps_colours(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 10, 200, 30
    rgba[..., 3] = [[0, 255], [128, 7]]
    out = read_image(_save(Image.fromarray(rgba, mode="RGBA"), tmp_path / "a.png"))
    assert out.shape == (2, 2, 3)
    assert (out == np.array([10, 200, 30], dtype=np.uint8)).all()


def test_palette_looks_up_colours(tmp_path: Path) -> None:
    image = Image.fromarray(np.array([[0, 1], [1, 2]], dtype=np.uint8), mode="P")
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    out = read_image(_save(image, tmp_path / "p.png"))
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [0, 255, 0])
    np.testing.assert_array_equal(out[1, 1], [0, 0, 255])


def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "i16.png")
    assert Image.open(path).mode.startswith("I")  # the file really is 16-bit
    out = read_image(path)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_float_mode_reads_unit_range(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.5, 1.0, 2.0]], dtype=np.float32)
    out = read_image(_save(Image.fromarray(values, mode="F"), tmp_path / "f.tiff"))
    np.testing.assert_array_equal(out[0, :, 1], [0, 128, 255, 255])


def test_la_and_cmyk_modes(tmp_path: Path) -> None:
    la = np.stack([np.full((2, 2), 90, np.uint8), np.zeros((2, 2), np.uint8)], axis=-1)
    assert (read_image(_save(Image.fromarray(la, mode="LA"), tmp_path / "la.png")) == 90).all()
    cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))  # no ink = white
    assert (read_image(_save(cmyk, tmp_path / "c.tiff")) == 255).all()


def test_garbage_bytes_raise_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"this is not a png at all")
    with pytest.raises(DatasetError, match="broken.png"):
        read_image(path)
    with pytest.raises(DatasetError, match="broken.png"):
        read_mask(path)


def test_truncated_png_raises_naming_the_file(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="PNG")
    path = tmp_path / "truncated.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(DatasetError, match=r"truncated\.png.*corrupt"):
        read_image(path)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found.*nope.png"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(DatasetError, match="nope.png"):
        image_size(tmp_path / "nope.png")


def test_masks_binarise_any_encoding(tmp_path: Path) -> None:
    grey = np.array([[0, 1], [255, 0]], dtype=np.uint8)
    expected = np.array([[0, 1], [1, 0]], dtype=np.float32)
    mask = read_mask(_save(Image.fromarray(grey, mode="L"), tmp_path / "l.png"))
    assert mask.dtype == np.float32
    np.testing.assert_array_equal(mask, expected)
    red_only = np.zeros((2, 2, 4), dtype=np.uint8)
    red_only[..., 3] = 255  # opaque black must stay background: alpha is ignored
    red_only[1, 0, 0] = 200
    red_only[0, 1, 0] = 1
    np.testing.assert_array_equal(read_mask(_save(Image.fromarray(red_only), tmp_path / "r.png")), expected)


def test_palette_mask_uses_colours_not_indices(tmp_path: Path) -> None:
    image = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="P")
    image.putpalette([255, 255, 255, 0, 0, 0] + [0] * (256 * 3 - 6))  # index 0 white, 1 black
    np.testing.assert_array_equal(read_mask(_save(image, tmp_path / "p.png")), [[1.0, 0.0]])


def test_list_images_skips_hidden_and_non_images_and_sorts(tmp_path: Path) -> None:
    for name in ("b.PNG", "a.jpg", ".hidden.png", "notes.txt", "c.tif"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dir.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.tif"]
