"""Training curves: one CSV row per epoch of every product, TensorBoard scalars, a clear error without MLflow."""

from __future__ import annotations

import csv
import importlib.util

import pytest

from moleflow.cli import main
from moleflow.training_log import TensorBoardLogger, build_loggers


def test_the_run_logs_every_epoch_and_its_loss_parts(tiny_run):
    with open(tiny_run / "logs" / "training.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["task"], r["epoch"]) for r in rows] == [("stripes", "1"), ("stripes", "2"), ("disc", "1"), ("disc", "2")]
    for r in rows:
        loss, nll, tail = float(r["loss"]), float(r["nll"]), float(r["tail"])
        assert tail >= nll  # the mean of the worst patches is at least the mean
        assert float(r["lr"]) > 0 and float(r["seconds"]) > 0
        assert loss == pytest.approx(0.7 * nll + 0.3 * tail + 3e-5 * float(r["logdet_penalty"]) + _reg(r), rel=1e-4)
    assert rows[0]["whitening_reg"] and not rows[2]["whitening_reg"]  # identity pull on the first product only


def _reg(row) -> float:
    return 0.1 * float(row["whitening_reg"]) if row["whitening_reg"] else 0.0


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_scalars_by_task_and_epoch(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path / "tb")
    for epoch in (1, 2):
        logger.log_epoch({"task": "disc", "epoch": epoch, "loss": 10.0 / epoch, "nll": 9.0, "tail": None, "lr": 1e-3})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("disc/loss")] == [(1, 10.0), (2, 5.0)]
    assert "disc/tail" not in events.Tags()["scalars"]


def test_unknown_or_missing_loggers_fail_before_any_work(tmp_path, capsys, monkeypatch):
    with pytest.raises(ValueError, match="unknown logger"):
        build_loggers(["wandb"], tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else object())
    assert main(["learn", str(tmp_path / "run"), "x=synthetic:disc", "--logger", "mlflow"]) == 2
    assert "pip install 'moleflow[mlflow]'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "tasks.json").exists()
