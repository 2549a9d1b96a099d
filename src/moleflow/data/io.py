"""Reading image and mask files with Pillow, and listing image files in a directory.

Every image mode is converted to RGB ``uint8`` ``(H, W, 3)``:

- ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ... -> Pillow's own RGB conversion (palette looked up);
- ``LA``, ``PA``, ``RGBA``                       -> the alpha channel is dropped (colours kept as stored);
- 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I``) -> scaled from ``[0, 65535]`` to ``[0, 255]`` with
  rounding (``v * 255 / 65535``), so the full 16-bit range is kept instead of clipped at 255;
- ``F`` (32-bit float) -> read as intensities in ``[0, 1]``, scaled by 255 and clipped.

EXIF orientation is *not* applied: masks are stored in the image's stored orientation, and rotating one but
not the other would misalign them.

Masks: any mode; a pixel is foreground if any colour channel is non-zero (alpha ignored), so 0/255, 0/1
and palette masks all binarise to ``{0, 1}`` ``float32``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from moleflow.data.errors import DatasetError

DEFAULT_MAX_MEGAPIXELS = 50
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
MASK_SUFFIXES = ("_mask", "")  # mask of NNN.png: NNN_mask.* (MVTec AD, MPDD), else NNN.*
_MAX_16 = 65535
# Pillow raises any of these for missing, garbage, truncated or oversized files.
_READ_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


def is_image_file(path: Path) -> bool:
    """True for a visible regular file whose extension is one of :data:`IMAGE_EXTENSIONS`."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def list_images(directory: Path) -> list[Path]:
    """Image files directly inside ``directory``, sorted by file name (hidden and non-image files skipped)."""
    return sorted((p for p in directory.iterdir() if is_image_file(p)), key=lambda p: p.name)


def max_image_pixels() -> int:
    """Images with more pixels are refused before decoding (decompression bombs, absurd sizes):
    50 megapixels, or ``MOLEFLOW_MAX_IMAGE_MEGAPIXELS``."""
    return int(float(os.environ.get("MOLEFLOW_MAX_IMAGE_MEGAPIXELS", DEFAULT_MAX_MEGAPIXELS)) * 1e6)


def _check_regular(path: Path) -> None:
    if path.is_symlink() and not path.exists():
        raise DatasetError(f"{path} is a dangling symbolic link; fix or delete it")
    if path.exists() and not path.is_file():
        raise DatasetError(f"{path} is not a regular file (a directory, FIFO or device); remove it from the image folder")


def _open_decoded(path: Path, max_side: int | None = None) -> Image.Image:
    """Open and fully decode ``path``; raise DatasetError naming the file on any failure.

    The size is checked from the header before decoding (:func:`max_image_pixels`); with ``max_side``,
    an image whose long side is larger is decoded at reduced size where the format allows it (JPEG
    draft mode) and downscaled, so memory does not grow with the input's pixel count.
    """
    _check_regular(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            limit = max_image_pixels()
            if width * height > limit:
                raise DatasetError(
                    f"image {path} is {width}x{height} ({width * height / 1e6:.0f} megapixels), more than the limit of "
                    f"{limit / 1e6:.0f}; downscale it, or raise MOLEFLOW_MAX_IMAGE_MEGAPIXELS"
                )
            target = _bounded_size(width, height, max_side)
            if target is not None:
                image.draft(image.mode, target)  # JPEG: decode at 1/2, 1/4 or 1/8 scale; others: no-op
            image.load()  # decode now: a truncated file fails here, not later in a worker
            if target is not None and max(image.size) > max_side:
                return image.resize(_bounded_size(*image.size, max_side), Image.BILINEAR, reducing_gap=2.0)
            return image.copy()
    except DatasetError:
        raise
    except FileNotFoundError as exc:
        raise DatasetError(f"image file not found: {path}") from exc
    except PermissionError as exc:
        raise DatasetError(f"image file {path} is not readable by this user; check its permissions") from exc
    except _READ_ERRORS as exc:
        raise DatasetError(
            f"cannot decode image file {path}: {exc}. The file is corrupt, truncated or not an image; replace or delete it"
        ) from exc


def _bounded_size(width: int, height: int, max_side: int | None) -> tuple[int, int] | None:
    """``(w, h)`` scaled so that the long side is ``max_side``; None if the image is small enough."""
    if max_side is None or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def image_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` of an image file, read from its header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError as exc:
        raise DatasetError(f"image file not found: {path}") from exc
    except _READ_ERRORS as exc:
        raise DatasetError(f"cannot read image header of {path}: {exc}; replace or delete the file") from exc
    return height, width


def to_rgb_uint8(image: Image.Image) -> np.ndarray:
    """Convert a Pillow image of any supported mode to an RGB ``uint8`` array ``(H, W, 3)``."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.int64)
        grey = (np.clip(values, 0, _MAX_16) * 255 + _MAX_16 // 2) // _MAX_16
        return np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2)
    if image.mode == "F":
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")  # drops alpha; looks up palettes; CMYK/YCbCr via Pillow's matrices
    return np.array(image, dtype=np.uint8)


def read_image(path: str | Path, max_side: int | None = None) -> np.ndarray:
    """Read an image file as RGB ``uint8`` ``(H, W, 3)``; raise DatasetError naming the file if unreadable.

    ``max_side``: downscale (aspect kept) so that the long side is at most this many pixels.
    """
    path = Path(path)
    image = _open_decoded(path, max_side)
    try:
        return to_rgb_uint8(image)
    except (ValueError, OSError) as exc:
        raise DatasetError(f"cannot convert image {path} (mode {image.mode}) to RGB: {exc}") from exc


def mask_to_binary(image: Image.Image) -> np.ndarray:
    """Binarise a Pillow mask of any mode: ``(H, W)`` ``float32``, 1 where any colour channel is non-zero."""
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")  # palette index 0 need not be black; look up the colours
    values = np.asarray(image)
    if values.ndim == 3:
        if image.mode in ALPHA_MODES:
            values = values[:, :, :-1]
        values = values.any(axis=2)
    return (values > 0).astype(np.float32)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask file as ``float32`` ``{0, 1}`` ``(H, W)``; DatasetError naming the file if unreadable."""
    path = Path(path)
    return mask_to_binary(_open_decoded(path))


def describe_directory(directory: Path, limit: int = 8) -> str:
    """A short listing for error messages, e.g. ``"['test/', 'train/', 'readme.txt']"`` or ``"nothing"``."""
    if not directory.is_dir():
        return "no such directory" if not directory.exists() else "a file, not a directory"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    if not entries:
        return "an empty directory"
    more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
    return f"{entries[:limit]}{more}"


def require_images(directory: Path, expected: str) -> list[Path]:
    """:func:`list_images` of ``directory``, raising DatasetError if it is missing or holds no images.

    ``expected`` names the directory's role for the message, e.g. ``"CATEGORY/train/good with images"``.
    """
    if not directory.is_dir():
        raise DatasetError(
            f"expected {expected}; {directory} is {describe_directory(directory)} "
            f"(parent {directory.parent} holds {describe_directory(directory.parent)})"
        )
    images = list_images(directory)
    if not images:
        raise DatasetError(
            f"expected {expected}; found no image files ({', '.join(IMAGE_EXTENSIONS)}) in {directory}, "
            f"which holds {describe_directory(directory)}"
        )
    return images


def mask_index(mask_dir: Path) -> dict[str, Path]:
    """Mask files of ``mask_dir`` keyed by stem (empty if the directory is missing).

    If two files share a stem (``000.png``, ``000.bmp``) the first in name order wins.
    """
    if not mask_dir.is_dir():
        return {}
    index: dict[str, Path] = {}
    for path in list_images(mask_dir):
        index.setdefault(path.stem, path)
    return index


def find_mask(image: Path, index: dict[str, Path]) -> Path | None:
    """The mask of ``image`` in a :func:`mask_index`: ``STEM_mask.*`` first, then ``STEM.*``; else None."""
    for suffix in MASK_SUFFIXES:
        found = index.get(image.stem + suffix)
        if found is not None:
            return found
    return None
