"""The continual evaluation protocol end to end: learn tasks in order, after each one evaluate every
task learned so far (routed: task id not given; oracle: task id given), save checkpoints and results.

Metrics are computed at the backbone's input resolution (masks resized with nearest neighbour).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moleflow import __version__
from moleflow.checkpoint import save_base, save_router, save_task
from moleflow.config import MoleFlowConfig, dump_yaml
from moleflow.data.base import Sample, TaskData
from moleflow.evaluation import metrics as M
from moleflow.evaluation.protocol import AccuracyMatrix, metrics_section, routing_section
from moleflow.features.cache import CachedFeatures, CacheMismatchError, cache_fingerprint, extract_features
from moleflow.features.extractor import FeatureExtractor
from moleflow.flow.model import MoLEFlow
from moleflow.inference import ScoredBatch, score_features
from moleflow.routing import Router
from moleflow.scoring import anomaly_maps
from moleflow.training import ContinualTrainer
from moleflow.visualize import atomic_write

log = logging.getLogger(__name__)
METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def write_text_atomic(text: str, path: Path) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json_atomic(data: dict, path: Path) -> None:
    write_text_atomic(json.dumps(data, indent=2, allow_nan=False), path)


@dataclass
class EvalSet:
    """One task's test data, extracted once: features, labels and masks at the evaluation size."""

    samples: tuple[Sample, ...]
    features: CachedFeatures
    labels: np.ndarray  # (N,) {0, 1}
    masks: np.ndarray | None  # (N, S, S) uint8 {0, 1}, None when the task has no masks
    seconds: float


@dataclass
class TaskScores:
    scored: ScoredBatch
    maps: np.ndarray | None  # (N, S, S) float32
    values: dict[str, float | None]


class ContinualExperiment:
    def __init__(
        self,
        cfg: MoleFlowConfig,
        run_dir: Path,
        *,
        progress: bool = True,
        num_workers: int = 0,
        feature_cache: Path | None = None,
    ):
        """``feature_cache``: a directory where extracted features are kept between runs (keyed by the
        backbone config and the image files), so repeated runs on the same data skip the backbone."""
        self.cfg, self.run_dir, self.progress, self.num_workers = cfg, Path(run_dir), progress, num_workers
        self.feature_cache = Path(feature_cache) if feature_cache is not None else None
        self.device = resolve_device(cfg.device)
        self.extractor = FeatureExtractor(cfg.model.backbone).to(self.device)
        self.need_context = cfg.model.scale_context is not None
        torch.manual_seed(cfg.train.seed)  # the shared base flow is initialised here: reproducible runs
        self.model = MoLEFlow(cfg.model, self.extractor.context_dim if self.need_context else None).to(self.device)
        self.router = Router(cfg.router)
        self.trainer = ContinualTrainer(self.model, self.router, cfg, self.device)
        self.eval_sets: dict[str, EvalSet] = {}
        self.routed = {m: AccuracyMatrix() for m in METRICS}
        self.oracle = {m: AccuracyMatrix() for m in METRICS}
        self.timing: dict[str, list[float]] = {"feature_seconds": [], "train_seconds": []}
        self.thresholds: dict[str, float] = {}
        self.final_scores: dict[str, TaskScores] = {}

    @property
    def eval_size(self) -> int:
        return self.cfg.model.backbone.image_size

    def extract(self, samples, desc: str) -> CachedFeatures:
        if self.feature_cache is None:
            return self._extract(samples, desc)
        digest = samples_digest(samples)
        expected = cache_fingerprint(self.cfg.model.backbone, samples=digest, context=self.need_context)
        key = hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:16]
        path = self.feature_cache / f"{self.cfg.model.backbone.name}-{key}.safetensors"  # one file per fingerprint
        if path.exists():
            try:
                return CachedFeatures.load(path, expected)
            except CacheMismatchError as e:
                log.warning("ignoring feature cache: %s", e)
        feats = self._extract(samples, desc)
        feats.fingerprint = expected
        feats.save(path)
        return feats

    def _extract(self, samples, desc: str) -> CachedFeatures:
        return extract_features(
            self.extractor,
            samples,
            need_context=self.need_context,
            batch_size=self.cfg.train.batch_size,
            num_workers=self.num_workers,
            device=self.device,
            progress=self.progress,
            desc=desc,
        )

    def prepare_eval_set(self, task: TaskData) -> EvalSet:
        start = time.perf_counter()
        feats = self.extract(task.test, f"features {task.name}/test")
        masks = None
        if task.has_masks:
            masks = np.stack([_resize_mask(s.load_mask(), self.eval_size) for s in task.test])
        labels = np.array([s.label for s in task.test], dtype=np.int64)
        return EvalSet(task.test, feats, labels, masks, time.perf_counter() - start)

    def learn(self, task: TaskData) -> None:
        """Extract features, train, checkpoint, compute the task's decision threshold."""
        log.info(
            "task %d: %r (%d train / %d test images) from %s",
            len(self.model.tasks),
            task.name,
            len(task.train),
            len(task.test),
            task.source,
        )
        start = time.perf_counter()
        train_feats = self.extract(task.train, f"features {task.name}/train")
        self.timing["feature_seconds"].append(time.perf_counter() - start)
        report = self.trainer.learn_task(task.name, train_feats.to(self.device), progress=self.progress)
        self.timing["train_seconds"].append(report.seconds)
        own = torch.full((len(train_feats),), len(self.model.tasks) - 1, dtype=torch.long)
        train_scores = self.score(train_feats, own).image_scores
        # decision threshold: a heuristic from normals only (the 99th percentile of training scores)
        self.thresholds[task.name] = float(torch.quantile(train_scores.double(), 0.99))
        checkpoints = self.run_dir / "checkpoints"
        if len(self.model.tasks) == 1 or self.cfg.train.base_policy == "always_trainable":
            save_base(self.model, self.cfg, checkpoints)
        save_task(self.model, self.cfg, task.name, checkpoints, threshold=self.thresholds[task.name])
        save_router(self.router, self.cfg, checkpoints)

    def score(self, feats: CachedFeatures, task_index: torch.Tensor | None = None) -> ScoredBatch:
        """Batched scoring (routed when ``task_index`` is None)."""
        parts, bs = [], 64
        for start in range(0, len(feats), bs):
            chunk = feats[start : start + bs].to(self.device)
            idx = None if task_index is None else task_index[start : start + bs].to(self.device)
            parts.append(score_features(self.model, self.router, chunk, self.cfg.scoring, idx))
        return ScoredBatch(
            *(torch.cat([getattr(p, f) for p in parts]).cpu() for f in ("task_index", "patch_scores", "image_scores"))
        )

    def evaluate_task(self, eval_set: EvalSet, task_index: torch.Tensor | None) -> TaskScores:
        scored = self.score(eval_set.features, task_index)
        values: dict[str, float | None] = dict.fromkeys(METRICS)
        values["image_auroc"] = _finite(M.image_auroc(scored.image_scores.numpy(), eval_set.labels))
        maps = None
        if eval_set.masks is not None:
            size = (self.eval_size, self.eval_size)
            maps = anomaly_maps(scored.patch_scores, size, self.cfg.scoring.smoothing_sigma).numpy()
            values["pixel_auroc"] = _finite(M.pixel_auroc(maps, eval_set.masks))
            values["pixel_ap"] = _finite(M.pixel_ap(maps, eval_set.masks))
            values["aupro"] = _finite(M.aupro(maps, eval_set.masks))
        return TaskScores(scored, maps, values)

    def evaluate_all(self) -> None:
        """Fill row ``i`` (i = tasks learned - 1) of the routed and oracle accuracy matrices."""
        row = len(self.model.tasks) - 1
        for j, name in enumerate(self.model.tasks):
            es = self.eval_sets[name]
            routed = self.evaluate_task(es, None)
            oracle = self.evaluate_task(es, torch.full((len(es.labels),), j, dtype=torch.long))
            for m in METRICS:
                self.routed[m].record(row, j, routed.values[m])
                self.oracle[m].record(row, j, oracle.values[m])
            self.final_scores[name] = routed
            log.info(
                "after %r: %r routed %s | oracle %s",
                self.model.tasks[-1],
                name,
                _fmt(routed.values),
                _fmt(oracle.values),
            )

    def run(
        self,
        tasks: list[TaskData],
        specs: list[str] | None = None,
        limits: tuple[int, int] | None = None,
        data_root: str | None = None,
    ) -> dict:
        """Learn and evaluate ``tasks`` in order. ``specs``/``limits`` (how the tasks were resolved) are
        written to ``tasks.json`` so that ``moleflow eval`` can rebuild the same test sets."""
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(dump_yaml(self.cfg), self.run_dir / "config.yaml")
        specs = specs or [None] * len(tasks)
        entries = [{"name": t.name, "spec": spec, "source": t.source} for t, spec in zip(tasks, specs, strict=False)]
        root = str(Path(data_root).resolve()) if data_root else None
        write_json_atomic({"tasks": entries, "limits": limits, "data_root": root}, self.run_dir / "tasks.json")
        for task in tasks:
            self.learn(task)
            self.eval_sets[task.name] = self.prepare_eval_set(task)
            self.evaluate_all()
        results = self.results()
        write_json_atomic(results, self.run_dir / "results.json")
        return results

    def routing_result(self) -> dict:
        true, routed = [], []
        for j, name in enumerate(self.model.tasks):
            idx = self.final_scores[name].scored.task_index.tolist()
            true += [j] * len(idx)
            routed += idx
        return routing_section(true, routed, len(self.model.tasks))

    def results(self) -> dict:
        n_test = sum(len(es.labels) for es in self.eval_sets.values())
        test_seconds = sum(es.seconds for es in self.eval_sets.values())
        score_start = time.perf_counter()
        for es in self.eval_sets.values():
            self.score(es.features)
        score_seconds = time.perf_counter() - score_start
        counts = self.model.parameter_counts()
        return {
            "tasks": list(self.model.tasks),
            "metrics": metrics_section(self.routed),
            "metrics_oracle": metrics_section(self.oracle),
            "routing": self.routing_result(),
            "thresholds": self.thresholds,
            "timing": {
                **self.timing,
                "inference_ms_per_image": 1000.0 * (test_seconds + score_seconds) / max(1, n_test),
            },
            "params": {
                "backbone": sum(p.numel() for p in self.extractor.parameters()),
                "base": counts["base"],
                "per_task": [counts["per_task"][t] for t in self.model.tasks],
            },
            "environment": {
                "device": str(self.device)
                if self.device.type != "cpu"
                else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
                "torch": torch.__version__,
                "moleflow": __version__,
                "preset": self.cfg.preset,
            },
        }


def samples_digest(samples) -> str:
    """SHA-256 identifying a list of samples: file path, size and mtime for files, pixels for arrays."""
    h = hashlib.sha256()
    for sample in samples:
        path = getattr(sample, "image_path", None)
        if path is not None:
            stat = Path(path).stat()
            h.update(f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        else:
            h.update(sample.name.encode() + np.ascontiguousarray(sample.load_image()).tobytes())
    return h.hexdigest()


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return (F.interpolate(t, size=(size, size), mode="nearest")[0, 0] > 0.5).numpy().astype(np.uint8)


def _finite(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def _fmt(values: dict[str, float | None]) -> str:
    return " ".join(f"{k}={'-' if v is None else f'{100 * v:.1f}'}" for k, v in values.items())
