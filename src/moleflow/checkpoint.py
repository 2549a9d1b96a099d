"""Checkpoints in the run directory: one safetensors file for the shared base, one for the router,
one per task (``checkpoints/tasks/<task>.safetensors``), so adding or removing a task never rewrites
another task's file. Every file carries metadata: the moleflow version, a fingerprint of the model
config, and (task files) the task name. Loading files made with another config fails with a message
saying what differs. All writes are atomic (temporary file + ``os.replace``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moleflow import __version__
from moleflow.config import MoleFlowConfig, RouterConfig, to_dict
from moleflow.flow.model import MoLEFlow
from moleflow.routing import Router

FORMAT = "moleflow-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or was written with another model config."""


def model_fingerprint(cfg: MoleFlowConfig) -> str:
    """Hash of everything that shapes the model's tensors (model section + router feature/metric)."""
    relevant = {"model": to_dict(cfg.model), "router": to_dict(cfg.router)}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: Path, fingerprint: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a moleflow checkpoint (format {meta.get('format')!r})")
    if meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{path} was written with another model config (fingerprint {meta.get('fingerprint')}, this config "
            f"{fingerprint}); load it with the run's own config.yaml"
        )
    return tensors, meta


def _meta(cfg: MoleFlowConfig, **extra: str) -> dict[str, str]:
    return {"format": FORMAT, "moleflow": __version__, "fingerprint": model_fingerprint(cfg), **extra}


def save_base(model: MoLEFlow, cfg: MoleFlowConfig, directory: Path) -> None:
    context_dim = model.scale_context.proj.in_features if model.scale_context is not None else 0
    meta = _meta(cfg, tasks=json.dumps(model.tasks), context_dim=str(context_dim))
    atomic_save(model.base_state_dict(), directory / "base.safetensors", meta)


def save_task(model: MoLEFlow, cfg: MoleFlowConfig, task: str, directory: Path, threshold: float | None = None) -> None:
    """One task's tensors; ``threshold`` is its image-score decision threshold (kept in the metadata)."""
    extra = {"task": task} if threshold is None else {"task": task, "threshold": repr(float(threshold))}
    atomic_save(model.task_state_dict(task), directory / "tasks" / f"{task}.safetensors", _meta(cfg, **extra))


def load_thresholds(cfg: MoleFlowConfig, directory: Path, tasks: list[str]) -> dict[str, float | None]:
    """Decision thresholds stored with each task (``None`` where a task file has none)."""
    fp = model_fingerprint(cfg)
    out: dict[str, float | None] = {}
    for task in tasks:
        _, meta = _read(directory / "tasks" / f"{task}.safetensors", fp)
        out[task] = float(meta["threshold"]) if "threshold" in meta else None
    return out


def save_router(router: Router, cfg: MoleFlowConfig, directory: Path) -> None:
    meta = _meta(cfg, tasks=json.dumps(router.tasks))
    atomic_save(router.state_dict(), directory / "router.safetensors", meta)


def save_all(model: MoLEFlow, router: Router, cfg: MoleFlowConfig, directory: Path) -> None:
    save_base(model, cfg, directory)
    for task in model.tasks:
        save_task(model, cfg, task, directory)
    save_router(router, cfg, directory)


def load_all(cfg: MoleFlowConfig, directory: Path, context_dim: int | None = None) -> tuple[MoLEFlow, Router]:
    """Rebuild the model and router from ``directory`` (tasks in the order the router learned them)."""
    fp = model_fingerprint(cfg)
    base, meta = _read(directory / "base.safetensors", fp)
    model = MoLEFlow(cfg.model, context_dim=context_dim or int(meta.get("context_dim", "0")) or None)
    missing = set(model.base_state_dict()) ^ set(base)
    if missing:
        raise CheckpointError(f"base checkpoint does not match this model: differing keys {sorted(missing)[:5]}")
    model.load_state_dict(base, strict=False)
    router_tensors, router_meta = _read(directory / "router.safetensors", fp)
    tasks = json.loads(router_meta["tasks"])
    for task in tasks:
        state, task_meta = _read(directory / "tasks" / f"{task}.safetensors", fp)
        if task_meta.get("task") != task:
            raise CheckpointError(f"tasks/{task}.safetensors holds task {task_meta.get('task')!r}")
        model.load_task_state_dict(task, state)
    router = Router(RouterConfig(**to_dict(cfg.router)))
    for i, task in enumerate(tasks):
        router.add(task, router_tensors["means"][i], router_tensors["precisions"][i])
    model.eval()
    return model, router
