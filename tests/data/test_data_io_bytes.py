"""read_image_bytes: uploads are read by the same code as files, with the same bounds and errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from moleflow.data.errors import DatasetError, ImageTooLargeError, NotAnImageError
from moleflow.data.io import read_image, read_image_bytes
from tests.helpers import png_header_only


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def test_bytes_and_file_read_the_same_pixels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise
    for fmt, kw in (("PNG", {}), ("JPEG", {"exif": exif}), ("BMP", {})):
        data = _encoded(Image.fromarray(pixels), fmt, **kw)
        path = tmp_path / f"x.{fmt.lower()}"
        path.write_bytes(data)
        np.testing.assert_array_equal(read_image_bytes(data, "x"), read_image(path))
    assert read_image_bytes(_encoded(Image.fromarray(pixels), "JPEG", exif=exif), "x").shape == (20, 12, 3)
    sixteen = rng.integers(0, 65536, (5, 7, 3), dtype=np.uint16)  # 16-bit RGB: read by tifffile, not Pillow
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, sixteen, photometric="rgb")
    np.testing.assert_array_equal(read_image_bytes(path.read_bytes(), "x.tif"), read_image(path))
    expected = (sixteen.astype(np.int64) * 255 + 32767) // 65535
    np.testing.assert_array_equal(read_image_bytes(path.read_bytes(), "x.tif"), expected)


def test_absurd_dimensions_are_refused_from_the_header_before_decoding(tmp_path: Path, monkeypatch) -> None:
    bomb = png_header_only(8_000, 8_000)  # 64 megapixels declared, no data: decoding would fail otherwise
    with pytest.raises(ImageTooLargeError, match=r"upload\.png is 8000x8000 \(64 megapixels\), more than .* 50"):
        read_image_bytes(bomb, "upload.png")
    with pytest.raises(ImageTooLargeError, match=r"huge\.png has more pixels than the limit"):  # Pillow's own bound
        read_image_bytes(png_header_only(100_000, 100_000), "huge.png")
    (tmp_path / "bomb.png").write_bytes(bomb)
    with pytest.raises(ImageTooLargeError, match="bomb.png"):
        read_image(tmp_path / "bomb.png")
    small = png_header_only(40, 30)
    with pytest.raises(ImageTooLargeError, match="40x30"):
        read_image_bytes(small, "s.png", max_pixels=40 * 30 - 1)
    with pytest.raises(DatasetError, match="corrupt") as within:  # within the bound it is decoded (and fails)
        read_image_bytes(small, "s.png", max_pixels=40 * 30)
    assert not isinstance(within.value, ImageTooLargeError)
    monkeypatch.setenv("MOLEFLOW_MAX_IMAGE_MEGAPIXELS", "0.001")  # 1,000 pixels: the default bound for bytes too
    with pytest.raises(ImageTooLargeError, match="MOLEFLOW_MAX_IMAGE_MEGAPIXELS"):
        read_image_bytes(small, "s.png")


def test_tiffs_read_by_tifffile_are_bounded_too(tmp_path: Path) -> None:
    path = tmp_path / "f.tif"
    tifffile.imwrite(path, np.zeros((6, 8, 3), np.float32), photometric="rgb")  # float RGB: Pillow cannot open it
    assert read_image_bytes(path.read_bytes(), "f.tif").shape == (6, 8, 3)
    with pytest.raises(ImageTooLargeError, match="f.tif is 8x6"):
        read_image_bytes(path.read_bytes(), "f.tif", max_pixels=47)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_non_images_and_corrupt_images_are_told_apart() -> None:
    with pytest.raises(NotAnImageError, match=r"notes\.txt is not an image file"):
        read_image_bytes(b"hello, this is text", "notes.txt")
    with pytest.raises(NotAnImageError, match="empty.png"):
        read_image_bytes(b"", "empty.png")
    data = _encoded(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    with pytest.raises(DatasetError, match=r"cut\.png.*corrupt") as cut:
        read_image_bytes(data[: len(data) // 2], "cut.png")
    assert not isinstance(cut.value, NotAnImageError)
    with pytest.raises(DatasetError, match="bad.tif"):
        read_image_bytes(b"II*\0" + b"\xff" * 20, "bad.tif")  # starts like a TIFF, is none


def test_max_side_downscales_uploads() -> None:
    data = _encoded(Image.new("RGB", (400, 100), (10, 20, 30)), "PNG")
    out = read_image_bytes(data, "wide.png", max_side=200)
    assert out.shape == (50, 200, 3) and (out == (10, 20, 30)).all()
