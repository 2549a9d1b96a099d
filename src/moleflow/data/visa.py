"""VisA (Visual Anomaly) in its raw layout, split by the official ``split_csv/1cls.csv``.

Layout::

    ROOT/split_csv/1cls.csv         columns: object, split, label, image, mask
    ROOT/candle/Data/Images/...     paths in the CSV are relative to ROOT
    ROOT/candle/Data/Masks/...

``object`` is the category (task), ``split`` is ``train`` or ``test``, ``label`` is ``normal`` or
``anomaly``, ``mask`` is empty for normal images. Training rows must be normal. Masks are binarised
(> 0; VisA stores 0/255 or 0/1 PNGs). The CSV carries no defect types, so every anomalous image has
defect ``"anomaly"``. Rows keep the CSV's order within each split.

Reference and licence (the data is not shipped with moleflow): Zou et al., "SPot-the-Difference
Self-Supervised Pre-training for Anomaly Detection and Segmentation", ECCV 2022; CC BY 4.0.
"""

from __future__ import annotations

import csv
from pathlib import Path

from moleflow.data.base import NORMAL_DEFECT, FileSample, TaskData, check_task_name
from moleflow.data.errors import DatasetError

VISA_CSV = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
VISA_SPLITS = ("train", "test")
VISA_LABELS = ("normal", "anomaly")
VISA_DEFECT = "anomaly"


def is_visa_root(root: str | Path) -> bool:
    """True if ``root`` holds ``split_csv/1cls.csv``."""
    return (Path(root) / VISA_CSV).is_file()


def read_visa_rows(root: str | Path) -> list[dict[str, str]]:
    """Rows of ``ROOT/split_csv/1cls.csv`` as dicts; raise DatasetError on a missing file or wrong header."""
    csv_path = Path(root) / VISA_CSV
    if not csv_path.is_file():
        raise DatasetError(f"expected the VisA split file {csv_path}; it does not exist")
    try:
        with csv_path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DatasetError(
                    f"{csv_path}: expected columns {list(VISA_COLUMNS)}, found {reader.fieldnames}; "
                    f"missing {missing}. Use the official VisA split_csv/1cls.csv"
                )
            return [{k: (row[k] or "").strip() for k in VISA_COLUMNS} for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{csv_path} is not a readable CSV ({e}); restore the official VisA split_csv/1cls.csv") from e


def visa_categories(root: str | Path) -> tuple[str, ...]:
    """Sorted categories (``object`` values) listed in the VisA CSV."""
    return tuple(sorted({row["object"] for row in read_visa_rows(root)}))


def _row_sample(root: Path, row: dict[str, str], line: int) -> FileSample:
    """One CSV row (``line`` is its 1-based line number in the file) -> a checked FileSample."""
    where = f"{root / VISA_CSV} line {line}"
    if row["split"] not in VISA_SPLITS or row["label"] not in VISA_LABELS:
        raise DatasetError(
            f"{where}: split must be one of {VISA_SPLITS} and label one of {VISA_LABELS}; "
            f"got split={row['split']!r}, label={row['label']!r}"
        )
    anomalous = row["label"] == "anomaly"
    if row["split"] == "train" and anomalous:
        raise DatasetError(f"{where}: training rows must be normal, got an anomaly ({row['image']})")
    image = root / row["image"]
    if not image.is_file():
        raise DatasetError(f"{where}: image {image} does not exist; is ROOT the VisA root directory?")
    mask = root / row["mask"] if anomalous else None
    if anomalous and (not row["mask"] or not mask.is_file()):
        raise DatasetError(f"{where}: anomalous image {image} needs a mask; mask {row['mask']!r} not found")
    return FileSample(
        name=row["image"],
        label=int(anomalous),
        defect=VISA_DEFECT if anomalous else NORMAL_DEFECT,
        image_path=image,
        mask_path=mask,
    )


def parse_visa(root: str | Path, category: str) -> tuple[tuple[FileSample, ...], tuple[FileSample, ...]]:
    """``(train, test)`` samples of one VisA category; names are the CSV's image paths."""
    root = Path(root)
    rows = read_visa_rows(root)
    # line numbers: +2 for the header line and 1-based counting
    chosen = [(i + 2, row) for i, row in enumerate(rows) if row["object"] == category]
    if not chosen:
        known = sorted({row["object"] for row in rows})
        raise DatasetError(f"category {category!r} is not in {root / VISA_CSV}; known categories: {known}")
    samples = [(row["split"], _row_sample(root, row, line)) for line, row in chosen]
    train = tuple(s for split, s in samples if split == "train")
    test = tuple(s for split, s in samples if split == "test")
    return train, test


def load_visa_task(root: str | Path, category: str, name: str | None = None) -> TaskData:
    """A :class:`TaskData` for one VisA category; ``name`` defaults to the category."""
    root = Path(root).expanduser()
    train, test = parse_visa(root, category)
    return TaskData(
        name=check_task_name(name if name is not None else category),
        train=train,
        test=test,
        has_masks=True,
        source=f"VisA {category} ({root / VISA_CSV})",
    )
