"""Plain folders of images: ``folder:GOOD_DIR[:BAD_DIR[:MASK_DIR]]``.

- ``GOOD_DIR``: normal images. They are sorted by file name and every 5th one (0-based index
  ``i % 5 == 4``, i.e. 20 %) is held out as a normal *test* image; the rest are training images. The same
  rule applies with or without ``BAD_DIR``, so a folder task always has normal test images (router
  accuracy and false-positive rates stay measurable even without defects). Without ``BAD_DIR`` at least
  5 good images are needed so that the test set is not empty.
- ``BAD_DIR`` (optional): anomalous images, all in the test set, defect type ``"bad"``.
- ``MASK_DIR`` (optional, needs ``BAD_DIR``): one mask per bad image, matched by stem: ``NNN_mask.*`` or
  ``NNN.*`` for image ``NNN.*`` (any image extension). With a mask directory every bad image must have a
  mask and the task has pixel metrics; without one it has none (``load_mask`` returns ``None``).

Sample names are ``"good/FILE"`` and ``"bad/FILE"``. Hidden and non-image files are skipped.
"""

from __future__ import annotations

from pathlib import Path

from moleflow.data.base import NORMAL_DEFECT, FileSample, TaskData, check_task_name
from moleflow.data.errors import DatasetError
from moleflow.data.io import describe_directory, find_mask, mask_index, require_images
from moleflow.names import task_name_from

TEST_EVERY = 5  # every 5th sorted good image is a test image
BAD_DEFECT = "bad"
# Directory names that say nothing about the product: the task is named after their parent instead.
GENERIC_DIR_NAMES = ("good", "normal", "ok", "train", "images", "img", "imgs")


def split_normals(images: list[Path]) -> tuple[list[Path], list[Path]]:
    """``(train, test)`` of sorted good images: index ``i`` is a test image iff ``i % 5 == 4``."""
    train = [p for i, p in enumerate(images) if i % TEST_EVERY != TEST_EVERY - 1]
    test = [p for i, p in enumerate(images) if i % TEST_EVERY == TEST_EVERY - 1]
    return train, test


def folder_task_name(good_dir: str | Path) -> str:
    """Task name derived from ``GOOD_DIR``: its base name, or its parent's if the base name is generic."""
    path = Path(good_dir).expanduser().resolve()
    base = path.parent.name if path.name.lower() in GENERIC_DIR_NAMES and path.parent.name else path.name
    return task_name_from(base) if base else "folder"


def _bad_samples(bad_dir: Path, mask_dir: Path | None) -> list[FileSample]:
    """Anomalous test samples of ``BAD_DIR``, with masks from ``MASK_DIR`` when it is given."""
    images = require_images(bad_dir, "BAD_DIR to be a directory of anomalous images")
    masks: dict[Path, Path | None] = {image: None for image in images}
    if mask_dir is not None:
        index = mask_index(mask_dir)
        masks = {image: find_mask(image, index) for image in images}
        missing = [image.name for image, mask in masks.items() if mask is None]
        if missing:
            raise DatasetError(
                f"{len(missing)} bad image(s) in {bad_dir} have no mask in {mask_dir} (looked for "
                f"STEM_mask.* and STEM.*): {missing[:5]}; the mask directory holds "
                f"{describe_directory(mask_dir)}. Add the masks or drop MASK_DIR from the spec"
            )
    return [
        FileSample(
            name=f"bad/{image.name}",
            label=1,
            defect=BAD_DEFECT,
            image_path=image,
            mask_path=mask,
            masked=mask_dir is not None,
        )
        for image, mask in masks.items()
    ]


def parse_folder(
    good_dir: str | Path, bad_dir: str | Path | None = None, mask_dir: str | Path | None = None
) -> tuple[tuple[FileSample, ...], tuple[FileSample, ...]]:
    """``(train, test)`` samples of a folder task (split rule in the module docstring)."""
    if mask_dir is not None and bad_dir is None:
        raise DatasetError("a MASK_DIR was given without a BAD_DIR; use folder:GOOD_DIR:BAD_DIR:MASK_DIR")
    good_dir = Path(good_dir).expanduser()
    masks = None if mask_dir is None else Path(mask_dir).expanduser()
    if masks is not None and not masks.is_dir():
        raise DatasetError(f"MASK_DIR {masks} is {describe_directory(masks)}; expected a directory of masks")
    good_images = require_images(good_dir, "GOOD_DIR to be a directory of normal images")
    train_images, test_images = split_normals(good_images)

    def good(image: Path) -> FileSample:
        return FileSample(
            name=f"good/{image.name}",
            label=0,
            defect=NORMAL_DEFECT,
            image_path=image,
            masked=masks is not None,
        )

    bad = _bad_samples(Path(bad_dir).expanduser(), masks) if bad_dir is not None else []
    if not test_images and not bad:
        raise DatasetError(
            f"{good_dir} has {len(good_images)} good image(s) and no BAD_DIR was given, so the test set "
            f"would be empty; every {TEST_EVERY}th good image is held out for testing, so give at least "
            f"{TEST_EVERY} images or a BAD_DIR (folder:GOOD_DIR:BAD_DIR)"
        )
    return tuple(good(p) for p in train_images), (*(good(p) for p in test_images), *bad)


def load_folder_task(
    good_dir: str | Path,
    bad_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
    name: str | None = None,
) -> TaskData:
    """A :class:`TaskData` from plain folders; ``name`` defaults to :func:`folder_task_name`."""
    train, test = parse_folder(good_dir, bad_dir, mask_dir)
    parts = [str(p) for p in (good_dir, bad_dir, mask_dir) if p is not None]
    return TaskData(
        name=check_task_name(name if name is not None else folder_task_name(good_dir)),
        train=train,
        test=test,
        has_masks=mask_dir is not None,
        source="folder:" + ":".join(parts),
    )
