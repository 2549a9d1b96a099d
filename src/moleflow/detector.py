"""The deployable model of every product learned so far: :class:`Detector`.

It is created from a config or loaded from a run directory, learns a product (the first one trains the
shared base, which is frozen from then on; later ones add only their own parts), forgets one, recalibrates
one, predicts on images and saves itself. The CLI, the server, the exporter and the benchmark protocol
(:class:`~moleflow.experiment.ContinualExperiment`) are thin layers over it.

A detector bound to a run directory (``Detector.create(cfg, run_dir)`` / ``Detector.load(run_dir)``)
commits every change to it at once, atomically (:mod:`moleflow.rundir`); an unbound one lives in memory
until :meth:`Detector.save`. No training image or feature is kept after a product is learned: only its
parameters, its router prototype and its calibration.

    det = Detector.create("offline", "runs/plant")
    det.learn("hazelnut", "../shared/datasets/hazelnut_toy/hazelnut")
    det.learn("solar", "elpv:mono")
    for p in det.predict(["part1.png", "part2.png"]):
        print(p.product, p.verdict, p.normalized_score)
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moleflow.calibration import Calibration
from moleflow.config import MoleFlowConfig, apply_overrides, load_config, to_dict
from moleflow.data.base import Sample, TaskData
from moleflow.features.cache import CachedFeatures
from moleflow.features.store import FeatureSource
from moleflow.inference import ScoredBatch, score_features
from moleflow.maps import MAX_MAP_SIDE, map_shape, resize_map
from moleflow.names import check_task_name
from moleflow.portable import DetectorState, ProductState, add_product, build_model, detector_state, product_state
from moleflow.prediction import Prediction, decide, input_batches, make_prediction
from moleflow.products import ProductRecords
from moleflow.rundir import RunDirectory, RunDirectoryError, RunIndex, TaskRecord
from moleflow.sources import ResolvedSource, calibration_samples, holdout_split, resolve_source
from moleflow.training import ContinualTrainer, product_seed, routing_features
from moleflow.training_log import TrainingLogger

if TYPE_CHECKING:
    from moleflow.features.extractor import FeatureExtractor

__all__ = ["MAX_MAP_SIDE", "Detector", "DetectorError", "TaskExistsError", "UnknownTaskError", "resolve_device"]

log = logging.getLogger(__name__)
SCORE_BATCH = 64
MAX_RESIDENT = 64  # lazy detectors: products whose parts stay in memory


class DetectorError(ValueError):
    """A request the detector cannot carry out; the message says why and what to do."""


class TaskExistsError(DetectorError):
    """``learn`` of a name the detector already has, without ``replace=True``."""


class UnknownTaskError(DetectorError):
    """A product name the detector does not have."""


def resolve_device(name: str | torch.device | None) -> torch.device:
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DetectorError(f"device {name!r} was asked for but no CUDA GPU is available; use --device cpu")
    return device


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Detector(ProductRecords):
    """See the module docstring. Build one with :meth:`create` or :meth:`load`, not the constructor."""

    def __init__(
        self,
        cfg: MoleFlowConfig,
        model,
        router,
        index: RunIndex,
        *,
        run: RunDirectory | None = None,
        device: str | torch.device | None = None,
        feature_cache: str | os.PathLike[str] | None = None,
        num_workers: int = 0,
        progress: bool = True,
        extractor: FeatureExtractor | None = None,
        loggers: Sequence[TrainingLogger] = (),
    ) -> None:
        self.cfg = cfg
        self.device = resolve_device(device if device is not None else cfg.device)
        self.model = model.to(self.device)
        self.router = router
        self.base_id = index.base_id
        self.data_root = index.data_root
        self.records: dict[str, TaskRecord] = {t.name: t for t in index.tasks}
        self.run = run
        self.feature_cache = Path(feature_cache) if feature_cache is not None else None
        self.num_workers = num_workers
        self.progress = progress
        self.loggers = list(loggers)
        self._extractor = extractor  # None: built on first use; given: a FeatureExtractor of this backbone config
        self.on_stage: Callable[[str, str], None] | None = None  # (product, stage) as learning moves on
        self._staged: set[str] = set()  # products learned since the last commit
        self._resident: OrderedDict[str, None] | None = None  # lazy: products whose parts are in memory (LRU)
        self.max_resident = MAX_RESIDENT
        self._base_dirty = False
        if list(self.records) != self.router.tasks:
            raise DetectorError(f"index products {list(self.records)} differ from the router's {self.router.tasks}")

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        config: MoleFlowConfig | str | os.PathLike[str] = "offline",
        run_dir: str | os.PathLike[str] | None = None,
        *,
        overrides: Sequence[str] = (),
        **options: Any,
    ) -> Detector:
        """A detector with no product yet, from a config (preset name, YAML path or object).

        ``run_dir``: bind it to a new run directory (must not exist or be empty); ``options``: ``device``,
        ``feature_cache``, ``num_workers``, ``progress``, ``loggers`` (training curves, moleflow.training_log).
        """
        from moleflow.flow.model import MoLEFlow
        from moleflow.routing import Router

        cfg = config if isinstance(config, MoleFlowConfig) else load_config(config)
        cfg = apply_overrides(cfg, overrides) if overrides else cfg
        run = None
        if run_dir is not None:
            run = RunDirectory(run_dir)
            if not run.is_empty():
                raise RunDirectoryError(
                    f"{run.path} already exists and is not empty; load it (Detector.load) to add products, "
                    "or choose a new directory"
                )
        torch.manual_seed(cfg.train.seed)  # the shared base flow is initialised here: reproducible runs
        context_dim = cls._context_dim(cfg)
        detector = cls(cfg, MoLEFlow(cfg.model, context_dim), Router(cfg.router), RunIndex(), run=run, **options)
        if run is not None:
            with run.writing():
                run.write_config(cfg)
                run.write_index(RunIndex())
        return detector

    @classmethod
    def load(
        cls,
        run_dir: str | os.PathLike[str],
        *,
        check_calibration: bool = True,
        lazy: bool = False,
        max_resident: int = MAX_RESIDENT,
        **options: Any,
    ) -> Detector:
        """The detector saved in ``run_dir``; every file is checked (config fingerprint, base id).

        ``check_calibration``: refuse products whose thresholds were set under other scoring settings than
        the config's (their scores would be compared with thresholds on another scale). ``lazy``: read only
        the base and the router's prototypes now, and a product's parts when an image is first routed to it
        (at most ``max_resident`` products' parts stay in memory, least recently used dropped first): for
        runs of many products, whose full load costs time and memory per product. Scores are the same.
        Given an export directory (``moleflow export``), returns its
        :class:`~moleflow.deploy.runtime.OnnxDetector` (same predict API, on onnxruntime; it cannot learn).
        """
        from moleflow.deploy.manifest import is_export
        from moleflow.flow.model import MoLEFlow
        from moleflow.routing import Router

        if is_export(run_dir):
            from moleflow.deploy.runtime import OnnxDetector

            return OnnxDetector.load(run_dir, **options)  # type: ignore[return-value]
        run = RunDirectory(run_dir).require()
        cfg = run.read_config()
        index = run.read_index()
        lazy = lazy and index.base_id is not None
        if index.base_id is None:
            model, router = MoLEFlow(cfg.model, cls._context_dim(cfg)), Router(cfg.router)
        else:
            model, router = run.load_model(cfg, index, parts=not lazy)
        detector = cls(cfg, model, router, index, run=run, **options)
        if lazy:
            if max_resident < 1:
                raise DetectorError(f"max_resident must be >= 1, got {max_resident}")
            detector._resident, detector.max_resident = OrderedDict(), max_resident
        if check_calibration:
            detector.check_calibration()
        return detector

    @staticmethod
    def _context_dim(cfg: MoleFlowConfig) -> int | None:
        if cfg.model.scale_context is None:
            return None
        from moleflow.features.backbones import create_backbone

        backbone = create_backbone(cfg.model.backbone.name, cfg.model.backbone.layers, cfg.model.backbone.image_size, False)
        return sum(backbone.channels)

    # ------------------------------------------------------------------ what it holds

    def __repr__(self) -> str:
        where = f", run={str(self.run.path)!r}" if self.run else ""
        return f"Detector(preset={self.cfg.preset!r}, products={self.products}{where})"

    def scoring_settings(self) -> dict[str, Any]:
        """The settings that fix a product's score scale (recorded with its calibration)."""
        return {**to_dict(self.cfg.scoring), "image_size": self.cfg.model.backbone.image_size}

    def check_calibration(self) -> None:
        """Raise unless every product was calibrated under the current scoring settings."""
        now = self.scoring_settings()
        stale = [name for name, rec in self.records.items() if rec.calibration.scoring != now]
        if stale:
            then = self.records[stale[0]].calibration.scoring
            changed = {k: (then.get(k), v) for k, v in now.items() if then.get(k) != v}
            where = f"moleflow calibrate {self.run.path} NAME" if self.run else "Detector.calibrate(name)"
            raise DetectorError(
                f"products {stale} were calibrated under other scoring settings than the config's ({changed}, "
                f"as (calibrated, now)); restore those settings, or recalibrate each product: {where}"
            )

    def _require(self, name: str) -> TaskRecord:
        if name not in self.records:
            raise UnknownTaskError(f"no product {name!r}; this model has {self.products or 'no products yet'}")
        return self.records[name]

    # ------------------------------------------------------------------ features

    @property
    def extractor(self):
        """The frozen backbone (built on first use: loading its weights takes a moment)."""
        if self._extractor is None:
            from moleflow.features.extractor import extractor_for

            self._extractor = extractor_for(self.cfg).to(self.device)
        return self._extractor

    def features(self, samples: Sequence[Sample], desc: str = "features") -> CachedFeatures:
        """Backbone features of ``samples`` (CPU), through the feature cache when one was given."""
        source = FeatureSource(
            self.extractor,
            need_context=self.model.scale_context is not None,
            batch_size=self.cfg.train.batch_size,
            num_workers=self.num_workers,
            device=self.device,
            cache_dir=self.feature_cache,
            progress=self.progress,
        )
        return source(samples, desc)

    # ------------------------------------------------------------------ learning

    def learn(
        self,
        name: str,
        source: str | os.PathLike[str] | TaskData | ResolvedSource,
        *,
        calib: str | os.PathLike[str] | Sequence[Sample] | None = None,
        replace: bool = False,
        data_root: str | os.PathLike[str] | None = None,
        limits: tuple[int, int] | None = None,
        spec: str | None = None,
        commit: bool = True,
        check: bool = True,
    ) -> TaskRecord:
        """Learn product ``name`` from ``source`` and calibrate its thresholds; returns its record.

        ``source``: a task SOURCE (a directory in MVTec layout, ``elpv:mono``, ``synthetic:disc``,
        ``folder:GOOD[:BAD[:MASKS]]``; see :mod:`moleflow.data.spec`) or a :class:`TaskData`. ``calib``:
        normal images to calibrate on (a directory or samples); by default ``calibration.holdout`` of the
        training normals are held out of training for it. ``replace``: retrain an existing product (its old
        parts stay in use until the new ones are committed). ``spec``: how to rebuild the product's data
        later (recorded for ``moleflow eval``; derived from ``source`` when it is a string). ``commit``:
        write the change to the run directory now (``False``: at the next :meth:`commit`). ``check``:
        read every image (and mask) first, and refuse the product listing every problem (moleflow.validation).
        """
        check_task_name(name)
        if name in self.records and not replace:
            raise TaskExistsError(f"product {name!r} already exists; forget it first, or pass replace=True (--replace)")
        self.load_all()
        resolved = self.resolve(name, source, data_root=data_root, limits=limits, spec=spec)
        if check:
            from moleflow.validation import validate_tasks

            validate_tasks([resolved.task], calibration_samples(calib) if calib is not None else ())
        record, base_changed = self._learn(resolved, calib)
        self._staged.add(name)
        self._base_dirty |= base_changed
        if commit:
            self.commit()
        return record

    def resolve(
        self,
        name: str,
        source: str | os.PathLike[str] | TaskData | ResolvedSource,
        *,
        data_root: str | os.PathLike[str] | None = None,
        limits: tuple[int, int] | None = None,
        spec: str | None = None,
    ) -> ResolvedSource:
        """The data of product ``name`` from ``source`` and how the run records it (see :meth:`learn`)."""
        return resolve_source(name, source, data_root, limits, self._run_path(), spec)

    def _learn(self, resolved: ResolvedSource, calib) -> tuple[TaskRecord, bool]:
        task = resolved.task
        name, start = task.name, time.perf_counter()
        if calib is not None:
            train, held_out, method = list(task.train), calibration_samples(calib), "images"
        else:
            train, held_out = holdout_split(task.train, self.cfg.calibration.holdout)
            method = "holdout" if held_out else "in_sample"
            if not held_out:
                log.warning(
                    "product %r: %d training images are too few to hold some out; its thresholds are set on its "
                    "own training images (optimistic). Give more images or calibration images (--calib DIR)",
                    name,
                    len(task.train),
                )
        self._stage(name, "extracting")
        log.info(
            "product %r: %d training images, %d to calibrate on (%s), from %s",
            name,
            len(train),
            len(held_out),
            method,
            task.source,
        )
        train_feats = self.features(train, f"{name}: train features")
        calib_feats = self.features(held_out, f"{name}: calibration features") if held_out else train_feats
        feature_s = time.perf_counter() - start
        train_base = self.base_id is None or self.cfg.train.base_policy == "always_trainable"
        seed = product_seed(self.cfg.train.seed, name)
        # early stopping watches the calibration normals (held out of training, never trained on); the epoch
        # it keeps is then chosen on the images the thresholds are set on, a mild optimism of the thresholds
        stop_on = calib_feats.to(self.device) if self.cfg.train.early_stopping is not None and held_out else None
        undo = self._snapshot(name, train_base)
        self._stage(name, "training")
        try:
            report = ContinualTrainer(self.model, self.router, self.cfg, self.device).learn_task(
                name,
                train_feats.to(self.device),
                train_base=train_base,
                seed=seed,
                progress=self.progress,
                loggers=self.loggers,
                validation=stop_on,
            )
            cal_start = time.perf_counter()
            calibration = self.fit_calibration(name, calib_feats, method)
        except BaseException:
            self._restore(name, undo)
            raise
        from moleflow.checkpoint import new_id

        if self.base_id is None:
            self.base_id = new_id()
        record = TaskRecord(
            name=name,
            source=task.source,
            learned_at=_now(),
            train_images=len(train),
            seed=seed,
            calibration=calibration,
            parts_id=new_id(),
            spec=resolved.spec,
            location=resolved.location,
            limits=list(resolved.limits) if resolved.limits else None,
            seconds={"features": feature_s, "train": report.seconds, "calibration": time.perf_counter() - cal_start},
        )
        self.records.pop(name, None)
        self.records[name] = record  # the router appended it last: keep the same order
        log.info(
            "product %r learned: image threshold %.4g (%s, fpr %.3g on %d images), unknown beyond distance %.4g",
            name,
            calibration.image_threshold,
            calibration.image_rule,
            calibration.image_fpr,
            calibration.images,
            calibration.unknown_threshold,
        )
        return record, train_base

    def _stage(self, name: str, stage: str) -> None:
        if self.on_stage is not None:
            self.on_stage(name, stage)

    def _snapshot(self, name: str, train_base: bool) -> dict[str, Any]:
        """What :meth:`_restore` needs to undo a failed learn: the old product (if replaced), the base."""
        undo: dict[str, Any] = {"base": None, "product": None}
        if train_base:
            undo["base"] = {k: v.detach().clone() for k, v in self.model.base_state_dict().items()}
        if name in self.records:
            self._ensure([name])
            undo["product"] = (self.model.task_state_dict(name), self.router.prototype(name), self.records[name])
            self.model.remove_task(name)
            self.router.remove(name)
            del self.records[name]
        return undo

    def _restore(self, name: str, undo: dict[str, Any]) -> None:
        if name in self.model.tasks:
            self.model.remove_task(name)
        if name in self.router.tasks:
            self.router.remove(name)
        if undo["base"] is not None:
            self.model.load_state_dict(undo["base"], strict=False)
        if undo["product"] is not None:
            state, (mean, precision), record = undo["product"]
            self.model.load_task_state_dict(name, state)
            self.router.add(name, mean, precision)
            self.records[name] = record
        self.model.set_trainable(None, train_base=False)
        self.model.eval()

    def fit_calibration(self, name: str, feats: CachedFeatures, method: str, **rates: float) -> Calibration:
        """Thresholds of product ``name`` from features of normal images (see :mod:`moleflow.calibration`)."""
        from moleflow.scoring import anomaly_maps

        ccfg = self.cfg.calibration
        index = torch.full((len(feats),), self.router.tasks.index(name), dtype=torch.long)
        scored = self.score_flow(feats, index)  # the flow's own image scores: the mix is fitted on them
        size = self.cfg.model.backbone.image_size
        maps = anomaly_maps(scored.patch_scores, (size, size), self.cfg.scoring.smoothing_sigma).numpy()
        return Calibration.fit(
            method=method,
            scoring=self.scoring_settings(),
            scores=scored.image_scores.numpy(),
            distances=scored.distances.numpy(),
            pixels=maps,
            image_fpr=rates.get("image_fpr", ccfg.image_fpr),
            pixel_fpr=rates.get("pixel_fpr", ccfg.pixel_fpr),
            unknown_fpr=rates.get("unknown_fpr", ccfg.unknown_fpr),
            unknown_margin=ccfg.unknown_margin,
            global_weight=self.cfg.scoring.global_weight,
        )

    def remove(self, name: str, *, commit: bool = True) -> None:
        """Forget product ``name``: its parts and prototype are deleted; every other product is untouched."""
        self._require(name)
        if name in self.model.tasks:  # a lazy detector may not have read it
            self.model.remove_task(name)
        if self._resident is not None:
            self._resident.pop(name, None)
        self.router.remove(name)
        del self.records[name]
        self._staged.discard(name)
        if commit:
            self.commit()
        log.info("product %r forgotten; %d left", name, len(self.records))

    def calibrate(
        self,
        name: str,
        *,
        fpr: float | None = None,
        pixel_fpr: float | None = None,
        unknown_fpr: float | None = None,
        threshold: float | None = None,
        calib: str | os.PathLike[str] | Sequence[Sample] | None = None,
        commit: bool = True,
    ) -> TaskRecord:
        """Reset product ``name``'s thresholds: at other false-alarm rates (on its stored calibration
        values), by hand (``threshold``), or on new normal images (``calib``). With none of these, on its
        original held-out images again (rebuilt from its recorded source), e.g. after a scoring change."""
        record = self._require(name)
        cal = record.calibration
        rates = {
            k: v for k, v in (("image_fpr", fpr), ("pixel_fpr", pixel_fpr), ("unknown_fpr", unknown_fpr)) if v is not None
        }
        if calib is not None or (not rates and threshold is None):
            samples, method = (calibration_samples(calib), "images") if calib is not None else self._held_out(record)
            current = {
                "image_fpr": cal.image_fpr or self.cfg.calibration.image_fpr,
                "pixel_fpr": cal.pixel_fpr,
                "unknown_fpr": cal.unknown_fpr,
            }
            cal = self.fit_calibration(
                name, self.features(samples, f"{name}: calibration features"), method, **{**current, **rates}
            )
        elif rates:
            if cal.scoring != self.scoring_settings():
                raise DetectorError(
                    f"product {name!r} was calibrated under other scoring settings; recalibrate it on images "
                    "(calibrate without rates, or with calib=DIR) before changing its rates"
                )
            cal = cal.with_rates(**rates)
        if threshold is not None:
            cal = cal.with_threshold(threshold)
        self.records[name] = dataclasses.replace(record, calibration=cal)
        if commit:
            self.commit()
        return self.records[name]

    def _held_out(self, record: TaskRecord) -> tuple[list[Sample], str]:
        if record.calibration.method not in ("holdout", "in_sample") or not (record.spec or record.location):
            raise DetectorError(
                f"product {record.name!r} was calibrated on separate images ({record.calibration.method}); give them "
                "again (calib=DIR / --calib DIR)"
            )
        task = resolve_source(
            record.name, None, self.data_root, record.limits, self._run_path(), record.spec, record.location
        ).task
        train, held_out = holdout_split(task.train, self.cfg.calibration.holdout)
        return (held_out, "holdout") if held_out else (train, "in_sample")

    # ------------------------------------------------------------------ scoring and prediction

    def score(self, feats: CachedFeatures, task_index: torch.Tensor | None = None) -> ScoredBatch:
        """Score cached features in batches (routed when ``task_index`` is None); CPU results. The image
        scores are those each product's threshold applies to: the flow's, or mixed with the routing distance
        under the product's calibration (``scoring.global_weight``, :mod:`moleflow.score_fusion`)."""
        scored = self.score_flow(feats, task_index)
        if self.cfg.scoring.global_weight == 0:
            return scored
        mixed = scored.image_scores.clone()
        for t in torch.unique(scored.task_index).tolist():
            name = self.router.tasks[t]
            cal = self._require(name).calibration
            if cal.fusion is None or cal.fusion.weight != self.cfg.scoring.global_weight:
                raise DetectorError(
                    f"product {name!r} was calibrated without scoring.global_weight="
                    f"{self.cfg.scoring.global_weight:g}; recalibrate it: moleflow calibrate RUN {name}"
                )
            rows = (scored.task_index == t).nonzero().squeeze(1)
            values = cal.image_scores(scored.image_scores[rows].numpy(), scored.distances[rows].numpy())
            mixed[rows] = torch.from_numpy(values).to(mixed.dtype)
        return dataclasses.replace(scored, image_scores=mixed)

    def score_flow(self, feats: CachedFeatures, task_index: torch.Tensor | None = None) -> ScoredBatch:
        """:meth:`score` with the flow's own image scores (what calibration mixes with the distances)."""
        if not self.router.tasks:
            raise DetectorError("this model has no products yet; learn one first")
        parts = []
        for start in range(0, len(feats), SCORE_BATCH):
            chunk = feats[start : start + SCORE_BATCH].to(self.device)
            idx = None if task_index is None else task_index[start : start + SCORE_BATCH]
            if self._resident is not None:  # lazy: route first, so that the products it needs are read
                if idx is None:
                    idx = self.router.route(routing_features(self.model, chunk, self.router.cfg.feature))
                self._ensure(self.router.tasks[i] for i in torch.unique(idx).tolist())
            parts.append(score_features(self.model, self.router, chunk, self.cfg.scoring, idx).cpu())
        return ScoredBatch.cat(parts)

    def decide(self, scored: ScoredBatch) -> tuple[list[str], np.ndarray, np.ndarray]:
        """``(verdicts, unknown (B,) bool, normalized scores (B,))`` of scored images, per their product."""
        verdicts, unknown, normalized = [], np.zeros(len(scored), bool), np.zeros(len(scored))
        for i, (t, s, d) in enumerate(
            zip(scored.task_index.tolist(), scored.image_scores.tolist(), scored.distances.tolist(), strict=True)
        ):
            verdict, unknown[i], normalized[i] = decide(s, d, self.records[self.router.tasks[t]].calibration)
            verdicts.append(verdict)
        return verdicts, unknown, normalized

    def predict(self, images: Any, *, batch_size: int | None = None, max_map_side: int = MAX_MAP_SIDE) -> list[Prediction]:
        """Route, score and judge every image (see :mod:`moleflow.prediction` for the accepted inputs)."""
        return list(self.iter_predict(images, batch_size=batch_size, max_map_side=max_map_side))

    def iter_predict(
        self, images: Any, *, batch_size: int | None = None, max_map_side: int = MAX_MAP_SIDE
    ) -> Iterator[Prediction]:
        """:meth:`predict` one batch at a time, for long streams of images."""
        if not self.records:
            raise DetectorError("this model has no products yet; learn one first (moleflow learn RUN NAME=SOURCE)")
        batch_size = batch_size or self.cfg.train.batch_size
        for chunk in input_batches(images, batch_size):
            yield from self._predict_batch(chunk, max_map_side)

    def _predict_batch(self, chunk: list[tuple[np.ndarray, str]], max_map_side: int) -> list[Prediction]:
        from moleflow.scoring import anomaly_maps

        feats = self.extractor.extract([image for image, _ in chunk])
        cached = CachedFeatures(feats.patches, feats.context if self.model.scale_context is not None else None, feats.pooled)
        scored = self.score(cached)
        size = self.cfg.model.backbone.image_size
        maps = anomaly_maps(scored.patch_scores, (size, size), self.cfg.scoring.smoothing_sigma).numpy()
        out = []
        for i, (image, label) in enumerate(chunk):
            product = self.router.tasks[int(scored.task_index[i])]
            amap = resize_map(maps[i], map_shape(image.shape[:2], max_map_side))
            cal = self.records[product].calibration
            score, distance = float(scored.image_scores[i]), float(scored.distances[i])
            out.append(make_prediction(label, image.shape[:2], product, cal, score, distance, amap))
        return out

    # ------------------------------------------------------------------ lazy loading

    @property
    def lazy(self) -> bool:
        """Whether products' parts are read on first use (``Detector.load(..., lazy=True)``)."""
        return self._resident is not None

    def _ensure(self, names: Iterable[str]) -> None:
        """Lazy: read the parts of ``names`` not in memory yet, then drop the least recently used others
        beyond ``max_resident``. Eager detectors hold every product: nothing to do."""
        if self._resident is None:
            return
        wanted = list(dict.fromkeys(names))
        for name in wanted:
            if name not in self.model.tasks:
                self.model.load_task_state_dict(name, self.run.load_parts(self.cfg, self.records[name], self.base_id))
                self.model.eval()
            self._resident[name] = None
            self._resident.move_to_end(name)
        for name in list(self._resident):
            if len(self._resident) <= self.max_resident:
                break
            if name not in wanted and name not in self._staged:
                self.model.remove_task(name)
                del self._resident[name]

    def load_all(self) -> None:
        """A lazy detector reads every product's parts and becomes eager (what learning and saving need: a
        new product's initialisation may depend on the first product's parts)."""
        if self._resident is None:
            return
        for name in list(self.model.tasks):
            self.model.remove_task(name)
        self._resident = None
        for record in self.records.values():  # the router's order, as an eager load has them
            self.model.load_task_state_dict(record.name, self.run.load_parts(self.cfg, record, self.base_id))
        self.model.eval()

    # ------------------------------------------------------------------ persistence

    def _index(self) -> RunIndex:
        return RunIndex(base_id=self.base_id, tasks=list(self.records.values()), data_root=self.data_root)

    def _run_path(self) -> Path | None:
        return self.run.path if self.run is not None else None

    def commit(self, before_index: Callable[[], None] | None = None, *, write_router: bool = True) -> None:
        """Write the changes since the last commit to the run directory (see :mod:`moleflow.rundir` for the
        order that keeps it whole through a kill); ``before_index`` writes what is derived from the new
        state (results, report) just before the index; ``write_router=False`` leaves the router file to a
        later commit. Nothing to do for an unbound detector."""
        if self.run is None:
            return
        with self.run.writing():
            if self._base_dirty:
                self.run.write_base(self.model, self.cfg, self.base_id)
            for name in self._staged:
                self.run.stage(self.model, self.router, self.cfg, self.records[name], self.base_id)
            self.run.commit(self._index(), self.router, self.cfg, before_index, write_router)
        self._staged.clear()
        self._base_dirty = False

    def export(self, out_dir: str | os.PathLike[str], format: str = "onnx"):
        """Export the run this detector is bound to (as committed) for deployment without torch; returns
        a :class:`moleflow.deploy.export.ExportReport`. See :mod:`moleflow.deploy.export`."""
        if format != "onnx":
            raise DetectorError(f"unknown export format {format!r}; the one there is: onnx")
        if self.run is None or self._staged or self._base_dirty:
            raise DetectorError("export works on a saved run: bind the detector to a run directory and commit first")
        from moleflow.deploy.export import export_run

        return export_run(self.run.path, out_dir)

    def save(self, run_dir: str | os.PathLike[str] | None = None) -> RunDirectory:
        """Write the whole model to ``run_dir`` (new or empty; the detector is bound to it afterwards), or
        rewrite every file of the run it is bound to."""
        if run_dir is None and self.run is None:
            raise DetectorError("this detector is not bound to a run directory; give save(run_dir)")
        run = self.run if run_dir is None else RunDirectory(run_dir)
        if run is not self.run and not run.is_empty():
            raise RunDirectoryError(f"{run.path} already exists and is not empty; save into a new directory")
        self.load_all()
        self.run = run
        with run.writing():
            run.write_config(self.cfg)
        self._staged, self._base_dirty = set(self.records), self.base_id is not None
        self.commit()
        return run

    # ------------------------------------------------------------------ many products, across processes

    def learn_many(
        self,
        products: Sequence[tuple[str, Any]],
        *,
        parallel: Any = None,
        replace: bool = False,
        data_root: str | os.PathLike[str] | None = None,
        limits: tuple[int, int] | None = None,
        on_learned: Callable[[TaskRecord], None] | None = None,
    ) -> Any:
        """Learn ``products`` (``(name, source)`` pairs), in parallel with ``parallel=RayOptions(...)``;
        products the detector already has are skipped unless ``replace``. Each finished product is
        committed at once, without the router file, which is written once at the end (``on_learned(record)``
        commits instead, when given: then the caller writes it, ``commit()``). Returns a
        :class:`moleflow.parallel.LearnReport` (learned, skipped, failed with their messages)."""
        from moleflow.parallel import learn_many

        return learn_many(
            self, products, parallel=parallel, replace=replace, data_root=data_root, limits=limits, on_learned=on_learned
        )

    def export_state(self, products: Sequence[str] = ()) -> DetectorState:
        """The shared base and the products ``products`` as plain CPU tensors (:mod:`moleflow.portable`)."""
        for name in products:
            self._require(name)
        self._ensure(products)
        return detector_state(self.model, self.router, self.records, self.cfg, self.base_id, self.data_root, products)

    @classmethod
    def from_state(cls, state: DetectorState, **options: Any) -> Detector:
        """An unbound detector holding exactly ``state`` (``options`` as in :meth:`create`)."""
        model, router = build_model(state)
        index = RunIndex(base_id=state.base_id, tasks=[p.record for p in state.products], data_root=state.data_root)
        return cls(state.cfg, model, router, index, **options)

    def export_product(self, name: str) -> ProductState:
        """Product ``name``'s record, parts and prototype, to be :meth:`adopt`-ed by another detector."""
        record = self._require(name)
        if self.base_id is None:
            raise DetectorError("this detector has no trained base yet")
        self._ensure([name])
        return product_state(self.model, self.router, record, self.base_id)

    def adopt(self, product: ProductState, *, replace: bool = False, commit: bool = True) -> TaskRecord:
        """Add a product learned elsewhere against this detector's frozen base (a Ray task, another process);
        it is then exactly as if :meth:`learn` had learned it here. ``replace``/``commit``: as in :meth:`learn`."""
        name = check_task_name(product.name)
        if self.base_id is None or product.base_id != self.base_id:
            raise DetectorError(
                f"product {name!r} was learned against base {product.base_id!r}, not this model's {self.base_id!r}"
            )
        if name in self.records and not replace:
            raise TaskExistsError(f"product {name!r} already exists; forget it first, or pass replace=True (--replace)")
        self.load_all()
        undo = self._snapshot(name, train_base=False)
        try:
            add_product(self.model, self.router, product)
        except BaseException:
            self._restore(name, undo)
            raise
        self.records[name] = product.record
        self._staged.add(name)
        if commit:
            self.commit()
        return product.record
