"""``moleflow learn | forget | tasks | calibrate``: a model that grows with the factory."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger("moleflow")


def add_parsers(sub, common, workers_option) -> None:
    learn = sub.add_parser(
        "learn",
        help="learn products into a run (created if absent, appended to otherwise)",
        description="Learn one or more products, each given as NAME=SOURCE (SOURCE: a directory in MVTec layout, "
        "elpv:mono|poly, synthetic:KIND or folder:GOOD_DIR[:BAD_DIR[:MASK_DIR]]). The first product of a new run "
        "trains the shared base, which is frozen from then on; every later product adds only its own parts.",
    )
    learn.add_argument("run_dir", help="run directory (created if it does not exist)")
    learn.add_argument("products", nargs="+", metavar="NAME=SOURCE")
    learn.add_argument("--config", help="preset or YAML for a NEW run (default: offline); an existing run keeps its own")
    learn.add_argument("--replace", action="store_true", help="retrain a product that already exists")
    learn.add_argument("--calib", metavar="DIR", help="normal images to set the thresholds on (default: a held-out share)")
    learn.add_argument(
        "--eval",
        choices=("all", "new", "none"),
        default="all",
        help="evaluate on test sets after learning: every product (default), the new ones, or none",
    )
    learn.add_argument("--data", help="root directory for relative SOURCE paths")
    learn.add_argument("--limits", metavar="TRAIN,TEST", help="at most TRAIN training and TEST test images per product")
    learn.add_argument("--feature-cache", type=Path, help="directory that keeps extracted backbone features between runs")
    learn.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the config's)")
    workers_option(learn)
    common(learn, with_set=True)
    learn.set_defaults(func=cmd_learn, logs_to_run=True)

    forget = sub.add_parser("forget", help="remove products from a run; every other product is untouched")
    forget.add_argument("run_dir")
    forget.add_argument("names", nargs="+", metavar="NAME")
    common(forget)
    forget.set_defaults(func=cmd_forget, logs_to_run=True)

    tasks = sub.add_parser("tasks", help="list a run's products: images, when learned, source, thresholds, test results")
    tasks.add_argument("run_dir")
    tasks.add_argument("--json", action="store_true", help="print the records as JSON")
    common(tasks)
    tasks.set_defaults(func=cmd_tasks)

    cal = sub.add_parser(
        "calibrate",
        help="reset a product's thresholds (false-alarm rate, a fixed threshold, or new normal images)",
        description="Without an option, the product is recalibrated on its own held-out images again (e.g. after "
        "the scoring settings changed).",
    )
    cal.add_argument("run_dir")
    cal.add_argument("name", metavar="NAME")
    how = cal.add_mutually_exclusive_group()
    how.add_argument("--fpr", type=float, help="target false-alarm rate of the image verdict on normal images")
    how.add_argument("--threshold", type=float, help="set the image-score threshold by hand (raw score units)")
    how.add_argument("--calib", metavar="DIR", help="a directory of normal images to calibrate on")
    cal.add_argument("--pixel-fpr", type=float, help="target false-alarm rate of defect-mask pixels")
    cal.add_argument("--unknown-fpr", type=float, help="target rate of this product's normals rejected as unknown")
    cal.add_argument("--no-eval", action="store_true", help="do not re-evaluate the product's test set")
    common(cal)
    cal.set_defaults(func=cmd_calibrate, logs_to_run=True)


def _parse_products(items: list[str]) -> list[tuple[str, str]]:
    from moleflow.errors import DatasetError
    from moleflow.names import check_task_name

    out = []
    for item in items:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise DatasetError(f"{item!r}: give each product as NAME=SOURCE, e.g. hazelnut=/data/mvtec/hazelnut")
        out.append((check_task_name(name), source))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise DatasetError(f"product names must be unique, got {names}")
    return out


def open_existing(run_dir: Path, config: str | None, overrides: list[str], **options):
    """``(detector, None)`` for an existing run (config options must then match it), ``(None, config)``
    for a new one, which is created only once its products have been checked."""
    from moleflow.config import apply_overrides, dump_yaml, load_config
    from moleflow.detector import Detector
    from moleflow.rundir import RunDirectory, RunDirectoryError

    run = RunDirectory(run_dir)
    if run.is_empty():
        return None, apply_overrides(load_config(config or "offline"), overrides)
    detector = Detector.load(run_dir, **options)
    if config or overrides:
        wanted = apply_overrides(load_config(config) if config else detector.cfg, overrides)
        if dump_yaml(wanted) != dump_yaml(detector.cfg):
            raise RunDirectoryError(
                f"{run_dir} already has its config ({run.config_path}); --config/--set apply to new runs only. "
                "Drop them, or learn into a new run directory"
            )
    return detector, None


def cmd_learn(args: argparse.Namespace) -> int:
    from moleflow.data import parse_limits
    from moleflow.detector import Detector
    from moleflow.session import RunSession
    from moleflow.sources import calibration_samples
    from moleflow.training_log import training_loggers
    from moleflow.validation import validate_tasks

    products = _parse_products(args.products)
    limits = parse_limits(args.limits)
    if args.calib and len(products) > 1:
        raise ValueError("--calib DIR holds one product's normal images: learn that product on its own")
    run_dir = Path(args.run_dir)
    options = {"progress": not args.no_progress, "num_workers": args.workers, "feature_cache": args.feature_cache}
    if args.device:
        options["device"] = args.device
    with training_loggers(args.logger, run_dir) as loggers:
        detector, new_config = open_existing(run_dir, args.config, args.set, loggers=loggers, **options)
        resolved = resolve_products(detector, products, args.data, limits, args.replace, run_dir)
        validate_tasks([r.task for r in resolved], calibration_samples(args.calib) if args.calib else ())
        if detector is None:
            log.info("new run %s (preset %s)", run_dir, new_config.preset)
            detector = Detector.create(new_config, run_dir, loggers=loggers, **options)
        session = RunSession(detector)
        for r in resolved:
            session.learn(r, r.task.name, evaluate=args.eval, replace=args.replace, calib=args.calib, check=False)
    print(format_tasks(session.detector.tasks(), session.results()))
    print(f"\nrun directory: {run_dir}  report: {run_dir / 'report.md'}")
    return 0


def resolve_products(detector, products: list[tuple[str, str]], data_root, limits, replace: bool, run_dir: Path):
    """Every product's data, before anything is learned (a bad SPEC or an existing name fails at once)."""
    from moleflow.detector import TaskExistsError
    from moleflow.sources import resolve_source

    existing = [name for name, _ in products if detector is not None and name in detector and not replace]
    if existing:
        raise TaskExistsError(f"product {', '.join(existing)} already exists; forget it first, or pass --replace")
    return [resolve_source(name, source, data_root, limits, run_dir) for name, source in products]


def cmd_forget(args: argparse.Namespace) -> int:
    from moleflow.detector import Detector
    from moleflow.session import RunSession

    session = RunSession(Detector.load(args.run_dir, check_calibration=False, progress=not args.no_progress))
    for name in args.names:
        session.detector._require(name)
    for name in args.names:
        session.forget(name)
        print(f"forgot {name}")
    print(f"{len(session.detector)} product(s) left: {', '.join(session.detector.products) or '-'}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from moleflow.rundir import RunDirectory

    run = RunDirectory(args.run_dir)
    index = run.read_index()
    results = run.read_results() or {}
    if args.json:
        tests = results.get("calibration") or {}
        rows = [{**t.summary(), "test": (tests.get(t.name) or {}).get("test")} for t in index.tasks]
        print(json.dumps(rows, indent=2))
        return 0
    if not index.tasks:
        print(f"{args.run_dir}: no products yet (moleflow learn {args.run_dir} NAME=SOURCE)")
        return 0
    print(format_tasks(index.tasks, results))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from moleflow.detector import Detector
    from moleflow.session import RunSession

    session = RunSession(Detector.load(args.run_dir, check_calibration=False, progress=not args.no_progress))
    record = session.calibrate(
        args.name,
        evaluate=not args.no_eval,
        fpr=args.fpr,
        pixel_fpr=args.pixel_fpr,
        unknown_fpr=args.unknown_fpr,
        threshold=args.threshold,
        calib=args.calib,
    )
    cal = record.calibration
    print(
        f"{args.name}: image threshold {cal.image_threshold:.4g} ({cal.image_rule}"
        f"{'' if cal.image_fpr is None else f', fpr {cal.image_fpr:g}'}, {cal.method} on {cal.images} images), "
        f"pixel threshold {cal.pixel_threshold:.4g}, unknown beyond routing distance {cal.unknown_threshold:.4g}"
    )
    print(format_tasks(session.detector.tasks(), session.results()))
    return 0


def format_tasks(records, results: dict) -> str:
    """One line per product (``records``: TaskRecord list): images, calibration, and what its thresholds
    gave on its test set (from ``results``, results.json)."""
    from moleflow.report import text_table

    def pct(v) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    header = ["product", "learned", "train imgs", "calib", "fpr set", "threshold", "recall %", "false alarm %", "unknown %"]
    tests = results.get("calibration") or {}
    rows = []
    for record in records:
        cal = record.calibration
        test = (tests.get(record.name) or {}).get("test") or {}
        rows.append(
            [
                record.name,
                record.learned_at[:16].replace("T", " "),
                str(record.train_images),
                f"{cal.method} ({cal.images})",
                "manual" if cal.image_fpr is None else f"{cal.image_fpr:g}",
                f"{cal.image_threshold:.4g}",
                pct(test.get("recall")),
                pct(test.get("false_alarm_rate")),
                pct(test.get("unknown_rate")),
            ]
        )
    return text_table(header, rows)
