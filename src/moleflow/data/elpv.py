"""ELPV solar cells (the PyPI package ``elpv-dataset``): tasks ``elpv:mono`` and ``elpv:poly``.

The package ships 2,624 greyscale 300x300 PNG cells and ``data/labels.csv``: whitespace-separated
``path probability type`` without a header, ``path`` relative to the CSV (``images/cell0001.png``),
``probability`` the defect probability in {0, 1/3, 2/3, 1}, ``type`` ``mono`` or ``poly``. The CSV is
read here directly; the package's ``load_dataset`` would decode every image into memory.

Task construction (per cell type):

- normal = probability 0, anomalous = probability 1; the uncertain 1/3 and 2/3 cells are left out;
- the normals, sorted by path, are split by index: ``i % 4 == 3`` goes to test (25 %), the rest to train;
- every anomalous cell is a test image (defect ``"defective"``);
- there are no masks (``has_masks=False``; ``load_mask`` returns ``None``).

With elpv-dataset 1.0.0 this gives mono: 441 train / 147 normal test / 313 anomalous test, and poly:
690 train / 230 normal test / 402 anomalous test. Sample names are ``elpv/<type>/cellNNNN``.

References: Buerhop-Lutz et al., "A Benchmark for Visual Identification of Defective Solar Cells in
Electroluminescence Imagery", EU PVSEC 2018; Deitsch et al., "Automatic classification of defective
photovoltaic module cells in electroluminescence images", Solar Energy 185, 2019; Deitsch et al.,
"Segmentation of photovoltaic module cells in uncalibrated electroluminescence images", Machine Vision and
Applications 32(4), 2021. Licence: the images are CC BY-NC-SA 4.0 (non-commercial), the package code
Apache-2.0 (package metadata: ``CC-BY-NC-SA-4.0 AND Apache-2.0``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from moleflow.data.base import NORMAL_DEFECT, FileSample, TaskData, check_task_name
from moleflow.data.errors import DatasetError

ELPV_KINDS = ("mono", "poly")
ELPV_PACKAGE = "elpv_dataset"
NORMAL_PROBABILITY = 0.0
ANOMALOUS_PROBABILITY = 1.0
TEST_EVERY = 4  # every 4th sorted normal cell is a test image
ELPV_DEFECT = "defective"


@dataclass(frozen=True)
class ElpvRecord:
    """One line of ``labels.csv``: ``path`` is absolute; ``probability`` in [0, 1]; ``kind`` mono/poly."""

    path: Path
    probability: float
    kind: str


def default_labels_csv() -> Path:
    """``labels.csv`` of the installed ``elpv-dataset`` package; DatasetError if it is not installed."""
    spec = importlib.util.find_spec(ELPV_PACKAGE)
    if spec is None or spec.origin is None:
        raise DatasetError(
            "the elpv tasks need the optional package elpv-dataset, which is not installed: "
            "pip install 'moleflow[demo]' (or pip install elpv-dataset)"
        )
    csv_path = Path(spec.origin).parent / "data" / "labels.csv"
    if not csv_path.is_file():
        raise DatasetError(f"elpv-dataset is installed but {csv_path} is missing; reinstall the package")
    return csv_path


def parse_elpv_labels(labels_csv: str | Path) -> tuple[ElpvRecord, ...]:
    """Parse ``labels.csv`` (``path probability type`` per line) into records, in file order."""
    labels_csv = Path(labels_csv)
    records: list[ElpvRecord] = []
    for number, line in enumerate(labels_csv.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            path, probability_text, kind = fields
            probability = float(probability_text)
        except ValueError as exc:
            raise DatasetError(f"{labels_csv} line {number}: expected 'PATH PROBABILITY TYPE', got {line!r}") from exc
        if not 0.0 <= probability <= 1.0 or kind not in ELPV_KINDS:
            raise DatasetError(
                f"{labels_csv} line {number}: probability must be in [0, 1] and type one of {ELPV_KINDS}; got {line!r}"
            )
        records.append(ElpvRecord(path=labels_csv.parent / path, probability=probability, kind=kind))
    return tuple(records)


def split_elpv(
    records: tuple[ElpvRecord, ...], kind: str
) -> tuple[tuple[ElpvRecord, ...], tuple[ElpvRecord, ...], tuple[ElpvRecord, ...]]:
    """``(train normals, test normals, test anomalous)`` of one cell type (rule in the module docstring)."""
    if kind not in ELPV_KINDS:
        raise DatasetError(f"unknown elpv cell type {kind!r}; expected one of {ELPV_KINDS} (e.g. elpv:mono)")
    of_kind = sorted((r for r in records if r.kind == kind), key=lambda r: r.path.as_posix())
    normals = [r for r in of_kind if r.probability == NORMAL_PROBABILITY]
    anomalous = tuple(r for r in of_kind if r.probability == ANOMALOUS_PROBABILITY)
    train = tuple(r for i, r in enumerate(normals) if i % TEST_EVERY != TEST_EVERY - 1)
    test = tuple(r for i, r in enumerate(normals) if i % TEST_EVERY == TEST_EVERY - 1)
    return train, test, anomalous


def _sample(record: ElpvRecord, label: int) -> FileSample:
    return FileSample(
        name=f"elpv/{record.kind}/{record.path.stem}",
        label=label,
        defect=ELPV_DEFECT if label else NORMAL_DEFECT,
        image_path=record.path,
        masked=False,
    )


def load_elpv_task(kind: str, name: str | None = None, labels_csv: str | Path | None = None) -> TaskData:
    """A :class:`TaskData` for ``elpv:KIND``; ``name`` defaults to ``elpv_KIND``.

    ``labels_csv`` defaults to the installed package's; pass another copy of the same format for tests.
    """
    csv_path = Path(labels_csv) if labels_csv is not None else default_labels_csv()
    train, test_normal, test_anomalous = split_elpv(parse_elpv_labels(csv_path), kind)
    return TaskData(
        name=check_task_name(name if name is not None else f"elpv_{kind}"),
        train=tuple(_sample(r, 0) for r in train),
        test=tuple(_sample(r, 0) for r in test_normal) + tuple(_sample(r, 1) for r in test_anomalous),
        has_masks=False,
        source=f"elpv:{kind} ({csv_path})",
    )
