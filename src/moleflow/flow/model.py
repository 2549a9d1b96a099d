"""The MoLE-Flow density model: patch features of one task -> latents and log-determinants.

Data flow (DESIGN.md; outline 3.1.2), all tensors channel-last ``(B, H, W, D)``::

    F0 --+PE--> F1 --+scale ctx--> --whitening_t--> F2 --mixer--> F3 --flow(LoRA_t)--> z0 --DIA_t--> z

Ownership: the *base* (shared coupling weights, global affines, scale context, mixer convolution and
a shared gate) is trained with the first task and frozen afterwards; every *task part* (LoRA A/B and
task biases in every subnet linear, whitening, DIA, a per-task mixer gate) lives in a container keyed
by task name. This module is pure: it knows nothing of optimisers, epochs or data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moleflow.config import ModelConfig
from moleflow.features.positional import positional_encoding_2d
from moleflow.flow.adapters import ScaleContext, SpatialContextMixer, WhiteningAdapter
from moleflow.flow.coupling import AllInOneCoupling, CouplingFlow, random_permutation
from moleflow.flow.dia import DeepInvertibleAdapter
from moleflow.flow.lora import LoRALinear
from moleflow.flow.subnets import subnet_factory
from moleflow.names import check_task_name

# names of the containers whose entries are keyed by task (see task_state_dict)
TASK_CONTAINERS = ("lora_A", "lora_B", "task_bias", "gates", "whitening", "dia")
TASK_PLACEHOLDER = "{task}"


@dataclass
class FlowOutput:
    z: torch.Tensor  # (B, H, W, D) final latent, ~N(0, I) for normal patches
    logdet: torch.Tensor  # (B, H, W) log|det J| of flow + DIA
    z_base: torch.Tensor  # (B, H, W, D) latent before the DIA


class MoLEFlow(nn.Module):
    def __init__(self, cfg: ModelConfig, context_dim: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.dim = dim = cfg.backbone.embed_dim
        if cfg.scale_context is not None and not context_dim:
            raise ValueError("the scale context needs the backbone's multi-layer maps (context_dim)")
        self.scale_context = ScaleContext(context_dim, dim, cfg.scale_context) if cfg.scale_context else None
        self.mixer = SpatialContextMixer(dim, cfg.spatial_mixer) if cfg.spatial_mixer else None
        build_subnet = subnet_factory(cfg.flow)
        self.flow = CouplingFlow(
            [
                AllInOneCoupling(
                    dim,
                    build_subnet,
                    clamp=cfg.flow.clamp,
                    permutation=random_permutation(dim, cfg.flow.permutation_seed + k),
                    global_affine_init=cfg.flow.global_affine_init,
                )
                for k in range(cfg.flow.coupling_layers)
            ]
        )
        self.whitening = nn.ModuleDict()
        self.dia = nn.ModuleDict()
        self.tasks: list[str] = []
        self._pe_cache: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------ tasks

    def _lora_layers(self) -> list[LoRALinear]:
        return [m for m in self.modules() if isinstance(m, LoRALinear)]

    def add_task(self, task: str) -> None:
        """Create ``task``'s parts. A new task computes exactly the base flow (B = 0, DIA = identity)."""
        check_task_name(task)
        if task in self.tasks:
            raise ValueError(f"task {task!r} already exists; tasks: {self.tasks}")
        for layer in self._lora_layers():
            layer.add_task(task)
        if self.mixer is not None:
            self.mixer.add_task(task)
        if self.cfg.whitening is not None:
            self.whitening[task] = self._new_whitening().to(**self._placement())
        if self.cfg.dia is not None:
            self.dia[task] = DeepInvertibleAdapter(self.dim, self.cfg.dia).to(**self._placement())
        self.tasks.append(task)

    def _new_whitening(self) -> WhiteningAdapter:
        wcfg = self.cfg.whitening
        if not self.tasks:
            return WhiteningAdapter.near_identity(self.dim, wcfg)
        if wcfg.later_task_init == "from_first_task":
            first = self.whitening[self.tasks[0]]
            return WhiteningAdapter(self.dim, wcfg, first.gamma_raw, first.beta_raw)
        return WhiteningAdapter.midpoint(self.dim, wcfg)

    def remove_task(self, task: str) -> None:
        """Delete a task's parts; other tasks are untouched. The first task's base stays."""
        self._require(task)
        for layer in self._lora_layers():
            layer.remove_task(task)
        if self.mixer is not None:
            self.mixer.remove_task(task)
        for container in (self.whitening, self.dia):
            if task in container:
                del container[task]
        self.tasks.remove(task)

    def _require(self, task: str) -> None:
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; learned tasks: {self.tasks}")

    def _placement(self) -> dict[str, object]:
        """Device and dtype of the model, for parts created after it was moved."""
        ref = self.flow.blocks[0].global_scale
        return {"device": ref.device, "dtype": ref.dtype}

    # ------------------------------------------------------------------ forward

    def positional(self, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        key = (height, width, like.device, like.dtype)
        if key not in self._pe_cache:
            with torch.inference_mode(False):  # a plain tensor, usable for training after inference
                self._pe_cache[key] = positional_encoding_2d(height, width, self.dim, device=like.device, dtype=like.dtype)
        return self._pe_cache[key]

    def prepare(self, patches: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Task-independent part: ``F0 (B, H, W, D)`` -> ``F1`` (+ positional encoding, + scale context)."""
        if patches.ndim != 4 or patches.shape[-1] != self.dim:
            raise ValueError(f"expected patch features (B, H, W, {self.dim}), got {tuple(patches.shape)}")
        x = patches
        if self.cfg.positional_encoding:
            x = x + self.positional(x.shape[1], x.shape[2], x)
        if self.scale_context is not None:
            if context is None:
                raise ValueError("this model has a scale context: pass the backbone's context maps")
            x = x + self.scale_context(context)
        return x

    def adapt(self, f1: torch.Tensor, task: str) -> torch.Tensor:
        """Task-specific input adaptation ``F1 -> F3`` (whitening, then spatial mixing)."""
        x = self.whitening[task](f1) if self.cfg.whitening is not None else f1
        return self.mixer(x, task) if self.mixer is not None else x

    def forward(self, patches: torch.Tensor, task: str, context: torch.Tensor | None = None) -> FlowOutput:
        """``patches (B, H, W, D)`` of images of one ``task`` -> :class:`FlowOutput`."""
        self._require(task)
        f3 = self.adapt(self.prepare(patches, context), task)
        z0, logdet = self.flow(f3, task)
        if self.cfg.dia is None:
            return FlowOutput(z0, logdet, z0)
        z, dia_logdet = self.dia[task](z0)
        return FlowOutput(z, logdet + dia_logdet, z0)

    def inverse(self, z: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Invert flow and DIA: ``z (B, H, W, D) -> (F3, -log|det J| (B, H, W))``."""
        self._require(task)
        logdet = z.new_zeros(z.shape[:-1])
        if self.cfg.dia is not None:
            z, logdet = self.dia[task].inverse(z)
        f3, flow_logdet = self.flow.inverse(z, task)
        return f3, logdet + flow_logdet

    # ------------------------------------------------------------------ ownership of parameters

    def task_parameter_names(self, task: str) -> set[str]:
        return {name for name, _ in self.named_parameters() if _task_of(name) == task}

    def base_parameter_names(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if _task_of(name) is None}

    def parameter_groups(self, task: str, train_base: bool) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters for learning ``task``, grouped for per-group learning rates.

        Groups: ``base`` (shared flow, scale context), ``mixer`` (shared mixer or ``task``'s gate),
        ``lora`` (A, B, task biases), ``whitening``, ``dia``. Base groups appear only if ``train_base``.
        """
        self._require(task)
        groups: dict[str, list[nn.Parameter]] = {g: [] for g in ("base", "mixer", "lora", "whitening", "dia")}
        for name, param in self.named_parameters():
            owner = _task_of(name)
            if owner is None and train_base:
                groups["mixer" if name.startswith("mixer.") else "base"].append(param)
            elif owner == task:
                root = name.split(".")[0]
                group = root if root in ("whitening", "dia", "mixer") else "lora"
                groups[group].append(param)
        return {g: ps for g, ps in groups.items() if ps}

    def set_trainable(self, task: str | None, train_base: bool) -> None:
        """Make exactly ``task``'s parts (and the base if ``train_base``) require gradients."""
        trainable = set()
        if task is not None:
            trainable = {id(p) for ps in self.parameter_groups(task, train_base).values() for p in ps}
        for param in self.parameters():
            param.requires_grad_(id(param) in trainable)

    def parameter_counts(self) -> dict[str, object]:
        """``{"base": n, "per_task": {task: n}}`` counted from the live tensors."""
        base = sum(p.numel() for n, p in self.named_parameters() if _task_of(n) is None)
        per_task = {t: 0 for t in self.tasks}
        for name, p in self.named_parameters():
            owner = _task_of(name)
            if owner is not None:
                per_task[owner] += p.numel()
        return {"base": base, "per_task": per_task}

    # ------------------------------------------------------------------ state split for checkpoints

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if _task_of(k) is None}

    def task_state_dict(self, task: str) -> dict[str, torch.Tensor]:
        """``task``'s tensors with the task name replaced by ``{task}`` (task-neutral keys)."""
        self._require(task)
        return {_neutral(k): v for k, v in self.state_dict().items() if _task_of(k) == task}

    def load_task_state_dict(self, task: str, state: dict[str, torch.Tensor]) -> None:
        """Create ``task`` if needed and load its tensors; keys and shapes must match exactly.

        On a mismatch nothing changes: a task created here is removed again before the error.
        """
        created = task not in self.tasks
        if created:
            self.add_task(task)
        try:
            expected = self.task_state_dict(task)
            missing, unexpected = set(expected) - set(state), set(state) - set(expected)
            if missing or unexpected:
                raise ValueError(
                    f"task {task!r}: tensors do not match this model (missing {sorted(missing)[:5]}, "
                    f"unexpected {sorted(unexpected)[:5]}); was it saved with another config?"
                )
            for key, value in state.items():
                if expected[key].shape != value.shape:
                    raise ValueError(
                        f"{key.replace(TASK_PLACEHOLDER, task)}: shape {tuple(value.shape)} in file, "
                        f"{tuple(expected[key].shape)} here; was it saved with another config?"
                    )
        except ValueError:
            if created:
                self.remove_task(task)
            raise
        own = dict(self.named_parameters())
        with torch.no_grad():
            for key, value in state.items():
                own[key.replace(TASK_PLACEHOLDER, task)].copy_(value)


def _task_of(name: str) -> str | None:
    """The task owning state key ``name``, or ``None`` for base tensors."""
    parts = name.split(".")
    for container, key in zip(parts, parts[1:], strict=False):
        if container in TASK_CONTAINERS:
            return key
    return None


def _neutral(name: str) -> str:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in TASK_CONTAINERS:
            parts[i + 1] = TASK_PLACEHOLDER
            break
    return ".".join(parts)
