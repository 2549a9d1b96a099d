"""MVTec AD directory layout, also used by MPDD and by the RGB images of MVTec 3D-AD.

2D layout (MVTec AD, MPDD)::

    CATEGORY/train/good/*.png
    CATEGORY/test/good/*.png                   normal test images (no masks: all-zero)
    CATEGORY/test/DEFECT/NNN.png               one directory per defect type
    CATEGORY/ground_truth/DEFECT/NNN_mask.png  (MVTec AD, MPDD) or NNN.png (re-packaged copies);
                                               any image extension, so JPEG images may have PNG masks

MVTec 3D-AD layout (RGB only; ``xyz/`` point clouds and ``validation/`` are ignored)::

    CATEGORY/train/good/rgb/*.png
    CATEGORY/test/{good,DEFECT}/rgb/NNN.png
    CATEGORY/test/DEFECT/gt/NNN.png

Every defective test image must have a mask; a missing one is an error naming the image and where the
mask was looked for. Hidden files and files without an image extension are skipped; everything is sorted
by file name, so the sample order is deterministic.

References and licences (the data is not shipped with moleflow):

- MVTec AD: Bergmann et al., "MVTec AD -- A Comprehensive Real-World Dataset for Unsupervised Anomaly
  Detection", CVPR 2019; CC BY-NC-SA 4.0.
- MVTec 3D-AD: Bergmann et al., "The MVTec 3D-AD Dataset for Unsupervised 3D Anomaly Detection and
  Localization", VISAPP 2022; CC BY-NC-SA 4.0.
- MPDD: Jezek et al., "Deep learning-based defect detection of metal parts: evaluating current methods in
  complex conditions", ICUMT 2021; no licence stated (treat as research-only).
"""

from __future__ import annotations

from pathlib import Path

from moleflow.data.base import NORMAL_DEFECT, FileSample, TaskData, check_task_name
from moleflow.data.errors import DatasetError
from moleflow.data.io import describe_directory, find_mask, mask_index, require_images
from moleflow.names import task_name_from

LAYOUT_2D = "mvtec_ad"
LAYOUT_3D = "mvtec_3d"
RGB_DIR = "rgb"
GT_DIR_3D = "gt"
GT_DIR_2D = "ground_truth"


def detect_layout(category_dir: Path) -> str:
    """Return :data:`LAYOUT_2D` or :data:`LAYOUT_3D` for a category directory, or raise DatasetError."""
    if not category_dir.is_dir():
        raise DatasetError(
            f"category directory {category_dir} is {describe_directory(category_dir)}; expected a directory "
            "in MVTec layout (CATEGORY/train/good, CATEGORY/test/...)"
        )
    good = category_dir / "train" / NORMAL_DEFECT
    if (good / RGB_DIR).is_dir():
        return LAYOUT_3D
    if good.is_dir():
        return LAYOUT_2D
    raise DatasetError(
        f"expected CATEGORY/train/good with images (MVTec AD / MPDD) or CATEGORY/train/good/rgb "
        f"(MVTec 3D-AD) in {category_dir}; found {describe_directory(category_dir)}. Point the spec at one "
        "category directory, e.g. hazelnut=/data/mvtec/hazelnut"
    )


def _class_images(class_dir: Path, layout: str, category_dir: Path) -> list[Path]:
    """Images of one ``train/good`` or ``test/CLASS`` directory (``rgb/`` inside it for MVTec 3D-AD)."""
    rel = class_dir.relative_to(category_dir).as_posix()
    if layout == LAYOUT_3D:
        return require_images(class_dir / RGB_DIR, f"CATEGORY/{rel}/rgb with images (MVTec 3D-AD layout)")
    return require_images(class_dir, f"CATEGORY/{rel} with images")


def _mask_dir(category_dir: Path, defect: str, layout: str) -> Path:
    if layout == LAYOUT_3D:
        return category_dir / "test" / defect / GT_DIR_3D
    return category_dir / GT_DIR_2D / defect


def _missing_mask_error(missing: list[tuple[Path, Path]], category_dir: Path) -> DatasetError:
    lines = [
        f"  {image.relative_to(category_dir).as_posix()}: looked for {mask_dir}/{image.stem}_mask.* "
        f"and {image.stem}.* ({describe_directory(mask_dir)})"
        for image, mask_dir in missing[:5]
    ]
    more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
    return DatasetError(
        f"{len(missing)} defective test image(s) in {category_dir} have no mask; in MVTec layout every "
        "defective image needs a mask (same stem, optionally with '_mask'):\n" + "\n".join(lines) + more
    )


def _test_class_dirs(category_dir: Path) -> list[Path]:
    test_dir = category_dir / "test"
    classes = (
        sorted((p for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
        if test_dir.is_dir()
        else []
    )
    if not classes:
        raise DatasetError(
            f"expected CATEGORY/test/good and CATEGORY/test/DEFECT directories in {category_dir}; "
            f"{test_dir} is {describe_directory(test_dir)}"
        )
    return classes


def parse_mvtec(category_dir: str | Path) -> tuple[tuple[FileSample, ...], tuple[FileSample, ...]]:
    """List an MVTec-layout category: ``(train, test)`` samples, lazily loaded, sorted by class then name.

    Sample names are paths relative to the category, e.g. ``"test/crack/000.png"`` (MVTec 3D-AD:
    ``"test/crack/rgb/000.png"``). Raises DatasetError for a wrong or empty layout or a missing mask.
    """
    category_dir = Path(category_dir)
    layout = detect_layout(category_dir)

    def sample(image: Path, defect: str, mask: Path | None) -> FileSample:
        return FileSample(
            name=image.relative_to(category_dir).as_posix(),
            label=int(defect != NORMAL_DEFECT),
            defect=defect,
            image_path=image,
            mask_path=mask,
        )

    train_images = _class_images(category_dir / "train" / NORMAL_DEFECT, layout, category_dir)
    train = tuple(sample(image, NORMAL_DEFECT, None) for image in train_images)
    test: list[FileSample] = []
    missing: list[tuple[Path, Path]] = []
    for class_dir in _test_class_dirs(category_dir):
        defect = class_dir.name
        images = _class_images(class_dir, layout, category_dir)
        if defect == NORMAL_DEFECT:
            test.extend(sample(image, defect, None) for image in images)
            continue
        mask_dir = _mask_dir(category_dir, defect, layout)
        index = mask_index(mask_dir)
        for image in images:
            mask = find_mask(image, index)
            if mask is None:
                missing.append((image, mask_dir))
            else:
                test.append(sample(image, defect, mask))
    if missing:
        raise _missing_mask_error(missing, category_dir)
    return train, tuple(test)


def load_mvtec_task(category_dir: str | Path, name: str | None = None) -> TaskData:
    """A :class:`TaskData` of one MVTec / MPDD / MVTec 3D-AD category; ``name`` defaults to the dir name."""
    category_dir = Path(category_dir).expanduser()
    train, test = parse_mvtec(category_dir)
    layout = "MVTec 3D-AD (rgb)" if detect_layout(category_dir) == LAYOUT_3D else "MVTec AD"
    task_name = check_task_name(name) if name is not None else task_name_from(category_dir.resolve().name)
    return TaskData(name=task_name, train=train, test=test, has_masks=True, source=f"{layout} layout at {category_dir}")
