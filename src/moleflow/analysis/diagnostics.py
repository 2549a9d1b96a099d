"""``moleflow analyze lora | dia | growth | routing``: diagnostics of the method's design choices.

- ``lora``    LoRA sufficiency (outline 3.4.1.1): SVD of an unfrozen base's weight change -> analysis/lora_rank.py
- ``dia``     DIA effect (outline 3.4.3.1) on a trained run's latents -> analysis/dia_effect.py
- ``growth``  parameters, checkpoint bytes and memory for 1..T tasks vs the closed form -> analysis/growth.py
- ``routing`` routing confusion matrix of a run's results.json -> analysis/routing_confusion.py

Each writes ``<name>.json`` (every number), ``<name>.md`` (tables) and PNG figures into ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

QUICK_TASKS = ("stripes=synthetic:stripes", "disc=synthetic:disc", "grid=synthetic:grid")
QUICK_LIMITS = (16, 8)
QUICK_OVERRIDES = ("train.epochs=2",)


def _config(source: str, overrides: list[str]):
    from moleflow.config import apply_overrides, load_config

    return apply_overrides(load_config(source), overrides)


def cmd_lora(args: argparse.Namespace) -> int:
    from moleflow.analysis.lora_rank import run_lora_analysis
    from moleflow.cli.protocol import DEMO_LIMITS, DEMO_TASKS
    from moleflow.data import parse_limits, resolve_tasks

    if args.quick:
        specs, limits, overrides = list(QUICK_TASKS), QUICK_LIMITS, [*QUICK_OVERRIDES, *args.set]
    else:
        specs = [s for spec in (args.tasks or DEMO_TASKS) for s in spec.split(",") if s]
        limits, overrides = parse_limits(args.limits) or DEMO_LIMITS, list(args.set)
    cfg = _config(args.config, overrides)
    tasks = resolve_tasks(specs, args.data, limits)
    run_lora_analysis(cfg, tasks, Path(args.out), feature_cache=args.feature_cache, progress=not args.no_progress)
    print(f"LoRA rank analysis written to {args.out}/lora_rank.md")
    return 0


def cmd_dia(args: argparse.Namespace) -> int:
    from moleflow.analysis.dia_effect import run_dia_analysis

    run_dia_analysis(Path(args.run_dir), Path(args.out), args.split, args.feature_cache, args.data)
    print(f"DIA analysis written to {args.out}/dia_effect.md")
    return 0


def cmd_growth(args: argparse.Namespace) -> int:
    from moleflow.analysis.growth import run_growth_analysis

    for name in args.preset:
        run_growth_analysis(_config(name, args.set), args.max_tasks, Path(args.out))
    print(f"growth analysis written to {args.out}/growth_*.md")
    return 0


def cmd_routing(args: argparse.Namespace) -> int:
    from moleflow.analysis.routing_confusion import run_routing_analysis

    run_routing_analysis(Path(args.run_dir), Path(args.out))
    print(f"routing analysis written to {args.out}/routing.md")
    return 0


def _set_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. train.epochs=10 (repeatable)"
    )


def _run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory written by `moleflow train`")
    parser.add_argument("--out", required=True, help="output directory for JSON, Markdown and PNG files")


def register(subparsers: argparse._SubParsersAction) -> None:
    lora = subparsers.add_parser("lora", help="effective rank of an unfrozen base's weight change vs the LoRA rank")
    lora.add_argument(
        "config", nargs="?", default="offline", help="preset (paper, v5, offline, offline_fine) or YAML (default offline)"
    )
    lora.add_argument("--quick", action="store_true", help="three small synthetic tasks, 2 epochs (a smoke run)")
    lora.add_argument("--tasks", nargs="+", help="task specs in learning order (default: the demo tasks)")
    lora.add_argument("--limits", metavar="TRAIN,TEST", help="images per task (default 60,80)")
    lora.add_argument("--data", help="root directory for bare category names")
    lora.add_argument("--feature-cache", type=Path, help="directory that keeps extracted backbone features")
    lora.add_argument("--no-progress", action="store_true")
    lora.add_argument("--out", required=True)
    _set_option(lora)
    lora.set_defaults(func=cmd_lora)

    dia = subparsers.add_parser("dia", help="latent statistics before/after each task's DIA, scale/shift/residual split")
    _run_options(dia)
    dia.add_argument("--split", choices=("test", "train"), default="test", help="normal patches of which split")
    dia.add_argument("--data", help="root directory for bare category names (if the run used one)")
    dia.add_argument("--feature-cache", type=Path, help="directory that keeps extracted backbone features")
    dia.set_defaults(func=cmd_dia)

    growth = subparsers.add_parser("growth", help="parameters, checkpoint bytes and memory for 1..T tasks vs closed form")
    growth.add_argument("--preset", nargs="+", default=["offline"], help="presets or YAML files (default offline)")
    growth.add_argument("--max-tasks", type=int, default=100)
    growth.add_argument("--out", required=True)
    _set_option(growth)
    growth.set_defaults(func=cmd_growth)

    routing = subparsers.add_parser("routing", help="routing confusion matrix of a run as a table and a figure")
    _run_options(routing)
    routing.set_defaults(func=cmd_routing)
