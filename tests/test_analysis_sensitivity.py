"""Task-order and Task-0 sensitivity (analysis/sensitivity.py) on a fake experiment with known answers."""

import argparse
import json
import math

import pytest

from moleflow.analysis import runs as R
from moleflow.analysis import sensitivity as S
from moleflow.config import preset
from moleflow.data.synthetic import make_synthetic_task
from tests.test_analysis_factorial import fake_results

NAMES = ("synthetic_stripes", "synthetic_disc", "synthetic_dots")
TASK0_BONUS = {"synthetic_stripes": 0.3, "synthetic_disc": 0.0, "synthetic_dots": 0.1}


class OrderFake:
    """Each task ends at 0.5 plus a bonus if it was Task 0, plus 0.01 * seed; the first task also had a
    peak 0.2 higher right after it was learned (forgetting 0.2 / (T - 1) averaged over earlier tasks)."""

    def __init__(self):
        self.orders = []

    def __call__(self, cfg, tasks, run_dir, feature_cache):
        names = [t.name for t in tasks]
        self.orders.append(tuple(names))
        first, last = names[0], len(names) - 1

        def value(i, name):
            v = 0.5 + 0.01 * cfg.train.seed + (TASK0_BONUS[name] if name == first else 0.0)
            return v + 0.2 if name == first and i < last else v

        return fake_results(names, value)


def tasks():
    return [make_synthetic_task(k, n_train=2, n_test=2, size=32) for k in ("stripes", "disc", "dots")]


def test_rotations_put_every_task_first_once_and_extra_orders_are_distinct():
    assert S.rotations(["a", "b", "c"]) == [("a", "b", "c"), ("b", "c", "a"), ("c", "a", "b")]
    orders = S.generate_orders(["a", "b", "c"], 6, seed=3)
    assert len(set(orders)) == 6 and orders[:3] == S.rotations(["a", "b", "c"])
    assert S.generate_orders(["a", "b", "c"], 2) == [("a", "b", "c"), ("b", "c", "a")]
    with pytest.raises(ValueError, match=r"--n-orders must lie in \[1, 6\]"):
        S.generate_orders(["a", "b", "c"], 7)


def test_parse_orders_checks_names():
    assert S.parse_orders("b,a;a,b", ["a", "b"]) == [("b", "a"), ("a", "b")]
    with pytest.raises(ValueError, match="not a permutation of the task names"):
        S.parse_orders("a,c", ["a", "b"])
    with pytest.raises(ValueError, match="given twice"):
        S.parse_orders("a,b;a,b", ["a", "b"])


def test_order_statistics_match_the_known_answers(tmp_path):
    fake = OrderFake()
    runner = R.Runner(preset("offline"), tasks(), tmp_path, execute=fake)
    orders = S.generate_orders(NAMES, 3)
    runs = S.run_orders(runner, orders, [0, 1])
    assert sorted(fake.orders) == sorted(orders * 2)
    rows = S.order_rows(runs, orders, [0, 1])
    for row in rows:
        bonus = TASK0_BONUS[row["task0"]]
        final = row["oracle"]["final"]
        assert final["mean"] == pytest.approx(0.5 + 0.005 + bonus / 3)  # seeds 0, 1 -> mean offset 0.005
        assert final["std"] == pytest.approx(0.01 / math.sqrt(2))  # sample std of two values 0.01 apart
        assert row["routed"]["forgetting"]["mean"] == pytest.approx(0.2 / 2)  # one of two earlier tasks drops 0.2
    assert S.spread(rows, "oracle")["range"] == pytest.approx(0.3 / 3)
    task0 = {r["task"]: r for r in S.task0_rows(runs, NAMES, "oracle")}
    assert task0["synthetic_stripes"]["as_task0"]["mean"] == pytest.approx(0.805)
    assert task0["synthetic_stripes"]["later"]["mean"] == pytest.approx(0.505)
    assert task0["synthetic_disc"]["as_task0"]["mean"] == pytest.approx(task0["synthetic_disc"]["later"]["mean"])


def test_order_command_writes_outputs_and_rejects_both_order_options(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "execute_experiment", OrderFake())
    parser = argparse.ArgumentParser()
    S.register(parser.add_subparsers())
    out = tmp_path / "out"
    common = ["order", "--tasks", "synthetic:stripes,synthetic:disc,synthetic:dots", "--limits", "3,2", "--seeds", "2"]
    args = parser.parse_args([*common, "--orders", "synthetic_disc,synthetic_dots,synthetic_stripes", "--out", str(out)])
    assert args.func(args) == 0
    data = json.loads((out / "order.json").read_text())
    assert [r["task0"] for r in data["orders"]] == ["synthetic_disc"] and len(data["runs"]) == 2
    assert data["spread"]["oracle"]["std"] is None  # one order: no spread (NaN written as null)
    assert "synthetic_disc > synthetic_dots > synthetic_stripes" in (out / "order.md").read_text()
    assert (out / "order.png").read_bytes()[:4] == b"\x89PNG"
    both = parser.parse_args([*common, "--orders", "a,b,c", "--n-orders", "2", "--out", str(out)])
    with pytest.raises(ValueError, match="either --orders or --n-orders"):
        both.func(both)
