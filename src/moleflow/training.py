"""The continual trainer: learns tasks one after another on cached backbone features.

The first task trains the shared base together with its own parts; every later task trains only its
own parts (LoRA A/B and biases, whitening, DIA, a per-task mixer gate), so by construction
d(loss_t)/d(base) is never applied and earlier tasks cannot change. ``train.base_policy =
"always_trainable"`` is the unfrozen baseline of the ablations (it forgets).

Levers that trade training time against fit (``train`` section, all off by default): ``patch_fraction``
trains the flow on a fresh random share of each image's patches per step (the flow scores patches
independently, so this is an unbiased estimate of the full loss's mean term at a fraction of the cost),
``steps`` sets a per-task optimizer-step budget instead of ``epochs``, and ``early_stopping`` ends a task
when the NLL of held-out normals stops improving, keeping the best epoch's parameters.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from moleflow.config import MoleFlowConfig, TrainConfig
from moleflow.features.cache import CachedFeatures
from moleflow.flow.model import FlowOutput, MoLEFlow
from moleflow.losses import logdet_penalty, patch_nll, tail_mean
from moleflow.precision import autocast
from moleflow.routing import PrototypeAccumulator, Router
from moleflow.training_log import TrainingLogger

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TaskTrainingReport:
    task: str
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    trainable_parameters: int = 0
    validation_nll: list[float] = field(default_factory=list)  # per epoch, when held-out features were given
    best_epoch: int | None = None  # early stopping: the epoch (0-based) whose parameters were kept


def build_optimizer(groups: dict[str, list[torch.nn.Parameter]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamP (default) or AdamW with one parameter group per component and its lr multiplier."""
    param_groups = [
        {"params": params, "lr": cfg.lr * cfg.lr_multipliers.get(name, 1.0), "name": name} for name, params in groups.items()
    ]
    if cfg.optimizer == "adamp":
        from adamp import AdamP

        return AdamP(
            param_groups,
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            delta=cfg.adamp_delta,
            wd_ratio=cfg.adamp_wd_ratio,
        )
    if cfg.optimizer == "adamw":
        # the fused kernel (one pass over each parameter's state instead of torch's multi-tensor loop) exists for
        # CPU and CUDA tensors; same update up to float32 rounding
        devices = {p.device.type for params in groups.values() for p in params}
        fused = bool(devices) and devices <= {"cpu", "cuda"}
        return torch.optim.AdamW(
            param_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused or None
        )
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use 'adamp' or 'adamw'")


def task_epochs(cfg: TrainConfig, num_images: int) -> int:
    """Epochs for a task of ``num_images``: ``cfg.epochs``, or with ``cfg.steps`` the epochs closest to that
    many optimizer steps (``ceil(num_images / batch_size)`` per epoch), at least one."""
    if cfg.steps is None:
        return cfg.epochs
    per_epoch = max(1, math.ceil(num_images / cfg.batch_size))
    return max(1, round(cfg.steps / per_epoch))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, epochs: int | None = None
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule over ``E = epochs`` (default ``cfg.epochs``): ``lr(e) = lr0 * 0.5 * (1 + cos(pi * e / E))``
    (cosine) or constant."""
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs or cfg.epochs))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def routing_features(model: MoLEFlow, batch: CachedFeatures, feature: str) -> torch.Tensor:
    """Routing features: ``(B, G)`` per image, or ``(B, H * W, G)`` patches for ``patch_gaussian``.

    ``patch_mean``: mean over the grid of ``F0 + PE`` (v5); ``patch_moments``: ``[mean, std]`` over the grid
    of ``F0`` per channel, ``(B, 2 D)`` (without the encoding, which would add its own spread over positions;
    its mean is the same constant for every image, so distances do not change); ``backbone_pooled``: the backbone's
    final-layer image feature (outline); ``patch_gaussian``: the patches ``F0`` themselves (the router
    summarises them; a prototype accumulates every patch). None depends on learned parameters.
    """
    if feature == "backbone_pooled":
        return batch.pooled
    if feature == "patch_gaussian":
        return batch.patches.flatten(1, 2)
    patches = batch.patches
    if feature == "patch_moments":
        return patch_moments(patches)
    if model.cfg.positional_encoding:
        patches = patches + model.positional(patches.shape[1], patches.shape[2], patches)
    return patches.mean(dim=(1, 2))


def router_dim(cfg: MoleFlowConfig, pooled_dim: int) -> int:
    """G, the width of one image's routing feature (``patch_gaussian``: of one patch), given the backbone's
    final-layer width ``pooled_dim`` (only ``backbone_pooled`` uses it)."""
    if cfg.router.feature == "backbone_pooled":
        return pooled_dim
    if cfg.router.feature == "patch_moments":
        return 2 * cfg.model.backbone.embed_dim
    return cfg.model.backbone.embed_dim


def patch_moments(patches: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, D)`` -> ``(B, 2 D)``: per-channel mean, then per-channel standard deviation (unbiased)
    over the grid, computed in float32 at least (a bf16 variance loses the small channels). Plain
    operations rather than ``torch.std_mean``, so that the ONNX routing graph computes the same."""
    x = patches.flatten(1, 2)
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    mean = x.mean(dim=1)
    std = (x - mean[:, None]).pow(2).sum(dim=1).div(max(1, x.shape[1] - 1)).sqrt()
    return torch.cat([mean, std], dim=1)


def sample_patches(x: torch.Tensor, fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x (B, H, W, D)`` -> ``(B, 1, K, D)``: ``K = ceil(fraction * H * W)`` distinct patches per image,
    drawn uniformly and independently for every image (``fraction >= 1``: ``x`` unchanged)."""
    b, h, w, d = x.shape
    if fraction >= 1.0:
        return x
    k = max(1, math.ceil(fraction * h * w))
    order = torch.rand(b, h * w, generator=generator).argsort(dim=1)[:, :k].to(x.device)
    return x.reshape(b, h * w, d).gather(1, order[..., None].expand(b, k, d)).reshape(b, 1, k, d)


def flow_on_patch_subset(
    model: MoLEFlow, batch: CachedFeatures, task: str, fraction: float, generator: torch.Generator | None = None
) -> FlowOutput:
    """``model(batch.patches, task, batch.context)`` on a random share of the patches: the grid-wide steps
    (positional encoding, scale context, whitening, spatial mixer) see the whole grid, the flow and the DIA,
    which act on each patch alone, only the sampled ``(B, 1, K, D)`` (``fraction >= 1``: the plain forward,
    ``generator`` untouched)."""
    if fraction >= 1.0:
        return model(batch.patches, task, batch.context)
    f3 = sample_patches(model.adapt(model.prepare(batch.patches, batch.context), task), fraction, generator)
    z0, logdet = model.flow(f3, task)
    if model.cfg.dia is None:
        return FlowOutput(z0, logdet, z0)
    z, dia_logdet = model.dia[task](z0)
    return FlowOutput(z, logdet + dia_logdet, z0)


def product_seed(seed: int, task: str) -> int:
    """A seed for ``task``'s parts from the run seed and the task's name (stable across processes)."""
    digest = int(hashlib.sha256(task.encode()).hexdigest()[:8], 16)
    return (seed * 1_000_003 + digest) % 2**31


class ContinualTrainer:
    def __init__(self, model: MoLEFlow, router: Router, cfg: MoleFlowConfig, device: torch.device | str = "cpu"):
        self.model, self.router, self.cfg = model, router, cfg
        self.device = torch.device(device)

    def objective(
        self,
        batch: CachedFeatures,
        task: str,
        *,
        trains_base: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one batch of ``task``: tail-aware NLL + lambda_logdet * logdet^2 + whitening reg,
        on the share ``train.patch_fraction`` of each image's patches (drawn from ``generator``).

        Returns the loss and its parts (detached scalars: ``nll`` mean, ``tail`` mean of the top patches,
        ``logdet_penalty``, ``whitening_reg``; the last two unweighted). ``trains_base``: whether this task
        trains the shared base (its whitening is then pulled towards identity under
        ``identity_reg_tasks = "first"``); ``None``: it is the model's first task.
        """
        lcfg, model = self.cfg.loss, self.model
        with autocast(batch.patches.device, self.cfg.train.precision):  # the head's matmuls; z, logdet float32
            out = flow_on_patch_subset(model, batch, task, self.cfg.train.patch_fraction, generator)
        nll = patch_nll(out.z, out.logdet)
        mean = nll.mean()
        parts = {"nll": mean.detach()}
        loss = mean
        if lcfg.tail_weight:
            tail = tail_mean(nll, lcfg.tail_top_k, lcfg.tail_scope)
            loss = (1.0 - lcfg.tail_weight) * mean + lcfg.tail_weight * tail
            parts["tail"] = tail.detach()
        if lcfg.logdet_weight:
            penalty = logdet_penalty(out.logdet)
            loss = loss + lcfg.logdet_weight * penalty
            parts["logdet_penalty"] = penalty.detach()
        wcfg = model.cfg.whitening
        if trains_base is None:
            trains_base = task == model.tasks[0]
        if wcfg is not None and wcfg.identity_reg_weight and (wcfg.identity_reg_tasks == "all" or trains_base):
            reg = model.whitening[task].identity_penalty()
            loss = loss + wcfg.identity_reg_weight * reg
            parts["whitening_reg"] = reg.detach()
        return loss, parts

    def learn_task(
        self,
        task: str,
        features: CachedFeatures,
        *,
        train_base: bool | None = None,
        seed: int | None = None,
        progress: bool = True,
        loggers: Sequence[TrainingLogger] = (),
        validation: CachedFeatures | None = None,
    ) -> TaskTrainingReport:
        """Add ``task`` to the model, train its parts on ``features``, and give it a router prototype.

        ``train_base``: the shared base trains too; ``None``: when the model has no task yet, or always
        under ``train.base_policy = "always_trainable"`` (the unfrozen baseline).
        ``seed``: initialises the task's parts and orders its batches; ``None``: derived from the run seed
        and the product's name (:func:`product_seed`), so a product's parameters do not depend on which
        products came before it. ``loggers`` receive one record per epoch (moleflow.training_log).
        ``validation``: held-out normals of ``task`` (never trained on); their mean patch NLL is recorded
        after every epoch (``val_nll`` in the epoch record) and drives ``train.early_stopping`` when set.
        """
        tcfg = self.cfg.train
        start = time.perf_counter()
        if train_base is None:
            train_base = not self.model.tasks or tcfg.base_policy == "always_trainable"
        seed = product_seed(tcfg.seed, task) if seed is None else seed
        torch.manual_seed(seed)  # initialisation of the new task's parts
        self.model.add_task(task)
        self.model.set_trainable(task, train_base)
        groups = self.model.parameter_groups(task, train_base)
        trainable = [p for ps in groups.values() for p in ps]
        optimizer, report = build_optimizer(groups, tcfg), TaskTrainingReport(task)
        epochs = task_epochs(tcfg, len(features))
        scheduler = build_scheduler(optimizer, tcfg, epochs)
        generator = torch.Generator().manual_seed(seed + 7919)  # batch order, then the patch subsets
        report.trainable_parameters = sum(p.numel() for p in trainable)
        stopper = _EarlyStopper(tcfg, trainable) if tcfg.early_stopping is not None and validation is not None else None
        if tcfg.early_stopping is not None and validation is None:
            log.warning("train.early_stopping is set but no held-out features were given: all %d epochs run", epochs)
        log.info(
            "learning task %r (%d images, %d trainable parameters, base %s)",
            task,
            len(features),
            report.trainable_parameters,
            "trained" if train_base else "frozen",
        )
        bar = tqdm(range(epochs), desc=f"train {task}", disable=not progress, leave=False)
        for epoch in bar:
            epoch_start, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
            self.model.train()  # again every epoch: the validation pass below switches to eval
            means = self._epoch(task, features, optimizer, trainable, generator, epoch, train_base)
            scheduler.step()
            report.epoch_losses.append(means["loss"])
            bar.set_postfix(loss=f"{report.epoch_losses[-1]:.3f}")
            record = {"task": task, "epoch": epoch + 1, **means, "lr": lr}
            stop = False
            if validation is not None:
                report.validation_nll.append(self.validation_nll(task, validation))
                record["val_nll"] = report.validation_nll[-1]
                stop = stopper is not None and stopper.stop(epoch, report.validation_nll[-1])
            record["seconds"] = time.perf_counter() - epoch_start
            for logger in loggers:
                logger.log_epoch(record)
            if stop:
                break
        if stopper is not None:
            report.best_epoch = stopper.restore()
        self.model.set_trainable(None, train_base=False)
        self.model.eval()
        self.add_prototype(task, features)
        report.seconds = time.perf_counter() - start
        log.info(
            "task %r learned in %.1fs (%d epochs), final loss %.4f",
            task,
            report.seconds,
            len(report.epoch_losses),
            report.epoch_losses[-1] if report.epoch_losses else math.nan,
        )
        return report

    def _epoch(
        self,
        task: str,
        features: CachedFeatures,
        optimizer: torch.optim.Optimizer,
        trainable: list[torch.nn.Parameter],
        generator: torch.Generator,
        epoch: int,
        train_base: bool,
    ) -> dict[str, float]:
        """One pass over ``features`` in a random order; the image-weighted means of the loss and its parts."""
        tcfg = self.cfg.train
        sums: dict[str, torch.Tensor] = {}
        count = 0
        for batch in features.batches(tcfg.batch_size, shuffle=True, generator=generator):
            batch = batch.to(self.device)
            loss, parts = self.objective(batch, task, trains_base=train_base, generator=generator)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"task {task!r}, epoch {epoch}: loss is {loss.item()}; lower train.lr or check the features"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, tcfg.grad_clip)
            optimizer.step()
            for key, value in {"loss": loss.detach(), **parts}.items():  # summed on the device, read once
                sums[key] = sums.get(key, 0.0) + value * len(batch)
            count += len(batch)
        return {k: float(v) / max(1, count) for k, v in sums.items()}

    @torch.no_grad()
    def validation_nll(self, task: str, features: CachedFeatures, batch_size: int = 64) -> float:
        """Mean patch NLL (nats) of ``features`` under ``task``: every patch, eval mode."""
        self.model.eval()
        total, count = 0.0, 0
        for batch in features.batches(batch_size):
            batch = batch.to(self.device)
            out = self.model(batch.patches, task, batch.context)
            nll = patch_nll(out.z, out.logdet)
            total, count = total + float(nll.sum()), count + nll.numel()
        return total / max(1, count)

    @torch.no_grad()
    def add_prototype(self, task: str, features: CachedFeatures, batch_size: int = 64) -> None:
        """Stream the task's routing features into its prototype (mean, regularised precision)."""
        acc = PrototypeAccumulator()
        for batch in features.batches(batch_size):
            acc.update(routing_features(self.model, batch.to(self.device), self.router.cfg.feature).cpu())
        mean, precision = acc.finalize(self.router.cfg.covariance_reg, self.router.cfg.shrinkage)
        self.router.add(task, mean, precision)


class _EarlyStopper:
    """Keeps a copy of the trainable parameters at the best held-out NLL; says when to stop."""

    def __init__(self, cfg: TrainConfig, params: list[torch.nn.Parameter]) -> None:
        assert cfg.early_stopping is not None
        self.cfg, self.params = cfg.early_stopping, params
        self.best, self.best_epoch = math.inf, -1
        self.saved: list[torch.Tensor] = []

    def stop(self, epoch: int, value: float) -> bool:
        """Record epoch ``epoch``'s held-out NLL; True when training should end now."""
        if value < self.best - self.cfg.min_delta:
            self.best, self.best_epoch = value, epoch
            self.saved = [p.detach().clone() for p in self.params]
        return epoch + 1 >= self.cfg.min_epochs and epoch - self.best_epoch >= self.cfg.patience

    @torch.no_grad()
    def restore(self) -> int | None:
        """Put the best epoch's parameters back; returns that epoch (None if no epoch was recorded)."""
        for param, value in zip(self.params, self.saved, strict=False):
            param.copy_(value)
        return self.best_epoch if self.saved else None
