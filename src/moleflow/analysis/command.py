"""``moleflow analyze``: the paper's analyses as subcommands writing JSON, tables and figures.

Each analysis module registers its own subcommand(s) through ``register(subparsers)`` and sets
``func`` on its parser; this module only assembles them, so adding an analysis touches one file.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from moleflow.extras import MissingExtraError, require_extra

# modules that provide ``register(subparsers: argparse._SubParsersAction) -> None``
ANALYSIS_MODULES = (
    "moleflow.analysis.factorial",  # interaction (2x2 factorial + ANOVA), ablation
    "moleflow.analysis.sensitivity",  # order (task order / Task-0 sensitivity)
    "moleflow.analysis.diagnostics",  # lora, dia, growth, routing
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moleflow analyze", description="Rerun the paper's analyses.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="analysis", required=True)
    for name in ANALYSIS_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:  # before the analysis modules are imported: they need statsmodels and pandas
        require_extra("analysis", "moleflow analyze")
    except MissingExtraError as e:
        print(f"moleflow analyze: error: {e}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"moleflow analyze: error: {e}", file=sys.stderr)
        return 2
