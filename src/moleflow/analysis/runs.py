"""Run continual experiments for the analyses and reduce each to a few summary numbers.

The reusable unit of every analysis (factorial, ablation, task order, ...)::

    tasks = resolve_tasks(["synthetic:stripes", "synthetic:disc"], limits=(16, 12))
    runner = Runner(preset("offline"), tasks, out_dir, feature_cache=Path("runs/feature_cache"))
    summary = runner.run(overrides=("model.dia=null",), seed=1)        # -> RunSummary
    summary.primary["oracle"], summary.forgetting["routed"]["image_auroc"]

A run is identified by its resolved config (base config + overrides + ``train.seed``) and the task names
in order; its ``results.json`` is kept under ``out_dir/runs/<key>/``, so asking twice for the same run
(a cell shared by several components, a rerun of the command) trains once.

Seeds: ``seed`` sets ``train.seed`` (new-task initialisation and batch order, see training.py) and the
global torch seed right before the model is built (the base flow's initialisation), so a seed changes
every random choice of a run and the same seed repeats it bit for bit on one machine.

The *primary* metric (what the analyses compare) is per task: pixel AP where the task has masks, image
AUROC otherwise; ``primary[matrix]`` is its mean over the final row of the routed or oracle accuracy
matrix, and ``primary_forgetting[matrix]`` its average forgetting (evaluation/protocol.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from moleflow.analysis.outputs import write_json, write_text
from moleflow.config import MoleFlowConfig, apply_overrides, dump_yaml, replace
from moleflow.data import TaskData, parse_limits, resolve_tasks
from moleflow.evaluation.protocol import Matrix, final_mean, forgetting
from moleflow.rundir import RunDirectory

log = logging.getLogger(__name__)

MATRICES = ("routed", "oracle")
_SECTION = {"routed": "metrics", "oracle": "metrics_oracle"}
PRIMARY_NAME = "pixel AP (tasks with masks) / image AUROC (tasks without)"

#: ``execute(cfg, tasks, run_dir, feature_cache) -> results.json dict``; tests inject a fake one.
Execute = Callable[[MoleFlowConfig, Sequence[TaskData], Path, Path | None], dict]


def primary_matrix(results: dict, matrix: str) -> Matrix:
    """The accuracy matrix of the primary metric: column j holds pixel AP if task j has any pixel AP
    value (it has masks), else image AUROC. ``matrix`` is ``"routed"`` or ``"oracle"``."""
    if matrix not in MATRICES:
        raise ValueError(f"matrix must be one of {MATRICES}, got {matrix!r}")
    section = results[_SECTION[matrix]]
    pixel, image = section["pixel_ap"]["matrix"], section["image_auroc"]["matrix"]
    size = len(image)
    uses_pixel = [any(pixel[i][j] is not None for i in range(size)) for j in range(size)]
    return [[(pixel if uses_pixel[j] else image)[i][j] for j in range(size)] for i in range(size)]


@dataclass(frozen=True)
class RunSummary:
    """What an analysis needs from one run; ``final_mean``/``forgetting`` are ``{matrix: {metric: x}}``."""

    key: str
    seed: int
    overrides: tuple[str, ...]
    tasks: tuple[str, ...]
    primary: dict[str, float | None]
    primary_forgetting: dict[str, float | None]
    primary_final: dict[str, list[float | None]]  # per task, in learning order
    final_mean: dict[str, dict[str, float | None]]
    forgetting: dict[str, dict[str, float | None]]
    routing_accuracy: float | None
    train_seconds: float

    def to_json(self) -> dict:
        return {**asdict(self), "overrides": list(self.overrides), "tasks": list(self.tasks)}


def summarize(results: dict, key: str, seed: int, overrides: Sequence[str]) -> RunSummary:
    """Reduce a results.json dict to a :class:`RunSummary`."""
    primary, primary_forgetting, primary_final = {}, {}, {}
    for name in MATRICES:
        mat = primary_matrix(results, name)
        primary[name], primary_forgetting[name], primary_final[name] = final_mean(mat), forgetting(mat), list(mat[-1])
    return RunSummary(
        key=key,
        seed=seed,
        overrides=tuple(overrides),
        tasks=tuple(results["tasks"]),
        primary=primary,
        primary_forgetting=primary_forgetting,
        primary_final=primary_final,
        final_mean={m: {k: v["final_mean"] for k, v in results[_SECTION[m]].items()} for m in MATRICES},
        forgetting={m: {k: v["forgetting"] for k, v in results[_SECTION[m]].items()} for m in MATRICES},
        routing_accuracy=results["routing"]["accuracy"],
        train_seconds=float(sum(results["timing"]["train_seconds"])),
    )


def execute_experiment(cfg: MoleFlowConfig, tasks: Sequence[TaskData], run_dir: Path, feature_cache: Path | None) -> dict:
    """Train and evaluate ``tasks`` in order with :class:`ContinualExperiment`; returns results.json."""
    from moleflow.experiment import ContinualExperiment

    # a run directory of the cache that does not hold this run's results is left over from an interrupted one
    experiment = ContinualExperiment(cfg, run_dir, progress=False, feature_cache=feature_cache, overwrite=True)
    return experiment.run(list(tasks))


class Runner:
    """Runs (and remembers) continual experiments of one base config on one set of tasks."""

    def __init__(
        self,
        base_cfg: MoleFlowConfig,
        tasks: Sequence[TaskData],
        out_dir: Path,
        *,
        feature_cache: Path | None = None,
        execute: Execute = execute_experiment,
    ):
        self.base_cfg, self.out_dir, self.feature_cache, self.execute = base_cfg, Path(out_dir), feature_cache, execute
        self.tasks = {t.name: t for t in tasks}
        self.task_names = tuple(t.name for t in tasks)
        self.executed: list[str] = []  # keys trained by this runner (not loaded from disk), in order

    def config_for(self, overrides: Sequence[str], seed: int) -> MoleFlowConfig:
        cfg = apply_overrides(self.base_cfg, list(overrides))
        return replace(cfg, train=replace(cfg.train, seed=int(seed)))

    @staticmethod
    def _stored(run: RunDirectory, cfg: MoleFlowConfig, order: Sequence[str]) -> dict | None:
        """The results of a finished run of ``cfg`` on ``order`` kept in ``run``, else None."""
        if not (run.config_path.is_file() and run.config_path.read_text() == dump_yaml(cfg)):
            return None
        results = run.read_results()
        return results if results is not None and results.get("tasks") == list(order) else None

    def key(self, cfg: MoleFlowConfig, order: Sequence[str]) -> str:
        text = dump_yaml(cfg) + "\n" + json.dumps(list(order))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def run(self, overrides: Sequence[str] = (), seed: int = 0, order: Sequence[str] | None = None) -> RunSummary:
        """One run of ``base_cfg + overrides`` with ``seed`` on the tasks in ``order`` (default: as given)."""
        order = tuple(order) if order is not None else self.task_names
        if sorted(order) != sorted(self.task_names):
            raise ValueError(f"order {list(order)} must be a permutation of the tasks {list(self.task_names)}")
        cfg = self.config_for(overrides, seed)
        key = self.key(cfg, order)
        run = RunDirectory(self.out_dir / "runs" / key)
        results = self._stored(run, cfg, order)
        if results is not None:
            log.info("run %s (seed %d, %s): reusing %s", key, seed, ", ".join(overrides) or "defaults", run.results_path)
        else:
            log.info("run %s (seed %d, order %s, %s)", key, seed, ",".join(order), ", ".join(overrides) or "defaults")
            start = time.perf_counter()
            results = self.execute(cfg, [self.tasks[n] for n in order], run.path, self.feature_cache)
            # the runner owns what makes a run reusable, whatever the executor wrote
            write_text(dump_yaml(cfg), run.config_path)
            write_json(results, run.results_path)
            self.executed.append(key)
            log.info("run %s done in %.1fs", key, time.perf_counter() - start)
        return summarize(results, key, seed, overrides)


# ----------------------------------------------------------------------------- command-line plumbing


@dataclass(frozen=True)
class QuickProfile:
    """``--quick``: synthetic tasks, small images and few epochs, so an analysis runs in minutes on a CPU."""

    tasks: tuple[str, ...] = ("synthetic:stripes", "synthetic:disc", "synthetic:dots")
    limits: tuple[int, int] = (24, 10)
    seeds: int = 2
    overrides: tuple[str, ...] = (
        "train.epochs=5",
        "train.batch_size=8",
        "model.flow.coupling_layers=4",
        "model.backbone.image_size=128",
    )


QUICK = QuickProfile()


def add_run_arguments(parser, default_seeds: int = 3) -> None:
    """The options every run-based analysis shares (config, tasks, limits, seeds, overrides, outputs)."""
    parser.add_argument("--config", default="offline", help="preset (paper, v5, offline, offline_fine) or YAML file")
    parser.add_argument("--tasks", help="SPEC,SPEC,... in learning order (required unless --quick)")
    parser.add_argument("--data", help="root directory for bare category names")
    parser.add_argument("--limits", help="TRAIN,TEST: at most this many images per task (deterministic subsample)")
    parser.add_argument("--seeds", type=int, help=f"seeds 0..N-1 per configuration (default {default_seeds}; quick 2)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--quick", action="store_true", help="synthetic tasks, few epochs, small images, 2 seeds")
    parser.add_argument("--matrix", choices=MATRICES, default="oracle", help="accuracy matrix compared (default oracle)")
    parser.add_argument("--feature-cache", type=Path, help="backbone feature cache directory (default OUT/feature_cache)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--json", type=Path, help="where the JSON goes (default OUT/<analysis>.json)")


@dataclass
class RunSetup:
    runner: Runner
    seeds: list[int]
    matrix: str
    description: dict  # how the runs were set up, for the JSON


def setup_from_args(args, default_seeds: int = 3) -> RunSetup:
    """Build the :class:`Runner` an analysis command asked for; ``--quick`` fills what was not given."""
    from moleflow.config import load_config

    quick = QUICK if args.quick else None
    spec_text = args.tasks or (",".join(quick.tasks) if quick else None)
    if spec_text is None:
        raise ValueError("give --tasks SPEC,SPEC,... or --quick (synthetic tasks)")
    specs = [s for s in spec_text.split(",") if s.strip()]
    limits = parse_limits(args.limits) if args.limits else (quick.limits if quick else None)
    seeds = args.seeds if args.seeds is not None else (quick.seeds if quick else default_seeds)
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    overrides = [*(quick.overrides if quick else ()), *args.set]
    base_cfg = apply_overrides(load_config(args.config), overrides)
    tasks = resolve_tasks(specs, args.data, limits)
    cache = args.feature_cache if args.feature_cache is not None else args.out / "feature_cache"
    description = {
        "config": args.config,
        "overrides": overrides,
        "tasks": specs,
        "task_names": [t.name for t in tasks],
        "limits": list(limits) if limits else None,
        "seeds": list(range(seeds)),
        "matrix": args.matrix,
        "primary_metric": PRIMARY_NAME,
        "quick": bool(args.quick),
    }
    runner = Runner(base_cfg, tasks, args.out, feature_cache=cache, execute=execute_experiment)
    return RunSetup(runner, list(range(seeds)), args.matrix, description)


def write_outputs(out: Path, json_path: Path | None, name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``data`` as JSON (to ``json_path`` or ``out/<name>.json``) and ``out/<name>.md``, atomically."""
    json_path = json_path or out / f"{name}.json"
    write_json(data, json_path)
    md_path = out / f"{name}.md"
    write_text(markdown, md_path)
    return json_path, md_path


def percent(value: float | None, digits: int = 1, scale: float = 100.0) -> str:
    """``0.1234`` -> ``"12.3"`` (percent points by default); None/NaN -> ``"–"``."""
    if value is None or value != value:
        return "–"
    return f"{scale * value:.{digits}f}"
