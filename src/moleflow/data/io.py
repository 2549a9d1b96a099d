"""Reading image and mask files with Pillow (and tifffile), and listing image files in a directory.

Every image mode is converted to RGB ``uint8`` ``(H, W, 3)``:

- ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ... -> Pillow's own RGB conversion (palette looked up);
- ``LA``, ``PA``, ``RGBA``                       -> the alpha channel is dropped (colours kept as stored);
- 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I``) and 16-bit RGB(A) TIFFs -> scaled from ``[0, 65535]``
  to ``[0, 255]`` with rounding (``v * 255 / 65535``), so the full 16-bit range is kept instead of clipped
  at 255 (or, for RGB, cut to its high byte as Pillow does). The container's range is used, not the
  image's own: a 12-bit camera's values stay dark rather than being stretched per image, which would
  hide a brightness defect;
- float (``F``, and float RGB or 64-bit TIFFs Pillow cannot open) -> intensities in ``[0, 1]``, scaled by
  255 and clipped.

TIFFs Pillow would truncate or cannot open are read with ``tifffile`` (:mod:`moleflow.data.tiff`).

EXIF orientation (and the TIFF Orientation tag) is applied on load, to images and masks alike, so both
come out as a viewer displays them (:mod:`moleflow.data.orientation`). The rule for masks, which seldom
carry EXIF: a mask is taken to be drawn on the image *as displayed*. A mask file's own orientation tag
is applied to it; then it must have the displayed image's size. A mask that has the size of the image
as *stored* while the orientation swaps height and width (90 or 270 degrees) is refused with a message
saying so: it was drawn on the unrotated pixels, and rotating it by guess could misalign it. (For a 180
degree or mirrored orientation the sizes agree and no check can tell; such masks are taken as displayed.)

Bounds: an image with more than :func:`max_image_pixels` pixels is refused from its header, before any
decoding (decompression bombs, absurd sizes; TIFFs that tifffile reads included); non-regular files
(FIFOs, devices, dangling links) are refused without being opened; ``read_image(path, max_side)`` decodes
a large JPEG at reduced size (draft mode) and downscales any image to that long side, so memory does not
grow with the input's pixel count.
:func:`read_image_bytes` reads the bytes of an image file (an upload to the server) with the same code,
bounds and errors; content of no image format raises :class:`NotAnImageError`, an image over the pixel
bound :class:`ImageTooLargeError` (both DatasetErrors).

Masks: any mode; a pixel is foreground if any colour channel is non-zero (alpha ignored), so 0/255, 0/1
and palette masks all binarise to ``{0, 1}`` ``float32``.
"""

from __future__ import annotations

import os
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from moleflow.data.errors import DatasetError, ImageTooLargeError, NotAnImageError
from moleflow.data.orientation import DESCRIPTIONS, apply_orientation, displayed_size, orientation_of, swaps_axes
from moleflow.data.tiff import TIFF_SUFFIXES, is_tiff_bytes, pillow_loses_bits, read_tiff, tiff_size

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
    """Image files directly inside ``directory``, sorted by file name (hidden and non-image files skipped).

    An entry named like an image that is neither a regular file nor a directory (a dangling symbolic link,
    a link loop, a FIFO) is an error naming every such entry, not a silent gap in the data.
    """
    entries = sorted(directory.iterdir(), key=lambda p: p.name)
    named = [p for p in entries if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()]
    broken = [p for p in named if not _is_regular(p)]
    if broken:
        listed = ", ".join(f"{p.name} ({_kind(p)})" for p in broken[:10])
        more = f" and {len(broken) - 10} more" if len(broken) > 10 else ""
        raise DatasetError(f"{directory}: entries named like images are not image files: {listed}{more}; fix or remove them")
    return named


def _is_regular(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a symbolic link loop
        return False


def _kind(path: Path) -> str:
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except FileNotFoundError:
            return "dangling symbolic link"
        except (OSError, RuntimeError):
            return "symbolic link loop"
    return "directory" if path.is_dir() else "not a regular file"


def _decode_error(name: str | Path, exc: Exception) -> DatasetError:
    return DatasetError(
        f"cannot decode image file {name}: {exc}. The file is corrupt, truncated or not an image; replace or delete it"
    )


def max_image_pixels() -> int:
    """Images with more pixels are refused before decoding: 50 megapixels, or ``MOLEFLOW_MAX_IMAGE_MEGAPIXELS``."""
    return int(float(os.environ.get("MOLEFLOW_MAX_IMAGE_MEGAPIXELS", DEFAULT_MAX_MEGAPIXELS)) * 1e6)


def _check_regular(path: Path) -> None:
    if path.is_symlink() and not _is_regular(path):
        raise DatasetError(f"{path} is a {_kind(path)}; fix or delete it")
    if path.exists() and not path.is_file():
        raise DatasetError(f"{path} is not a regular file (a directory, FIFO or device); remove it from the image folder")


def _check_pixels(name: str | Path, width: int, height: int, max_pixels: int | None) -> None:
    """Refuse ``width x height`` beyond ``max_pixels`` (default :func:`max_image_pixels`), from the header."""
    limit = max_image_pixels() if max_pixels is None else max_pixels
    if width * height > limit:
        how = "raise MOLEFLOW_MAX_IMAGE_MEGAPIXELS" if max_pixels is None else "send a smaller image"
        raise ImageTooLargeError(
            f"image {name} is {width}x{height} ({width * height / 1e6:.0f} megapixels), more than the limit of "
            f"{limit / 1e6:.0f}; downscale it, or {how}"
        )


def _bounded_size(width: int, height: int, max_side: int | None) -> tuple[int, int] | None:
    """``(w, h)`` scaled so that the long side is ``max_side``; None if the image is small enough."""
    if max_side is None or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _might_be_tiff(source: Path | bytes) -> bool:
    """Worth a second try with tifffile: a ``.tif(f)`` file, or bytes that start like a TIFF."""
    return source.suffix.lower() in TIFF_SUFFIXES if isinstance(source, Path) else is_tiff_bytes(source)


def _decode(
    source: Path | bytes, name: str | Path, max_side: int | None = None, max_pixels: int | None = None
) -> tuple[Image.Image | np.ndarray, int]:
    """Fully decode a file or the bytes of one: a Pillow image (or, for TIFFs Pillow reads wrongly, the stored
    array) and its orientation tag; raise DatasetError naming ``name`` on any failure. Bounds: module docstring."""
    if isinstance(source, Path):
        _check_regular(source)
    try:
        with Image.open(source if isinstance(source, Path) else BytesIO(source)) as image:
            _check_pixels(name, *image.size, max_pixels)
            if not pillow_loses_bits(image):
                target = _bounded_size(*image.size, max_side)
                if target is not None:
                    image.draft(image.mode, target)  # JPEG: decode at 1/2, 1/4 or 1/8 scale; others: no-op
                image.load()  # decode now: a truncated file fails here, not later in a worker
                # after load (recent Pillow turns TIFFs itself on load and drops their tag), before copy()
                # (a TIFF's tags do not survive it)
                return image.copy(), orientation_of(image)
    except DatasetError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own bound (far above ours) fired first
        raise ImageTooLargeError(f"image {name} has more pixels than the limit ({exc}); downscale it") from exc
    except FileNotFoundError as exc:
        raise DatasetError(f"image file not found: {name}") from exc
    except PermissionError as exc:
        raise DatasetError(f"image file {name} is not readable by this user; check its permissions") from exc
    except UnidentifiedImageError as exc:
        if not _might_be_tiff(source):
            raise NotAnImageError(
                f"{name} is not an image file (no known image format); give a PNG, JPEG, BMP, TIFF or WebP image"
            ) from exc
    except _READ_ERRORS as exc:
        raise _decode_error(name, exc) from exc
    (height, width), _ = tiff_size(source, name)  # 16-bit RGB, float RGB or float64 TIFF
    _check_pixels(name, width, height, max_pixels)
    return read_tiff(source, name)


def image_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` of an image file as displayed (its orientation tag applied), read from its header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = orientation_of(image)
            if image.format == "TIFF":  # recent Pillow reports a TIFF's size already turned: use the tags
                width, height = image.tag_v2.get(256, width), image.tag_v2.get(257, height)
    except FileNotFoundError as exc:
        raise DatasetError(f"image file not found: {path}") from exc
    except UnidentifiedImageError as exc:
        if path.suffix.lower() not in TIFF_SUFFIXES:
            raise DatasetError(f"cannot read image header of {path}: {exc}; replace or delete the file") from exc
        (height, width), orientation = tiff_size(path)
    except _READ_ERRORS as exc:
        raise DatasetError(f"cannot read image header of {path}: {exc}; replace or delete the file") from exc
    return displayed_size((height, width), orientation)


def _scale16(values: np.ndarray) -> np.ndarray:
    """Integers in ``[0, 65535]`` (clipped) -> ``uint8`` ``round(v * 255 / 65535)``."""
    wide = np.clip(values.astype(np.int64), 0, _MAX_16)
    return ((wide * 255 + _MAX_16 // 2) // _MAX_16).astype(np.uint8)


def _scale_float(values: np.ndarray) -> np.ndarray:
    """Intensities in ``[0, 1]`` -> ``uint8`` (times 255, rounded, clipped)."""
    return np.clip(np.rint(values.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)


def to_rgb_uint8(image: Image.Image) -> np.ndarray:
    """Convert a Pillow image of any supported mode to an RGB ``uint8`` array ``(H, W, 3)``."""
    if image.mode in SIXTEEN_BIT_MODES:
        return _grey_to_rgb(_scale16(np.asarray(image)))
    if image.mode == "F":
        return _grey_to_rgb(_scale_float(np.asarray(image)))
    if image.mode != "RGB":
        image = image.convert("RGB")  # drops alpha; looks up palettes; CMYK/YCbCr via Pillow's matrices
    return np.array(image, dtype=np.uint8)


def array_to_rgb_uint8(array: np.ndarray) -> np.ndarray:
    """Stored numbers ``(H, W)`` or ``(H, W, 1-4)`` (last sample of 2 or 4 = alpha, dropped) -> RGB ``uint8``.

    ``uint8`` as is; other integers as 16-bit (:func:`_scale16`); floats as ``[0, 1]``; booleans as 0/255.
    """
    if array.ndim == 3 and array.shape[2] in (2, 4):
        array = array[:, :, :-1]
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.dtype == np.uint8:
        values = array
    elif array.dtype == bool:
        values = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.integer):
        values = _scale16(array)
    elif np.issubdtype(array.dtype, np.floating):
        values = _scale_float(np.nan_to_num(array, nan=0.0))
    else:
        raise ValueError(f"unsupported sample type {array.dtype}")
    return _grey_to_rgb(values) if values.ndim == 2 else np.ascontiguousarray(values)


def read_image(path: str | Path, max_side: int | None = None) -> np.ndarray:
    """Read an image file as displayed, RGB ``uint8`` ``(H, W, 3)``; DatasetError naming the file if unreadable.

    ``max_side``: downscale (aspect kept) so that the long side is at most this many pixels.
    """
    path = Path(path)
    return _displayed_rgb(*_decode(path, path, max_side), path, max_side)


def read_image_bytes(data: bytes, name: str, max_side: int | None = None, max_pixels: int | None = None) -> np.ndarray:
    """:func:`read_image` for the bytes of an image file (an upload); ``name`` names it in errors.

    The same bounds and errors: :class:`ImageTooLargeError` beyond ``max_pixels`` (default
    :func:`max_image_pixels`) from the header before decoding, :class:`NotAnImageError` for content of no
    image format, :class:`DatasetError` for a corrupt or truncated image.
    """
    return _displayed_rgb(*_decode(bytes(data), name, max_side, max_pixels), name, max_side)


def _displayed_rgb(
    decoded: Image.Image | np.ndarray, orientation: int, name: str | Path, max_side: int | None
) -> np.ndarray:
    """A decoded image -> RGB ``uint8`` ``(H, W, 3)`` as displayed, long side at most ``max_side``."""
    try:
        rgb = to_rgb_uint8(decoded) if isinstance(decoded, Image.Image) else array_to_rgb_uint8(decoded)
    except (ValueError, OSError) as exc:
        mode = decoded.mode if isinstance(decoded, Image.Image) else decoded.dtype
        raise DatasetError(f"cannot convert image {name} (mode {mode}) to RGB: {exc}") from exc
    rgb = apply_orientation(rgb, orientation)
    target = _bounded_size(rgb.shape[1], rgb.shape[0], max_side)
    if target is not None:
        rgb = np.asarray(Image.fromarray(rgb).resize(target, Image.BILINEAR, reducing_gap=2.0))
    return rgb


def mask_to_binary(image: Image.Image | np.ndarray) -> np.ndarray:
    """Binarise a mask of any mode: ``(H, W)`` ``float32``, 1 where any colour channel is non-zero.

    Alpha is ignored: a Pillow alpha mode's last band, or the last sample of a 2- or 4-sample array.
    """
    if isinstance(image, np.ndarray):
        values = image[:, :, :-1] if image.ndim == 3 and image.shape[2] in (2, 4) else image
    else:
        if image.mode in ("P", "PA"):
            image = image.convert("RGBA")  # palette index 0 need not be black; look up the colours
        values = np.asarray(image)
        if values.ndim == 3 and image.mode in ALPHA_MODES:
            values = values[:, :, :-1]
    if values.ndim == 3:
        values = (values != 0).any(axis=2)
    return (values != 0).astype(np.float32)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask file as ``float32`` ``{0, 1}`` ``(H, W)``, its own orientation tag applied."""
    path = Path(path)
    decoded, orientation = _decode(path, path)
    return apply_orientation(mask_to_binary(decoded), orientation)


def read_mask_for(mask_path: str | Path, image_path: str | Path) -> np.ndarray:
    """The mask of an image, at the image's displayed size (module docstring: the orientation rule).

    Raises DatasetError naming both files when the sizes disagree, and saying so when the mask matches
    the image as stored but not as its orientation tag displays it.
    """
    mask_path, image_path = Path(mask_path), Path(image_path)
    mask = read_mask(mask_path)
    height, width = image_size(image_path)
    if mask.shape == (height, width):
        return mask
    got = f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image {image_path} is {width}x{height}"
    with Image.open(image_path) as image:
        orientation = orientation_of(image)
    if swaps_axes(orientation) and mask.shape == (width, height):
        raise DatasetError(
            f"{got} as displayed: its EXIF orientation says it is stored {DESCRIPTIONS[orientation]}, and the "
            "mask matches the stored pixels. Masks are read in the displayed orientation: rotate the mask to "
            "match, or remove the image's orientation tag"
        )
    raise DatasetError(f"{got}; masks must have the image's size")


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
