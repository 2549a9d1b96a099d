"""``moleflow train | eval | demo``: the benchmark protocol (learn every task, evaluate all after each)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger("moleflow")

DEMO_TASKS = ("synthetic:stripes", "synthetic:disc", "elpv:mono", "elpv:poly")
DEMO_OVERRIDES = ("train.epochs=8",)
DEMO_LIMITS = (60, 80)  # per-task train / test images in the demo (deterministic subsample)


def add_parsers(sub, common, workers_option) -> None:
    t = sub.add_parser("train", help="the benchmark protocol: learn tasks in order, evaluate all after each")
    t.add_argument("config", help="preset (paper, v5, offline, offline_fine) or YAML file")
    t.add_argument("--tasks", nargs="+", required=True, help="SPEC[,SPEC...] (see README)")
    t.add_argument("--out", required=True, dest="run_dir", metavar="RUN_DIR")
    t.add_argument("--data", help="root directory for bare category names")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty --out")
    again.add_argument("--resume", action="store_true", help="continue a run after its last finished task")
    t.add_argument(
        "--limits",
        metavar="TRAIN,TEST",
        help="at most TRAIN training and TEST test images per task (deterministic subsample, both test classes kept)",
    )
    t.add_argument("--feature-cache", type=Path, help="directory that keeps extracted backbone features between runs")
    workers_option(t)
    common(t, with_set=True)
    t.set_defaults(func=cmd_train, logs_to_run=True)

    e = sub.add_parser("eval", help="re-evaluate all learned products of a run on their test sets, rewrite results.json")
    e.add_argument("run_dir")
    e.add_argument("--data", help="root directory the products' data moved to")
    from moleflow.cli.lifecycle import add_parallel_options

    add_parallel_options(e)
    common(e)
    e.set_defaults(func=cmd_eval, logs_to_run=True)

    d = sub.add_parser("demo", help="offline end-to-end demo on synthetic and ELPV tasks")
    d.add_argument("--out", default="runs/demo", dest="run_dir", metavar="RUN_DIR")
    common(d, with_set=True)
    d.set_defaults(func=cmd_demo, logs_to_run=True)


def run_protocol(cfg, specs: list[str], data_root: str | None, out: Path, limits=None, **options) -> dict:
    """Resolve the task specs (every problem reported before any training), learn and evaluate them."""
    from moleflow.data import resolve_tasks
    from moleflow.experiment import ContinualExperiment
    from moleflow.report import format_summary_table
    from moleflow.training_log import training_loggers

    tasks = resolve_tasks(specs, data_root, limits)
    start = time.perf_counter()
    with training_loggers(options.pop("logger", None), out) as loggers:
        exp = ContinualExperiment(cfg, out, loggers=loggers, **options)
        results = exp.run(tasks, specs, limits, data_root)
    print(format_summary_table(results))
    print(f"\nrun directory: {out}  ({time.perf_counter() - start:.0f} s)  report: {out / 'report.md'}")
    return results


def cmd_train(args: argparse.Namespace) -> int:
    from moleflow.config import apply_overrides, load_config
    from moleflow.data import parse_limits

    cfg = apply_overrides(load_config(args.config), args.set)
    limits = parse_limits(args.limits)  # bad options fail before anything is written
    run_protocol(
        cfg,
        [s for spec in args.tasks for s in spec.split(",") if s],
        args.data,
        Path(args.run_dir),
        limits,
        progress=not args.no_progress,
        num_workers=args.workers,
        feature_cache=args.feature_cache,
        overwrite=args.overwrite,
        resume=args.resume,
        logger=args.logger,
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from moleflow.config import apply_overrides, preset

    cfg = apply_overrides(preset("offline"), list(DEMO_OVERRIDES) + args.set)
    log.info(
        "demo: offline preset, tasks %s, at most %d train / %d test images per task", ", ".join(DEMO_TASKS), *DEMO_LIMITS
    )
    run_protocol(cfg, list(DEMO_TASKS), None, Path(args.run_dir), DEMO_LIMITS, progress=not args.no_progress, overwrite=True)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from moleflow.cli.lifecycle import parallel_options
    from moleflow.experiment import ContinualExperiment
    from moleflow.report import format_summary_table
    from moleflow.session import connected

    parallel = parallel_options(args)
    exp = ContinualExperiment.open(args.run_dir, progress=not args.no_progress)
    if args.data:
        exp.detector.data_root = str(Path(args.data).resolve())
    with connected(parallel):
        done = exp.session.evaluate(parallel=parallel)
    missing = [n for n in exp.detector.products if n not in done]
    results = exp.session.write()
    print(format_summary_table(results))
    if missing:
        log.warning("not evaluated (test images not found; give --data ROOT): %s", ", ".join(missing))
    return 0
