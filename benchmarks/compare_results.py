"""Compare the metrics of two results.json files (e.g. before and after a speed change).

    python benchmarks/compare_results.py runs/a/results.json runs/b/results.json [--tol 1e-6]

Prints, per section (routed metrics, oracle metrics, routing, thresholds), how many values differ and
the largest absolute difference; exits 1 if any metric differs by more than ``--tol``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SECTIONS = ("metrics", "metrics_oracle", "routing", "thresholds")


def differences(a: Any, b: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """Leaves of ``a`` whose value in ``b`` differs (floats compared exactly), as (path, a, b)."""
    if isinstance(a, dict):
        b = b if isinstance(b, dict) else {}
        return [d for k in a for d in differences(a[k], b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (u, v) in enumerate(zip(a, b, strict=True)) for d in differences(u, v, f"{path}[{i}]")]
    return [] if a == b else [(path, a, b)]


def _gap(x: Any, y: Any) -> float:
    if isinstance(x, (int, float)) and isinstance(y, (int, float)):
        return abs(x - y)
    return float("inf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--tol", type=float, default=1e-6, help="largest allowed difference of a metric")
    args = parser.parse_args(argv)
    a, b = (json.loads(p.read_text()) for p in (args.before, args.after))
    worst_metric = 0.0
    for section in SECTIONS:
        diffs = differences(a.get(section), b.get(section), section)
        worst = max((_gap(x, y) for _, x, y in diffs), default=0.0)
        if section.startswith("metrics") or section == "routing":
            worst_metric = max(worst_metric, worst)
        print(f"{section:15s} {len(diffs):4d} values differ, largest difference {worst:.3g}")
        for path, x, y in diffs[:3]:
            print(f"    {path}: {x!r} -> {y!r}")
    print(f"largest metric difference {worst_metric:.3g} (tolerance {args.tol:g})")
    return 0 if worst_metric <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
