"""TIFFs that Pillow reads wrongly or not at all, read with ``tifffile``.

Pillow decodes a multi-channel TIFF of more than 8 bits per sample (16-bit RGB) to 8 bits by keeping the
high byte, and cannot open floating-point RGB or 64-bit float TIFFs. Such files are read here as their
stored numbers; :mod:`moleflow.data.io` scales them to ``uint8`` with the same rules as Pillow's
single-channel modes (16-bit: ``v * 255 / 65535`` rounded; float: ``[0, 1]`` -> ``[0, 255]``, clipped).
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from moleflow.data.errors import DatasetError

TIFF_SUFFIXES = (".tif", ".tiff")
TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # little/big endian, classic and BigTIFF
_BITS_PER_SAMPLE = 258


def is_tiff_bytes(data: bytes) -> bool:
    """True when ``data`` starts like a TIFF (classic or BigTIFF, either byte order)."""
    return data[:4] in TIFF_MAGIC


def _handle(source: Path | bytes) -> Path | BytesIO:
    return source if isinstance(source, Path) else BytesIO(source)


def pillow_loses_bits(image: Image.Image) -> bool:
    """True for a TIFF with several samples per pixel and more than 8 bits per sample."""
    if image.format != "TIFF":
        return False
    bits = getattr(image, "tag_v2", {}).get(_BITS_PER_SAMPLE, 8)
    bits = bits if isinstance(bits, tuple) else (bits,)
    return len(bits) > 1 and max(bits) > 8


def read_tiff(source: Path | bytes, name: str | Path | None = None) -> tuple[np.ndarray, int]:
    """The first page of a TIFF (a file, or its bytes) as stored numbers ``(H, W)`` or ``(H, W, S)`` and its
    Orientation tag; ``name`` names it in errors (default: the path)."""
    path = name if name is not None else source
    try:
        import tifffile
    except ImportError as exc:  # a declared dependency; only a broken install gets here
        raise DatasetError(f"{path}: reading this TIFF needs the 'tifffile' package (pip install tifffile)") from exc
    try:
        with tifffile.TiffFile(_handle(source)) as tif:
            page = tif.pages[0]
            array = page.asarray()
            tag = page.tags.get("Orientation")
            samples = int(page.samplesperpixel)
            planar = int(page.planarconfig) == 2  # PLANARCONFIG.SEPARATE: (S, H, W)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise DatasetError(f"cannot decode TIFF file {path}: {exc}; replace or convert it") from exc
    orientation = int(tag.value) if tag is not None else 1
    array = np.asarray(array)
    if planar and array.ndim == 3 and samples > 1:
        array = np.moveaxis(array, 0, -1)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] > 4):
        raise DatasetError(f"TIFF file {path} holds an array of shape {array.shape}; expected (H, W) or (H, W, 1-4)")
    return array, orientation


def tiff_size(source: Path | bytes, name: str | Path | None = None) -> tuple[tuple[int, int], int]:
    """Stored ``(H, W)`` of a TIFF's first page and its Orientation tag, from the header only."""
    import tifffile

    path = name if name is not None else source
    try:
        with tifffile.TiffFile(_handle(source)) as tif:
            page = tif.pages[0]
            tag = page.tags.get("Orientation")
            return (int(page.imagelength), int(page.imagewidth)), int(tag.value) if tag is not None else 1
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise DatasetError(f"cannot read the TIFF header of {path}: {exc}; replace or convert it") from exc
