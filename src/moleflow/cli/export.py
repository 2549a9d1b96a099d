"""``moleflow export RUN_DIR --format onnx --out DIR``: the run as ONNX graphs + manifest (:mod:`moleflow.deploy`)."""

from __future__ import annotations

import argparse

FORMATS = ("onnx",)


def add_parser(sub, common) -> None:
    e = sub.add_parser(
        "export",
        help="export a run for deployment without torch (ONNX graphs + manifest; again: only what changed)",
    )
    e.add_argument("run_dir")
    e.add_argument("--format", choices=FORMATS, default="onnx", help="export format (default: onnx)")
    e.add_argument("--out", required=True, help="export directory: new, empty, or an earlier export of the run")
    common(e)
    e.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from moleflow.deploy.export import export_run

    report = export_run(args.run_dir, args.out)
    print(
        f"exported {len(report.products)} product(s) {report.products} to {report.out_dir}: "
        f"{len(report.written)} file(s) written, {len(report.kept)} kept, {len(report.removed)} removed"
    )
    for relative in report.written:
        print(f"  wrote   {relative}")
    for relative in report.removed:
        print(f"  removed {relative}")
    return 0
