"""MicroBatcher without a model: batches form as specified, results reach the right futures, bounds hold."""

from __future__ import annotations

import threading
import time

import pytest

from moleflow.serve.batcher import MicroBatcher, QueueFullError, ShuttingDownError


class Gated:
    """A fake model: records each call's items, answers ``10 * item``; the first call waits for ``release``."""

    def __init__(self, block_first: bool = True, fail_on: int | None = None) -> None:
        self.calls: list[list[int]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not block_first:
            self.release.set()
        self.fail_on = fail_on

    def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        self.entered.set()
        assert self.release.wait(10), "test did not release the fake model"
        if self.fail_on in items:
            raise RuntimeError(f"cannot score item {self.fail_on}")
        return [10 * x for x in items]


def _batcher(model, **kw) -> MicroBatcher[int, int]:
    return MicroBatcher(model, **{"max_batch": 4, "max_wait_s": 0.05, "capacity": 16, **kw}).start()


def test_items_waiting_while_the_model_is_busy_go_in_full_batches_in_order():
    model = Gated()
    batcher = _batcher(model)
    first = batcher.submit([0])
    assert model.entered.wait(5)
    rest = [f for i in range(1, 8) for f in batcher.submit([i])]  # seven single-image requests pile up
    assert batcher.stats().depth == 7
    model.release.set()
    assert [f.result(5) for f in first + rest] == [10 * i for i in range(8)]
    assert model.calls == [[0], [1, 2, 3, 4], [5, 6, 7]]  # max_batch 4: 8 requests, 3 model calls
    stats = batcher.stats()
    assert (stats.calls, stats.items, stats.max_batch_seen, stats.depth) == (3, 8, 4, 0)
    assert stats.mean_batch == pytest.approx(8 / 3)
    batcher.stop()


def test_the_wait_bound_groups_close_arrivals_and_lets_a_lone_item_go():
    model = Gated(block_first=False)
    batcher = _batcher(model, max_wait_s=0.5)
    a = batcher.submit([1])
    time.sleep(0.05)  # well within the wait: joins the same batch
    b = batcher.submit([2])
    assert [a[0].result(5), b[0].result(5)] == [10, 20]
    assert model.calls == [[1, 2]]
    batcher.stop()
    model = Gated(block_first=False)
    batcher = _batcher(model, max_wait_s=0.0)
    start = time.perf_counter()
    assert batcher.submit([3])[0].result(5) == 30
    assert time.perf_counter() - start < 0.5  # nothing to wait for
    batcher.submit([4])[0].result(5)
    assert model.calls == [[3], [4]]
    batcher.stop()


def test_a_request_enters_the_queue_whole_or_not_at_all():
    model = Gated()
    batcher = _batcher(model, capacity=3)
    running = batcher.submit([0])
    assert model.entered.wait(5)  # taken by the worker: no longer waiting
    two = batcher.submit([1, 2])
    with pytest.raises(QueueFullError, match="2 images are waiting"):
        batcher.submit([3, 4])  # 2 + 2 > 3: refused, and nothing of it was queued
    assert batcher.stats().depth == 2
    one = batcher.submit([5])
    model.release.set()
    assert [f.result(5) for f in running + two + one] == [0, 10, 20, 50]
    assert sorted(x for call in model.calls for x in call) == [0, 1, 2, 5]
    batcher.stop()


def test_cancelled_items_are_dropped_before_the_model_call():
    model = Gated()
    batcher = _batcher(model)
    batcher.submit([0])
    assert model.entered.wait(5)
    gone, kept = batcher.submit([1, 2])
    assert gone.cancel()
    model.release.set()
    assert kept.result(5) == 20
    assert model.calls == [[0], [2]] and batcher.stats().cancelled == 1
    batcher.stop()


def test_a_failing_call_fails_its_batch_only_and_the_worker_lives_on():
    model = Gated(fail_on=2)
    batcher = _batcher(model)
    batcher.submit([0])[0]
    assert model.entered.wait(5)
    bad = batcher.submit([1, 2])
    model.release.set()
    for future in bad:
        with pytest.raises(RuntimeError, match="cannot score item 2"):
            future.result(5)
    assert batcher.submit([3])[0].result(5) == 30
    assert batcher.stats().failed_calls == 1 and batcher.alive
    batcher.stop()


def test_stop_runs_what_was_queued_and_refuses_new_items():
    model = Gated()
    batcher = _batcher(model)
    running = batcher.submit([0])
    assert model.entered.wait(5)
    waiting = batcher.submit([1])
    threading.Timer(0.2, model.release.set).start()
    batcher.stop()
    assert running[0].result(5) == 0 and waiting[0].result(5) == 10
    with pytest.raises(ShuttingDownError):
        batcher.submit([2])
    assert not batcher.alive


def test_stop_fails_what_still_waits_when_the_model_does_not_finish_in_time():
    model = Gated()
    batcher = _batcher(model)
    running = batcher.submit([0])
    assert model.entered.wait(5)
    waiting = batcher.submit([1])
    batcher.stop(timeout=0.1)
    with pytest.raises(ShuttingDownError):
        waiting[0].result(5)
    model.release.set()
    assert running[0].result(5) == 0
    batcher._thread.join(5)
    assert not batcher._thread.is_alive() and model.calls == [[0]]


def test_bad_construction_is_refused():
    with pytest.raises(ValueError, match="max_batch >= 1"):
        MicroBatcher(lambda items: items, max_batch=0, max_wait_s=0.0, capacity=1)
