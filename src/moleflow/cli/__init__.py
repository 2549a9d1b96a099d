"""``moleflow`` command line (DESIGN.md contracts). Each command is a thin layer over
:class:`moleflow.Detector` (lifecycle and prediction) or the benchmark protocol; this module only parses
arguments and turns errors into one clear line (a traceback with ``-v``). Heavy libraries (torch, timm)
are imported by the commands, not here, so that ``moleflow --help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from moleflow import __version__

log = logging.getLogger("moleflow")

PASSTHROUGH = {"bench": "moleflow.perf", "analyze": "moleflow.analysis.command"}  # own argument parsers


def setup_logging(run_dir: Path | None, verbose: bool = False, quiet: bool = False) -> None:
    """Log to stderr (warnings only with ``quiet``) and, with ``run_dir``, to ``RUN_DIR/train.log``."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            file_handler = logging.FileHandler(run_dir / "train.log")
            file_handler.setLevel(logging.DEBUG if verbose else logging.INFO)
            handlers.append(file_handler)
        except OSError:
            pass  # the command itself reports why the directory cannot be written
    handlers[0].setLevel(level)
    logging.basicConfig(
        level=min(level, logging.INFO),
        handlers=handlers,
        force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _common(sp: argparse.ArgumentParser, with_set: bool = False) -> None:
    # SUPPRESS: an option given before the subcommand is not reset by the subcommand's default
    sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logs, tracebacks")
    sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings and results only")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    if with_set:
        sp.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set train.epochs=20 (repeatable)",
        )


def _training_options(sp: argparse.ArgumentParser) -> None:
    _workers_option(sp)
    sp.add_argument(
        "--logger",
        action="append",
        choices=("csv", "tensorboard", "mlflow"),
        help="training curves per epoch: csv (RUN_DIR/logs/training.csv, the default), tensorboard, mlflow (repeatable)",
    )


def _workers_option(sp: argparse.ArgumentParser) -> None:
    import os

    sp.add_argument(
        "--workers",
        type=int,
        default=min(4, (os.cpu_count() or 1) // 4),
        help="image-decoding worker processes, overlapping with the backbone (default: CPUs / 4, at most 4)",
    )


def build_parser() -> argparse.ArgumentParser:
    from moleflow.cli import export, lifecycle, predict, protocol, serve

    p = argparse.ArgumentParser(
        prog="moleflow",
        description="Continual image anomaly detection (MoLE-Flow): learn products one after another, "
        "inspect images of any of them.",
    )
    p.add_argument("--version", action="version", version=f"moleflow {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", default=False, help="debug logs, tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", default=False, help="warnings and results only")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    lifecycle.add_parsers(sub, _common, _training_options)
    predict.add_parser(sub, _common)
    serve.add_parser(sub, _common)
    export.add_parser(sub, _common)
    protocol.add_parsers(sub, _common, _training_options)
    sub.add_parser("bench", help="speed and memory measurements: moleflow bench [--quick] [--json PATH]", add_help=False)
    sub.add_parser(
        "analyze", help="the paper's analyses: moleflow analyze {interaction,ablation,order,lora,dia,growth,routing}"
    )
    c = sub.add_parser("config", help="print a resolved config (every default written out), e.g. as a YAML to edit")
    c.add_argument("config", nargs="?", default="offline", help="preset (paper, v5, offline, offline_fine) or YAML file")
    _common(c, with_set=True)
    c.set_defaults(func=cmd_config, run_dir=None)
    return p


def cmd_config(args: argparse.Namespace) -> int:
    from moleflow.config import apply_overrides, dump_yaml, load_config

    print(dump_yaml(apply_overrides(load_config(args.config), args.set)), end="")
    return 0


def _passthrough(command: str, argv: list[str]) -> int:
    import importlib

    return importlib.import_module(PASSTHROUGH[command]).main(argv)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's to fix: reported as one line, no traceback."""
    from moleflow.calibration import CalibrationError
    from moleflow.config import ConfigError
    from moleflow.errors import DatasetError
    from moleflow.extras import MissingExtraError
    from moleflow.rundir import RunDirectoryError

    errors: list[type[BaseException]] = [
        ConfigError,
        DatasetError,
        RunDirectoryError,
        CalibrationError,
        MissingExtraError,
        OSError,
    ]
    if "moleflow.detector" in sys.modules:  # imported by the command; importing it here would import torch
        from moleflow.checkpoint import CheckpointError
        from moleflow.detector import DetectorError
        from moleflow.features.backbones import BackboneUnavailableError
        from moleflow.training import TrainingDivergedError

        errors += [DetectorError, CheckpointError, BackboneUnavailableError, TrainingDivergedError]
    return tuple(errors)


def _describe(error: BaseException) -> str:
    import errno

    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return f"no space left on the device while writing {error.filename or 'a file'}; free some space and rerun"
    if isinstance(error, OSError) and error.errno == errno.EROFS:
        return f"{error.filename or 'the target'} is on a read-only file system; choose a writable directory"
    if isinstance(error, PermissionError):
        return f"permission denied: {error.filename or error}; check the file's permissions"
    if isinstance(error, FileNotFoundError) and error.filename:
        return f"no such file or directory: {error.filename}"
    return str(error)


def _log_to_files(message: str) -> None:
    """Record ``message`` in train.log (if one is open) without printing it a second time on stderr."""
    record = logging.LogRecord("moleflow", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in PASSTHROUGH:
        return _passthrough(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    verbose, quiet = bool(getattr(args, "verbose", False)), bool(getattr(args, "quiet", False))
    run_dir = getattr(args, "run_dir", None)
    setup_logging(Path(run_dir) if run_dir and getattr(args, "logs_to_run", False) else None, verbose, quiet)
    if quiet:
        args.no_progress = True
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():  # log lines do not break the progress bars
            return args.func(args)
    except KeyboardInterrupt:
        print("moleflow: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not isinstance(e, _user_errors()) and not isinstance(e, ValueError):
            log.exception("unexpected error")  # a bug: keep the traceback (stderr and train.log)
            return 1
        log.debug("error", exc_info=True)
        message = _describe(e)
        _log_to_files(f"error: {message}")
        print(f"moleflow: error: {message}", file=sys.stderr)
        if verbose:
            import traceback

            traceback.print_exception(e)
        return 2


__all__ = ["build_parser", "main", "setup_logging"]
