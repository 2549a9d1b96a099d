"""Output helpers shared by the analyses: JSON-safe numbers, Markdown tables, atomic files.

Every analysis writes ``<name>.json`` (all numbers), ``<name>.md`` (tables) and PNG figures into one
output directory; the writes are atomic so an interrupted run never leaves half a file behind.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moleflow.atomic import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


def json_safe(value: Any) -> Any:
    """Nested dicts / lists / numpy scalars and arrays -> plain JSON types; NaN and inf become ``None``."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def write_text(text: str, path: Path) -> None:
    write_text_atomic(text, path)


def write_json(data: dict[str, Any], path: Path) -> None:
    """``data`` made JSON-safe (:func:`json_safe`), written atomically."""
    write_json_atomic(json_safe(data), path)


def write_analysis(
    out: Path, stem: str, data: dict[str, Any], markdown: str, figure: Callable[[Path], Any], figure_name: str
) -> Path:
    """The three outputs of an analysis: ``out/<stem>.json``, ``out/<stem>.md`` and ``figure(out/<figure_name>)``."""
    write_json(data, out / f"{stem}.json")
    write_text(markdown, out / f"{stem}.md")
    figure(out / figure_name)
    log.info("wrote %s", out / f"{stem}.md")
    return out / f"{stem}.md"


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: ``-`` for missing values, ``digits`` significant decimals for floats."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """GitHub Markdown table; cells are formatted with :func:`fmt`, pipes inside cells escaped."""

    def cell(value: Any) -> str:
        return fmt(value, digits).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
