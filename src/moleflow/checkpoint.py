"""The checkpoint files of a run: ``checkpoints/base.safetensors`` (the shared base),
``tasks/<task>.safetensors`` (one product: its parts and its router prototype) and ``router.safetensors``
(every product's prototype in one file, for tools that only route), so adding or removing a product never
rewrites another product's file.

Every file carries metadata: the format, the moleflow version, a fingerprint of the model config, and the
``base_id`` of the base it belongs to (a random id drawn when the base is first trained): a product file
or router from another run, even one with the same config, is refused instead of silently scoring with
parts that were never trained together. A product file also carries its ``parts_id``, drawn each time the
product is (re)learned, which the run's index names; so a file left by an interrupted command is told
apart from the committed one (see :mod:`moleflow.rundir`). Writes are atomic (:mod:`moleflow.atomic`).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moleflow import __version__
from moleflow.atomic import atomic_write
from moleflow.config import LEGACY_BACKBONE, MoleFlowConfig, to_dict
from moleflow.flow.model import MoLEFlow
from moleflow.routing import Router

FORMAT = "moleflow-checkpoint-2"
BASE_FILE = "base.safetensors"
ROUTER_FILE = "router.safetensors"
TASKS_DIR = "tasks"
PROTOTYPE_MEAN, PROTOTYPE_PRECISION = "prototype.mean", "prototype.precision"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, from another run, or was written with another model config."""


def new_id() -> str:
    return uuid.uuid4().hex


def model_fingerprint(cfg: MoleFlowConfig) -> str:
    """Hash of everything that shapes the model's tensors (model section + router).

    Left out, so that runs written before these keys existed still load: ``router.covariance`` (it decides
    the route among the stored prototypes, it shapes none of them), and the backbone's ``grid``,
    ``local_aggregation`` and ``precision`` while they hold the values every earlier run had (coarsest, 3, fp32).
    """
    model, router = to_dict(cfg.model), to_dict(cfg.router)
    router.pop("covariance", None)
    backbone = model["backbone"]
    for key, legacy in LEGACY_BACKBONE.items():
        if backbone.get(key) == legacy:
            backbone.pop(key)
    relevant = {"model": model, "router": router}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def task_file(directory: Path, task: str, parts_id: str | None = None) -> Path:
    """``tasks/<task>.safetensors``, or the staged ``tasks/<task>.<parts_id>.safetensors``."""
    stem = task if parts_id is None else f"{task}.{parts_id}"
    return Path(directory) / TASKS_DIR / f"{stem}.safetensors"


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def read_file(path: Path, fingerprint: str, base_id: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a checkpoint file, checked against the config fingerprint and base id."""
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({e}); restore it from a backup") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a moleflow {FORMAT} file (format {meta.get('format')!r})")
    if meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{path} was written with another model config (fingerprint {meta.get('fingerprint')}, this config "
            f"{fingerprint}); load it with the run's own config.yaml"
        )
    if base_id is not None and meta.get("base_id") != base_id:
        raise CheckpointError(
            f"{path} belongs to another run (base id {meta.get('base_id')!r}, this run's base {base_id!r}): "
            "its parts were not trained against this run's base; restore the run's own file"
        )
    return tensors, meta


def _meta(cfg: MoleFlowConfig, base_id: str, **extra: str) -> dict[str, str]:
    return {"format": FORMAT, "moleflow": __version__, "fingerprint": model_fingerprint(cfg), "base_id": base_id, **extra}


def save_base(model: MoLEFlow, cfg: MoleFlowConfig, directory: Path, base_id: str) -> Path:
    context_dim = model.scale_context.proj.in_features if model.scale_context is not None else 0
    return _write(Path(directory) / BASE_FILE, model.base_state_dict(), _meta(cfg, base_id, context_dim=str(context_dim)))


def save_task(
    model: MoLEFlow, router: Router, cfg: MoleFlowConfig, task: str, path: Path, base_id: str, parts_id: str
) -> Path:
    """One product: its parts (task-neutral keys) and its router prototype, in one file at ``path``."""
    mean, precision = router.prototype(task)
    tensors = {**model.task_state_dict(task), PROTOTYPE_MEAN: mean, PROTOTYPE_PRECISION: precision}
    return _write(Path(path), tensors, _meta(cfg, base_id, task=task, parts_id=parts_id))


def save_router(router: Router, cfg: MoleFlowConfig, directory: Path, base_id: str, parts_ids: Sequence[str]) -> Path:
    """All prototypes, in the router's order; the task names and their parts ids are in the metadata."""
    meta = _meta(cfg, base_id, tasks=json.dumps(router.tasks), parts_ids=json.dumps(list(parts_ids)))
    return _write(Path(directory) / ROUTER_FILE, router.state_dict(), meta)


@dataclass(frozen=True)
class TaskFile:
    """Where to read product ``name``: ``path``, which must hold ``parts_id`` (None: any)."""

    name: str
    path: Path
    parts_id: str | None = None


def load_model(
    cfg: MoleFlowConfig,
    directory: Path,
    tasks: Sequence[TaskFile],
    base_id: str | None = None,
    parts: bool = True,
) -> tuple[MoLEFlow, Router]:
    """The model and router of ``tasks`` (in order) from the checkpoints in ``directory``.

    Prototypes come from ``router.safetensors`` when it lists exactly these parts ids, else from each
    product's own file. ``base_id``: refuse files of another base (``None``: the base file's own id).
    ``parts=False``: the model gets the base only (products' parts are read later, :func:`load_parts`);
    product files are then opened only for prototypes the router file lacks.
    """
    directory = Path(directory)
    fp = model_fingerprint(cfg)
    base, meta = read_file(directory / BASE_FILE, fp, base_id)
    base_id = meta.get("base_id", "") if base_id is None else base_id
    model = MoLEFlow(cfg.model, context_dim=int(meta.get("context_dim", "0")) or None)
    differing = set(model.base_state_dict()) ^ set(base)
    if differing:
        raise CheckpointError(f"base checkpoint does not match this model: differing keys {sorted(differing)[:5]}")
    model.load_state_dict(base, strict=False)
    stored = _router_rows(directory, fp, base_id)
    means, precisions = [], []
    for entry in tasks:
        row = None if parts or entry.parts_id is None else stored.get((entry.name, entry.parts_id))
        if row is None:
            state, parts_id, prototype = _read_task(entry, fp, base_id)
            row = stored.get((entry.name, parts_id), prototype)
            if parts:
                try:
                    model.load_task_state_dict(entry.name, state)
                except ValueError as e:
                    raise CheckpointError(f"{entry.path}: {e}") from e
        means.append(row[0].to(torch.float64))
        precisions.append(row[1].to(torch.float64))
    router = Router(cfg.router)
    if tasks:  # stacked once: adding prototypes one by one copies the whole table per product
        router.extend([t.name for t in tasks], torch.stack(means), torch.stack(precisions))
    model.eval()
    return model, router


def _read_task(entry: TaskFile, fp: str, base_id: str):
    """``(parts, parts_id, (mean, precision))`` of one product file, checked to hold ``entry``."""
    state, task_meta = read_file(entry.path, fp, base_id)
    if task_meta.get("task") != entry.name or (entry.parts_id is not None and task_meta.get("parts_id") != entry.parts_id):
        raise CheckpointError(
            f"{entry.path} holds {task_meta.get('task')!r} (parts {task_meta.get('parts_id')}), not {entry.name!r} "
            f"(parts {entry.parts_id}); restore the run's own file"
        )
    mean, precision = state.pop(PROTOTYPE_MEAN, None), state.pop(PROTOTYPE_PRECISION, None)
    if mean is None or precision is None:
        raise CheckpointError(f"{entry.path} has no router prototype")
    return state, task_meta.get("parts_id"), (mean, precision)


def load_parts(cfg: MoleFlowConfig, entry: TaskFile, base_id: str) -> dict[str, torch.Tensor]:
    """The parts (task-neutral keys) of one product file, checked like :func:`load_model` checks it."""
    return _read_task(entry, model_fingerprint(cfg), base_id)[0]


def _router_rows(directory: Path, fp: str, base_id: str) -> Mapping[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """``{(task, parts_id): (mean, precision)}`` of the router file; empty if it is missing or unreadable."""
    path = directory / ROUTER_FILE
    if not path.is_file():
        return {}
    try:
        tensors, meta = read_file(path, fp, base_id)
    except CheckpointError:
        return {}  # it is derived from the product files: fall back to them
    names, ids = json.loads(meta.get("tasks", "[]")), json.loads(meta.get("parts_ids", "[]"))
    return {
        (n, p): (tensors["means"][i], tensors["precisions"][i]) for i, (n, p) in enumerate(zip(names, ids, strict=False))
    }


def save_all(model: MoLEFlow, router: Router, cfg: MoleFlowConfig, directory: Path, base_id: str) -> list[TaskFile]:
    """Every file of ``model`` under ``directory`` (parts id = the task name); what :func:`load_model` reads."""
    save_base(model, cfg, directory, base_id)
    files = [TaskFile(t, task_file(directory, t), t) for t in model.tasks]
    for f in files:
        save_task(model, router, cfg, f.name, f.path, base_id, f.parts_id)
    save_router(router, cfg, directory, base_id, [f.parts_id for f in files])
    return files


def load_all(cfg: MoleFlowConfig, directory: Path, tasks: Sequence[str], base_id: str | None = None):
    """:func:`load_model` of ``tasks`` stored at their plain file names."""
    return load_model(cfg, directory, [TaskFile(t, task_file(directory, t)) for t in tasks], base_id)
