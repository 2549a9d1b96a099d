"""A run being worked on: its :class:`~moleflow.detector.Detector`, the test sets of its products, and its
results (``results.json`` + ``report.md``), kept consistent with each other after every command.

Every command that changes a run goes through a session: ``learn`` (then evaluate new or all products),
``forget``, ``calibrate``, ``evaluate`` (``moleflow eval``). The benchmark protocol
(:class:`~moleflow.experiment.ContinualExperiment`) is a session that learns a list of products and
evaluates all of them after each one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moleflow.data.base import TaskData
from moleflow.data.errors import DatasetError
from moleflow.detector import Detector
from moleflow.evaluation.evaluate import EvalSet, ProductEvaluation, evaluate_product, prepare_eval_set
from moleflow.evaluation.results import ResultsBook
from moleflow.rundir import TaskRecord
from moleflow.sources import resolve_source

__all__ = ["EVAL_CHOICES", "RunSession"]

log = logging.getLogger(__name__)
EVAL_CHOICES = ("all", "new", "none")
EXAMPLES_ANOMALOUS, EXAMPLES_NORMAL = 3, 1


class RunSession:
    """``detector`` + test sets + results book (module docstring)."""

    def __init__(self, detector: Detector) -> None:
        if detector.run is None:
            raise ValueError("a session needs a detector bound to a run directory")
        self.detector = detector
        self.book = ResultsBook.from_json(detector.run.read_results(), detector.products)
        self.eval_sets: dict[str, EvalSet] = {}
        self.evaluations: dict[str, ProductEvaluation] = {}
        self._unreachable: set[str] = set()
        self.last_results: dict[str, Any] | None = None

    @property
    def run_dir(self) -> Path:
        return self.detector.run.path

    # ------------------------------------------------------------------ commands

    def learn(
        self,
        task_or_source: TaskData | str | os.PathLike[str],
        name: str | None = None,
        *,
        evaluate: str = "all",
        **learn_options: Any,
    ) -> TaskRecord:
        """Learn one product, then evaluate per ``evaluate`` (``all`` / ``new`` / ``none``) and write results."""
        if evaluate not in EVAL_CHOICES:
            raise ValueError(f"evaluate must be one of {EVAL_CHOICES}, got {evaluate!r}")
        name = name or getattr(task_or_source, "name", None)
        if name is None:
            raise ValueError("give the product's name")
        resolved = resolve_source(
            name,
            task_or_source,
            learn_options.pop("data_root", self.detector.data_root),
            learn_options.pop("limits", None),
            self.run_dir,
            learn_options.pop("spec", None),
        )
        record = self.detector.learn(name, resolved, commit=False, **learn_options)
        self.book.learned(name)
        self.eval_sets.pop(name, None)
        self._unreachable.discard(name)
        self._add_eval_set(resolved.task, name)
        if evaluate != "none":
            self.evaluate(self.detector.products if evaluate == "all" else [name])
        self.detector.commit(before_index=self._derived_files())
        return record

    def forget(self, name: str) -> None:
        self.detector.remove(name, commit=False)
        self.book.drop(name)
        self.eval_sets.pop(name, None)
        self.evaluations.pop(name, None)
        self.detector.commit(before_index=self._derived_files())

    def calibrate(self, name: str, *, evaluate: bool = True, **options: Any) -> TaskRecord:
        """Reset ``name``'s thresholds (see :meth:`Detector.calibrate`), then its test verdicts."""
        record = self.detector.calibrate(name, commit=False, **options)
        if evaluate:
            self.evaluate([name])
        self.detector.commit(before_index=self._derived_files())
        return record

    def evaluate(self, names: Iterable[str] | None = None) -> dict[str, ProductEvaluation]:
        """Evaluate ``names`` (default: every product) into the last row of the results."""
        names = list(self.detector.products if names is None else names)
        done = {}
        for name in names:
            es = self.eval_set(name)
            if es is None:
                continue
            start = time.perf_counter()
            ev = evaluate_product(self.detector, es)
            self.book.record(ev, self.detector.router.tasks)
            self.evaluations[name] = done[name] = ev
            log.info(
                "%s: routed %s | oracle %s | %s (%.1fs)",
                name,
                _fmt(ev.routed),
                _fmt(ev.oracle),
                _fmt_summary(ev.summary),
                time.perf_counter() - start,
            )
        if done:
            self._time_inference(done)
        return done

    # ------------------------------------------------------------------ test sets

    def eval_set(self, name: str) -> EvalSet | None:
        """The test set of product ``name``, rebuilt from its record when needed; ``None`` if unreachable."""
        if name not in self.eval_sets and name not in self._unreachable:
            self._add_eval_set(None, name)
        return self.eval_sets.get(name)

    def _add_eval_set(self, task: TaskData | None, name: str) -> None:
        if task is None:
            record = self.detector.records[name]
            try:
                task = resolve_source(
                    name, None, self.detector.data_root, record.limits, self.run_dir, record.spec, record.location
                ).task
            except (DatasetError, FileNotFoundError) as e:
                log.warning("product %r is not evaluated: its test images cannot be found (%s)", name, e)
                self._unreachable.add(name)
                return
        if not task.test:
            return
        self.eval_sets[name] = prepare_eval_set(self.detector, task)

    def _time_inference(self, done: dict[str, ProductEvaluation]) -> None:
        """ms per image of extraction + routing + scoring, from the evaluated test sets."""
        images = sum(len(self.eval_sets[n].labels) for n in done)
        start = time.perf_counter()
        for name in done:
            self.detector.score(self.eval_sets[name].features)
        score_s = time.perf_counter() - start
        extract_s = sum(self.eval_sets[n].seconds for n in done)
        self.book.inference_ms_per_image = 1000.0 * (extract_s + score_s) / max(1, images)

    # ------------------------------------------------------------------ results and report

    def results(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.book.to_json(self.detector, extra)

    def write(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Rewrite results.json and report.md for the committed state (``moleflow eval``)."""
        write = self._derived_files(extra)
        with self.detector.run.writing():
            write()
        return self.last_results

    def _derived_files(self, extra: dict[str, Any] | None = None):
        """A function writing results.json and report.md of the current (not yet committed) state; called
        by the commit just before the index (see moleflow.rundir)."""
        from moleflow.report import write_report

        results = self.last_results = self.results(extra)
        examples = self.examples()

        def write() -> None:
            self.detector.run.write_results(results)
            write_report(self.run_dir, results, examples)

        return write

    def examples(self) -> dict[str, Any]:
        """A few test images per evaluated product with their routed anomaly maps, for the report."""
        from moleflow.report import TaskExamples
        from moleflow.visualize import resize_map

        out = {}
        size = self.detector.cfg.model.backbone.image_size
        for name, ev in self.evaluations.items():
            es = self.eval_sets.get(name)
            if es is None or name not in self.detector.records:
                continue
            picks = (
                np.flatnonzero(es.labels == 1)[:EXAMPLES_ANOMALOUS].tolist()
                + np.flatnonzero(es.labels == 0)[:EXAMPLES_NORMAL].tolist()
            )
            maps = ev.maps if ev.maps is not None else _maps(self.detector, ev, picks)
            out[name] = TaskExamples(
                task=name,
                images=[_square(es.samples[i].load_image(), size) for i in picks],
                maps=[resize_map(maps[i] if ev.maps is not None else maps[k], (size, size)) for k, i in enumerate(picks)],
                masks=[None if es.masks is None else es.masks[i] for i in picks],
                labels=[int(es.labels[i]) for i in picks],
                scores=ev.scored.image_scores.numpy(),
                all_labels=es.labels,
                threshold=self.detector.records[name].calibration.image_threshold,
            )
        return out


def _maps(detector: Detector, ev: ProductEvaluation, picks: Sequence[int]) -> np.ndarray:
    from moleflow.scoring import anomaly_maps

    size = detector.cfg.model.backbone.image_size
    return anomaly_maps(ev.scored.patch_scores[list(picks)], (size, size), detector.cfg.scoring.smoothing_sigma).numpy()


def _square(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def _fmt(values: dict[str, float | None] | None) -> str:
    if values is None:
        return "-"
    return " ".join(f"{k}={'-' if v is None else f'{100 * v:.1f}'}" for k, v in values.items())


def _fmt_summary(summary: dict[str, Any]) -> str:
    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    recall, false_alarms, unknown = (pct(summary[k]) for k in ("recall", "false_alarm_rate", "unknown_rate"))
    return f"recall {recall}, false alarms {false_alarms}, unknown {unknown}"
