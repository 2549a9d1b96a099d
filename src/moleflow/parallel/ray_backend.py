"""The Ray layer: connect to (or start) a cluster, put the shared state into the object store once, run
one task per product, and hand each result to the driver as soon as it is ready.

A failed task (its exception) or a lost one (its worker killed, out of memory, its node gone) costs only
its own product: it is reported with one line and the others go on. Stages reported from inside the tasks
(extracting, training, ...) reach the driver through a small actor.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from moleflow.extras import require_extra
from moleflow.parallel.options import ParallelError, RayOptions
from moleflow.parallel.progress import ProgressBoard

__all__ = ["StageReporter", "cluster", "run_tasks"]

log = logging.getLogger(__name__)
POLL_SECONDS = 0.5
MAX_REASON = 600  # characters of a failed product's reason (a validation error may list many files)
_depth = 0  # nesting of cluster() in this process


class StageReporter:
    """A Ray actor collecting ``(product, stage)`` events from the tasks until the driver drains them."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def report(self, name: str, stage: str) -> None:
        self.events.append((name, stage))

    def drain(self) -> list[tuple[str, str]]:
        out, self.events = self.events, []
        return out


@contextlib.contextmanager
def cluster(options: RayOptions) -> Iterator[Any]:
    """The ``ray`` module, connected: to ``options.address``, to the runtime this process already has, or
    to a local cluster started here (and shut down again on leaving)."""
    require_extra("ray", "--parallel ray")
    import ray

    global _depth
    started = False
    if not ray.is_initialized():
        settings = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        if options.address is not None:
            ray.init(address=options.address, **settings)
        else:
            ray.init(num_cpus=options.num_cpus, **settings)
        started = True
    try:
        if _depth == 0:  # checked (and logged) once per command, not again by the tasks run inside it
            _check_resources(ray, options)
        _depth += 1
        yield ray
    finally:
        _depth = max(0, _depth - 1)
        if started:
            ray.shutdown()


def _check_resources(ray: Any, options: RayOptions) -> None:
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if options.task_cpus() > cpus:
        raise ParallelError(
            f"each task asks for {options.task_cpus():g} CPUs but the Ray cluster has {cpus:g}; lower --cpus-per-task"
        )
    if options.gpus_per_task > gpus:
        raise ParallelError(
            f"each task asks for {options.gpus_per_task:g} GPUs but the Ray cluster has {gpus:g}; lower --gpus-per-task"
        )
    at_once = int(cpus // options.task_cpus())
    if options.gpus_per_task:
        at_once = min(at_once, int(gpus // options.gpus_per_task))
    log.info(
        "Ray cluster: %g CPUs, %g GPUs; tasks of %g CPU(s), %g GPU(s), %d torch thread(s): up to %d at once",
        cpus,
        gpus,
        options.task_cpus(),
        options.gpus_per_task,
        options.task_threads(),
        at_once,
    )


def one_line(message: str, limit: int = MAX_REASON) -> str:
    """A multi-line message (a validation error lists one bad file per line) joined into one line, cut at
    ``limit`` characters."""
    text = " ".join(part.strip() for part in message.strip().splitlines() if part.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def failure_reason(ray: Any, error: BaseException) -> str:
    """One line saying why a task failed: its own exception's message, or that its worker was lost."""
    if isinstance(error, ray.exceptions.RayTaskError):
        cause = getattr(error, "cause", None)
        if cause is None:
            return str(error).strip().splitlines()[-1]
        text = one_line(str(cause))
        return text if isinstance(cause, ValueError) and text else f"{type(cause).__name__}: {text}"
    if isinstance(error, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)):
        return "its Ray worker died (killed, out of memory, or its node was lost)"
    if isinstance(error, ray.exceptions.TaskCancelledError):
        return "cancelled"
    return f"{type(error).__name__}: {one_line(str(error))}"


def run_tasks(
    fn: Callable[..., Any],
    shared: Any,
    calls: Mapping[str, tuple[Any, ...]],
    options: RayOptions,
    board: ProgressBoard,
    on_result: Callable[[str, Any], str],
) -> dict[str, str]:
    """Run ``fn(shared, *calls[name], reporter)`` as one Ray task per product; ``shared`` is put into the
    object store once. ``on_result(name, value)`` is called in this process as each task finishes (its
    return: a detail for the product's done line). Returns ``{product: why}`` of the failed ones."""
    failures: dict[str, str] = {}
    with cluster(options) as ray:
        reporter = ray.remote(num_cpus=0)(StageReporter).remote()
        remote = ray.remote(fn).options(
            num_cpus=options.task_cpus(), num_gpus=options.gpus_per_task, max_retries=options.max_retries
        )
        shared_ref = ray.put(shared)
        pending = {}
        for name, args in calls.items():
            pending[remote.remote(shared_ref, *args, reporter)] = name
            board.stage(name, "queued")
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
                for name, stage in ray.get(reporter.drain.remote()):
                    if name in pending.values():
                        board.stage(name, stage)
                for ref in ready:
                    name = pending.pop(ref)
                    try:
                        value = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        failures[name] = failure_reason(ray, e)
                        board.failed(name, failures[name])
                        continue
                    board.done(name, on_result(name, value))
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            ray.kill(reporter)
    return failures
