"""kill -9 at any moment of learn, forget, calibrate or train leaves the run as it was before the command,
or with only whole, finished products; the next command cleans up what the killed one left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moleflow.cli import main
from moleflow.data.synthetic import render_sample
from moleflow.detector import Detector
from tests.helpers import learn_args

LAUNCHER = str(Path(__file__).with_name("kill_launcher.py"))
KILLED = -9


def _run(point: str, n: int, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, LAUNCHER, point, str(n), *argv], capture_output=True, text=True, timeout=300)


def _snapshot(run: Path) -> dict[str, bytes]:
    files = [run / "tasks.json", run / "config.yaml", *sorted((run / "checkpoints").rglob("*.safetensors"))]
    return {str(p.relative_to(run)): p.read_bytes() for p in files}


def _probe() -> list[np.ndarray]:
    return [render_sample(kind, "test", 7, defective=True)[0] for kind in ("stripes", "disc", "dots")]


def _outputs(run: Path) -> list[tuple]:
    return [(p.product, p.score, p.verdict, p.anomaly_map.tobytes()) for p in Detector.load(run).predict(_probe())]


def _check_whole(run: Path, before: dict[str, bytes], expected_after: list[str], reference: list[tuple]) -> bool:
    """The run loads; it holds the products of before, unchanged, or those of after, as the reference run has
    them. Returns whether the command's change is in."""
    detector = Detector.load(run)
    assert json.loads((run / "results.json").read_text())  # never half-written
    if detector.products == expected_after:
        assert _outputs(run) == reference
        return True
    snapshot = _snapshot(run)
    assert {k: v for k, v in snapshot.items() if k in before} == before  # what was there is bit for bit intact
    assert json.loads((run / "tasks.json").read_bytes()) == json.loads(before["tasks.json"])
    return False


def _next_command_cleans_up(run: Path) -> None:
    assert main(["calibrate", str(run), "stripes", "--fpr", "0.2", "--no-eval"]) == 0
    assert not list(run.rglob("*.tmp"))
    index = json.loads((run / "tasks.json").read_text())
    names = sorted(f"{t['name']}.safetensors" for t in index["tasks"])
    assert sorted(p.name for p in (run / "checkpoints" / "tasks").iterdir()) == names  # staged and orphan files gone


@pytest.fixture(scope="module")
def learned(tiny_run, tmp_path_factory):
    """An uninterrupted ``learn dots`` (the reference) and the rename targets it made, in order."""
    run = tmp_path_factory.mktemp("reference") / "run"
    shutil.copytree(tiny_run, run)
    proc = _run("trace", 0, learn_args(run, "dots=synthetic:dots", extra=("--eval", "new")))
    assert proc.returncode == 0, proc.stderr
    renames = [line.split(" ", 1)[1] for line in proc.stderr.splitlines() if line.startswith("RENAME ")]
    return _outputs(run), [Path(r).name for r in renames]


def _position(renames: list[str], name: str) -> int:
    return next(i for i, r in enumerate(renames, 1) if r == name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "point, where",
    [
        ("extract", "first batch"),
        ("train", "second step"),
        ("rename", "dots.*"),  # the staged product file
        ("write", "results.json"),
        ("rename", "tasks.json"),  # the commit point itself
        ("rename", "dots.safetensors"),  # after the commit: the staged file moving to its name
        ("rename", "router.safetensors"),
    ],
)
def test_kill_during_learn(run_copy, learned, point, where):
    reference, renames = learned
    if point == "extract":
        n = 1
    elif point == "train":
        n = 2  # 16 images, batch 16, 2 epochs: the last step
    elif where == "dots.*":
        n = next(i for i, r in enumerate(renames, 1) if r.startswith("dots.") and r.count(".") == 2)
    else:
        n = _position(renames, where)
    before = _snapshot(run_copy)
    proc = _run(point, n, learn_args(run_copy, "dots=synthetic:dots", extra=("--eval", "new")))
    assert proc.returncode == KILLED, proc.stderr
    changed = _check_whole(run_copy, before, ["stripes", "disc", "dots"], reference)
    assert changed == (where in ("dots.safetensors", "router.safetensors"))  # committed only after the index
    _next_command_cleans_up(run_copy)


@pytest.fixture(scope="module")
def forget_renames(tiny_run, tmp_path_factory) -> list[str]:
    """The rename targets of an uninterrupted ``forget disc``, in order."""
    root = tmp_path_factory.mktemp("forget")
    assert _run("trace", 0, ["forget", str(root / "nope"), "disc"]).returncode == 2  # a missing run: refused
    copy = root / "traced"
    shutil.copytree(tiny_run, copy)
    proc = _run("trace", 0, ["forget", str(copy), "disc"])
    assert proc.returncode == 0, proc.stderr
    return [Path(line.split(" ", 1)[1]).name for line in proc.stderr.splitlines() if line.startswith("RENAME ")]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["tasks.json", "router.safetensors"])
def test_kill_during_forget(run_copy, forget_renames, target):
    proc = _run("rename", _position(forget_renames, target), ["forget", str(run_copy), "disc"])
    assert proc.returncode == KILLED, proc.stderr
    products = Detector.load(run_copy).products
    assert products == (["stripes"] if target == "router.safetensors" else ["stripes", "disc"])
    _next_command_cleans_up(run_copy)
    assert not (run_copy / "checkpoints" / "tasks" / "disc.safetensors").exists() or "disc" in products


@pytest.mark.slow
def test_kill_during_train_then_resume(tmp_path):
    from tests.helpers import TINY

    run = tmp_path / "run"
    sets = [a for s in TINY for a in ("--set", s)]
    argv = [
        "train",
        "offline",
        "--tasks",
        "a=synthetic:stripes,b=synthetic:disc",
        "--out",
        str(run),
        "--limits",
        "12,6",
        "--no-progress",
        *sets,
    ]
    proc = _run("extract", 4, argv)  # a's train and test batches are done; b's extraction is cut
    assert proc.returncode == KILLED, proc.stderr
    assert Detector.load(run).products == ["a"]
    assert main(argv) == 2  # a non-empty --out is refused without --resume or --overwrite
    assert main([*argv, "--resume"]) == 0
    assert Detector.load(run).products == ["a", "b"]
    results = json.loads((run / "results.json").read_text())
    assert results["tasks"] == ["a", "b"] and results["metrics"]["image_auroc"]["matrix"][1][0] is not None


def test_train_into_a_non_empty_directory_refuses_and_changes_nothing(run_copy, capsys):
    before = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file() and p.name != "train.log"}
    code = main(["train", "offline", "--tasks", "synthetic:grid", "--out", str(run_copy), "--limits", "6,4"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file() and p.name != "train.log"} == before
