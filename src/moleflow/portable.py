"""A detector's learned state as plain CPU tensors, apart from any model object or run directory.

This is what crosses a process boundary: a Ray task receives the frozen base (:class:`DetectorState`,
shipped once through the object store) and sends back one learned product (:class:`ProductState`); the
driver adds that product to its own detector and commits it to the run directory. Both are plain
dataclasses of tensors, records and the config, so any pickler (Ray's, ``multiprocessing``'s) carries them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from moleflow.config import MoleFlowConfig
from moleflow.rundir import TaskRecord

__all__ = ["DetectorState", "ProductState", "add_product", "build_model", "product_state"]


@dataclass
class ProductState:
    """One learned product: its record, its parts and its router prototype, against base ``base_id``.

    ``parts``: the model's tensors of this product with task-neutral keys (``MoLEFlow.task_state_dict``);
    ``mean (G,)`` and ``precision (G, G)``: its prototype, float64.
    """

    record: TaskRecord
    base_id: str
    parts: dict[str, torch.Tensor]
    mean: torch.Tensor
    precision: torch.Tensor

    @property
    def name(self) -> str:
        return self.record.name


@dataclass
class DetectorState:
    """The shared base (and the products listed in ``products``) of a detector; see :func:`build_model`."""

    cfg: MoleFlowConfig
    context_dim: int | None
    base: dict[str, torch.Tensor]
    base_id: str | None
    data_root: str | None = None
    products: list[ProductState] = field(default_factory=list)


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}


def product_state(model, router, record: TaskRecord, base_id: str) -> ProductState:
    """The state of product ``record.name`` as ``model`` and ``router`` hold it (copied to the CPU)."""
    mean, precision = router.prototype(record.name)
    return ProductState(record, base_id, _cpu(model.task_state_dict(record.name)), mean.cpu(), precision.cpu())


def detector_state(model, router, records: dict[str, TaskRecord], cfg, base_id, data_root, names: Sequence[str]):
    """:class:`DetectorState` of the base and the products ``names`` (in the router's order)."""
    context_dim = model.scale_context.proj.in_features if model.scale_context is not None else None
    products = [product_state(model, router, records[n], base_id) for n in router.tasks if n in set(names)]
    return DetectorState(cfg, context_dim, _cpu(model.base_state_dict()), base_id, data_root, products)


def add_product(model, router, product: ProductState) -> None:
    """Give ``model`` and ``router`` the parts and prototype of ``product`` (appended last)."""
    model.load_task_state_dict(product.name, product.parts)
    router.add(product.name, product.mean, product.precision)


def build_model(state: DetectorState):
    """``(MoLEFlow, Router)`` holding exactly the base and products of ``state`` (eval mode, CPU)."""
    from moleflow.flow.model import MoLEFlow
    from moleflow.routing import Router

    model = MoLEFlow(state.cfg.model, state.context_dim)
    missing = set(model.base_state_dict()) ^ set(state.base)
    if missing:
        raise ValueError(f"the shipped base does not match this model config: differing keys {sorted(missing)[:5]}")
    model.load_state_dict(state.base, strict=False)
    router = Router(state.cfg.router)
    for product in state.products:
        add_product(model, router, product)
    model.eval()
    return model, router
