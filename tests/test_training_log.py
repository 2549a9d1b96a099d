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


def test_early_stopping_watches_the_calibration_normals_and_logs_their_nll(tmp_path):
    from tests.helpers import learn_args

    run = tmp_path / "run"
    extra = ("--set", "train.early_stopping.patience=1", "--set", "train.epochs=3")
    assert main(learn_args(run, "stripes=synthetic:stripes", extra=extra)) == 0
    with open(run / "logs" / "training.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert 1 <= len(rows) <= 3 and all(float(r["val_nll"]) == float(r["val_nll"]) for r in rows)  # filled, not NaN
    best = min(range(len(rows)), key=lambda i: float(rows[i]["val_nll"]))
    assert len(rows) == 3 or len(rows) - 1 - best >= 1  # stopped only after an epoch without improvement


def test_a_training_csv_of_an_older_moleflow_keeps_its_columns(tmp_path):
    from moleflow.training_log import CSVLogger

    path = tmp_path / "training.csv"
    old = ["task", "epoch", "loss", "nll", "tail", "logdet_penalty", "whitening_reg", "lr", "seconds"]
    path.write_text(",".join(old) + "\na,1,2.0,2.0,,,,0.1,0.5\n")
    logger = CSVLogger(path)
    logger.log_epoch({"task": "b", "epoch": 1, "loss": 1.5, "nll": 1.5, "lr": 0.1, "seconds": 0.2, "val_nll": 1.7})
    logger.close()
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == old and all(len(r) == len(old) for r in rows)
    assert rows[2][:3] == ["b", "1", "1.5"]
