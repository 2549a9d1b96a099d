"""Micro-batching: one worker thread owns the model; requests enqueue items and wait on futures.

A request hands its items to :meth:`MicroBatcher.submit` and gets one ``concurrent.futures.Future`` per
item. The worker takes the oldest item, then keeps taking items until it holds ``max_batch`` of them or
``max_wait_s`` has passed since it took the first, and runs them through the model in one call. While
the model is busy, new requests pile up in the queue, so under load the batches fill by themselves and a
lone request waits at most ``max_wait_s`` extra.

Bounds: at most ``capacity`` items wait at any time; a request that does not fit as a whole is refused
(:class:`QueueFullError`, the server's 503), so memory stays bounded however many clients there are.
Items whose future was cancelled (the request timed out or went away) are dropped before the model call.
Only the worker thread touches the model: torch modules are not safe to call from several threads.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["BatcherStats", "MicroBatcher", "QueueFullError", "ShuttingDownError"]

log = logging.getLogger(__name__)
Item = TypeVar("Item")
Result = TypeVar("Result")
_STOP = object()


class QueueFullError(RuntimeError):
    """The queue cannot take the request's items now; retry later."""


class ShuttingDownError(RuntimeError):
    """The batcher was stopped before the item was run."""


@dataclass(frozen=True)
class BatcherStats:
    """Counters since start: model calls, items run, largest batch, items dropped (cancelled), waiting now."""

    calls: int
    items: int
    max_batch_seen: int
    cancelled: int
    failed_calls: int
    depth: int
    capacity: int
    busy_s: float

    @property
    def mean_batch(self) -> float:
        return self.items / self.calls if self.calls else 0.0


class MicroBatcher(Generic[Item, Result]):
    """See the module docstring. ``run_batch(items) -> results`` (same length, same order) is called only
    from the worker thread; an exception it raises fails every future of that batch."""

    def __init__(
        self,
        run_batch: Callable[[list[Item]], Sequence[Result]],
        *,
        max_batch: int,
        max_wait_s: float,
        capacity: int,
        name: str = "moleflow-model",
    ) -> None:
        if max_batch < 1 or capacity < 1 or max_wait_s < 0:
            raise ValueError(
                f"need max_batch >= 1, capacity >= 1, max_wait_s >= 0; got {max_batch}, {capacity}, {max_wait_s}"
            )
        self._run_batch = run_batch
        self.max_batch, self.max_wait_s, self.capacity = max_batch, max_wait_s, capacity
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0  # items submitted and not yet taken by the worker (guarded by _lock)
        self._stopping = False
        self._calls = self._items = self._max_seen = self._cancelled = self._failed = 0
        self._busy_s = 0.0
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)

    # ------------------------------------------------------------------ producer side

    def start(self) -> MicroBatcher[Item, Result]:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, items: Sequence[Item]) -> list[Future[Result]]:
        """Enqueue all of ``items`` or none: QueueFullError when fewer than ``len(items)`` places are free."""
        futures: list[Future[Result]] = [Future() for _ in items]
        with self._lock:
            if self._stopping:
                raise ShuttingDownError("the server is shutting down")
            if self._pending + len(items) > self.capacity:
                raise QueueFullError(
                    f"{self._pending} images are waiting for the model (at most {self.capacity}); retry shortly"
                )
            self._pending += len(items)
            for item, future in zip(items, futures, strict=True):
                self._queue.put((item, future))
        return futures

    def stats(self) -> BatcherStats:
        with self._lock:
            return BatcherStats(
                calls=self._calls,
                items=self._items,
                max_batch_seen=self._max_seen,
                cancelled=self._cancelled,
                failed_calls=self._failed,
                depth=self._pending,
                capacity=self.capacity,
                busy_s=self._busy_s,
            )

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new items, run those already queued, end the worker; what is still queued after
        ``timeout`` seconds fails with ShuttingDownError (the worker then ends after its current call)."""
        with self._lock:
            self._stopping = True
        self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            return
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is not _STOP and entry[1].set_running_or_notify_cancel():
                entry[1].set_exception(ShuttingDownError("the server stopped before this image was run"))
        self._queue.put(_STOP)

    # ------------------------------------------------------------------ worker side

    def _take(self, block_s: float | None) -> tuple[Item, Future[Result]] | object | None:
        """The next entry (None when ``block_s`` passed without one); one fewer pending item."""
        try:
            entry = self._queue.get(timeout=block_s) if block_s is None or block_s > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None
        if entry is not _STOP:
            with self._lock:
                self._pending -= 1
        return entry

    def _collect(self) -> tuple[list[tuple[Item, Future[Result]]], bool]:
        """One batch: the oldest entry, then whatever arrives within ``max_wait_s``; and whether to stop."""
        first = self._take(None)
        if first is _STOP:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            entry = self._take(deadline - time.monotonic())
            if entry is None:
                break
            if entry is _STOP:
                return batch, True
            batch.append(entry)
        return batch, False

    def _work(self) -> None:
        stop = False
        while not stop:
            batch, stop = self._collect()
            live = [(item, future) for item, future in batch if future.set_running_or_notify_cancel()]
            with self._lock:
                self._cancelled += len(batch) - len(live)
            if live:
                self._run(live)

    def _run(self, live: list[tuple[Item, Future[Result]]]) -> None:
        start = time.perf_counter()
        try:
            results = list(self._run_batch([item for item, _ in live]))
            if len(results) != len(live):
                raise RuntimeError(f"the model returned {len(results)} results for {len(live)} images")
        except Exception as e:  # every waiting request learns of it; the worker lives on
            log.exception("model call on %d images failed", len(live))
            with self._lock:
                self._failed += 1
            for _, future in live:
                future.set_exception(e)
            return
        finally:
            with self._lock:
                self._calls += 1
                self._items += len(live)
                self._max_seen = max(self._max_seen, len(live))
                self._busy_s += time.perf_counter() - start
        for (_, future), result in zip(live, results, strict=True):
            future.set_result(result)
