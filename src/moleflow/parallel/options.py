"""How products are spread over a Ray cluster (:class:`RayOptions`) and what a many-product command did
(:class:`LearnReport`)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LearnReport", "ParallelError", "RayOptions"]


class ParallelError(ValueError):
    """Options the cluster cannot satisfy, or a run that cannot be learned in parallel."""


@dataclass(frozen=True)
class RayOptions:
    """One Ray task per product.

    ``address``: an existing cluster (``"auto"``, ``"HOST:6379"``, ``"ray://HOST:10001"``); ``None``: connect
    to the Ray runtime this process already started, or start a local one with ``num_cpus`` (default: the
    machine's). ``threads``: torch intra-op threads in each task; ``None``: as many as this process uses
    (``torch.get_num_threads()``), so that a product comes out bit for bit as learned here.
    ``cpus_per_task``: CPUs Ray reserves per task (``None``: ``threads``). ``gpus_per_task``: > 0 runs the
    task on a GPU (fractions share one). ``max_retries``: how often Ray reruns a task whose worker died.
    """

    address: str | None = None
    threads: int | None = None
    cpus_per_task: float | None = None
    gpus_per_task: float = 0.0
    max_retries: int = 0
    num_cpus: int | None = None

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ParallelError(f"threads per task must be >= 1, got {self.threads}")
        if self.cpus_per_task is not None and self.cpus_per_task <= 0:
            raise ParallelError(f"--cpus-per-task must be > 0, got {self.cpus_per_task}")
        if self.gpus_per_task < 0:
            raise ParallelError(f"--gpus-per-task must be >= 0, got {self.gpus_per_task}")
        if self.max_retries < 0:
            raise ParallelError(f"max_retries must be >= 0, got {self.max_retries}")

    def task_threads(self) -> int:
        """Torch threads of a task: ``threads``, else ``cpus_per_task`` rounded, else this process's."""
        if self.threads is not None:
            return self.threads
        if self.cpus_per_task is not None:
            return max(1, round(self.cpus_per_task))
        import torch

        return torch.get_num_threads()

    def task_cpus(self) -> float:
        return self.cpus_per_task if self.cpus_per_task is not None else float(self.task_threads())


@dataclass
class LearnReport:
    """Products learned (in the order they were committed), skipped (already in the run) and failed."""

    learned: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # product -> one-line reason
    seconds: float = 0.0

    def failure_line(self) -> str:
        """One line naming every failed product and why (empty when none failed)."""
        if not self.failed:
            return ""
        reasons = "; ".join(f"{name}: {why}" for name, why in self.failed.items())
        return (
            f"{len(self.failed)} product(s) failed ({reasons}); the others are in the run. Fix their data and rerun "
            "the same command: products already in the run are skipped"
        )
