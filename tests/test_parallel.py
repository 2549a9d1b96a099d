"""Products learned as Ray tasks (one local cluster for the module, 2 CPUs): bit for bit the products learned
one by one here; a job that fails on bad data and one whose worker is killed lose only themselves; a rerun of
the same command learns only what is missing."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moleflow.cli import main
from moleflow.data.base import ArraySample, TaskData
from moleflow.data.synthetic import render_sample
from moleflow.detector import Detector
from tests.helpers import TINY_LIMITS, learn_args

LIMITS = tuple(int(x) for x in TINY_LIMITS.split(","))


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def _probe() -> list[np.ndarray]:
    return [render_sample(kind, "test", 11 + i, defective=i % 2 == 1)[0] for kind in ("dots", "grid") for i in range(2)]


def _assert_same_product(a: Detector, b: Detector, name: str) -> None:
    """Parameters, prototype, calibration (thresholds and the values they were set on) and record, bit for bit."""
    pa, pb = a.export_product(name), b.export_product(name)
    assert sorted(pa.parts) == sorted(pb.parts)
    for key in pa.parts:
        assert torch.equal(pa.parts[key], pb.parts[key]), key
    assert torch.equal(pa.mean, pb.mean) and torch.equal(pa.precision, pb.precision)
    ra, rb = pa.record.to_json(), pb.record.to_json()
    for when in ("learned_at", "parts_id", "seconds"):
        ra.pop(when), rb.pop(when)
    assert ra == rb


def test_products_learned_as_ray_tasks_equal_products_learned_one_by_one(cluster, tiny_run, tmp_path, single_thread):
    one_by_one, parallel = tmp_path / "one_by_one", tmp_path / "parallel"
    shutil.copytree(tiny_run, one_by_one)
    shutil.copytree(tiny_run, parallel)
    reference = Detector.load(one_by_one, progress=False)
    for name in ("dots", "grid"):
        reference.learn(name, f"synthetic:{name}", limits=LIMITS)

    from moleflow.parallel import RayOptions

    detector = Detector.load(parallel, progress=False)
    report = detector.learn_many(
        [("dots", "synthetic:dots"), ("grid", "synthetic:grid")], parallel=RayOptions(), limits=LIMITS
    )
    assert sorted(report.learned) == ["dots", "grid"] and not report.failed
    assert RayOptions().task_threads() == torch.get_num_threads() == 1  # the tasks ran at this process's count

    reloaded = Detector.load(parallel)
    reference = Detector.load(one_by_one)
    assert sorted(reloaded.products) == sorted(reference.products) == ["disc", "dots", "grid", "stripes"]
    for name in ("dots", "grid"):
        _assert_same_product(reference, reloaded, name)
    for ref, got in zip(reference.predict(_probe()), reloaded.predict(_probe()), strict=True):
        assert (ref.product, ref.score, ref.routing_distance, ref.verdict) == (
            got.product,
            got.score,
            got.routing_distance,
            got.verdict,
        )
        assert np.array_equal(ref.anomaly_map, got.anomaly_map)
    assert [p.product for p in reloaded.predict(_probe())] == ["dots"] * 2 + ["grid"] * 2


def _folder_product(root: Path, broken: bool) -> str:
    good, bad = root / "good", root / "bad"
    good.mkdir(parents=True, exist_ok=True)
    bad.mkdir(exist_ok=True)
    for i in range(10):
        Image.fromarray(render_sample("grid", "train", i)[0]).save(good / f"{i:03d}.png")
    for i in range(3):
        Image.fromarray(render_sample("grid", "test", 2 * i + 1, defective=True)[0]).save(bad / f"{i:03d}.png")
    (good / "005.png").write_bytes(b"\x89PNG not really" if broken else (good / "004.png").read_bytes())
    return f"folder:{good}:{bad}"


def _killer_task() -> TaskData:
    class _WorkerKiller(ArraySample):  # local: Ray pickles it by value, the worker needs no test module
        """A sample whose decoding kills the process decoding it, as the kernel's OOM killer would."""

        def load_image(self, max_side: int | None = None) -> np.ndarray:
            os._exit(3)

    images = [render_sample("disc", "train", i)[0] for i in range(8)]
    train = tuple(_WorkerKiller(name=f"train/{i}", label=0, defect="good", image=im) for i, im in enumerate(images))
    test = (ArraySample(name="test/0", label=0, defect="good", image=images[0]),)
    return TaskData("killed", train, test, has_masks=False, source="a sample that kills its worker")


def test_a_failed_and_a_killed_job_lose_only_themselves_and_a_rerun_learns_the_missing(
    cluster, tiny_run, tmp_path, caplog, capsys
):
    from moleflow.parallel import RayOptions

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    products = [
        ("dots", "synthetic:dots"),
        ("bad", _folder_product(tmp_path / "data", broken=True)),
        ("killed", _killer_task()),
    ]
    with caplog.at_level(logging.INFO, logger="moleflow"):
        report = Detector.load(run, progress=False).learn_many(products, parallel=RayOptions(threads=1), limits=LIMITS)
    assert report.learned == ["dots"]
    assert set(report.failed) == {"bad", "killed"}
    assert "005.png" in report.failed["bad"]  # the unreadable file is named
    assert "worker died" in report.failed["killed"]
    lines = [r.getMessage() for r in caplog.records if r.name == "moleflow.parallel"]
    for stage in ("queued", "extracting", "training"):
        assert f"dots: {stage}" in lines
    assert any(line.startswith("dots: done") for line in lines)
    assert any(line.startswith("bad: failed: ") and "005.png" in line for line in lines)

    def files(r: Path) -> list[str]:
        return sorted(p.name for p in (r / "checkpoints" / "tasks").iterdir())

    assert files(run) == ["disc.safetensors", "dots.safetensors", "stripes.safetensors"]  # nothing half-written
    assert not list(run.rglob("*.tmp"))
    for name in ("stripes", "disc"):  # the products already there are untouched, byte for byte
        path = Path("checkpoints") / "tasks" / f"{name}.safetensors"
        assert (run / path).read_bytes() == (tiny_run / path).read_bytes()
    assert Detector.load(run).products == ["stripes", "disc", "dots"]
    dots_parts = Detector.load(run).records["dots"].parts_id

    _folder_product(tmp_path / "data", broken=False)  # the data fixed, the same command again
    argv = ["dots=synthetic:dots", f"bad={products[1][1]}", "killed=synthetic:disc"]
    extra = ("--parallel", "ray", "--cpus-per-task", "1", "--eval", "new")
    capsys.readouterr()
    assert main(learn_args(run, *argv, extra=extra)) == 0  # the CLI logs to stderr
    out, err = capsys.readouterr()
    assert "dots: skipped: already in the run (--replace relearns it)" in err and "learned 2, skipped 1" in out
    detector = Detector.load(run)
    assert detector.products[:3] == ["stripes", "disc", "dots"] and sorted(detector.products[3:]) == ["bad", "killed"]
    assert detector.records["dots"].parts_id == dots_parts
    assert files(run) == sorted(f"{n}.safetensors" for n in detector.products)
    results = json.loads((run / "results.json").read_text())
    assert results["tasks"] == detector.products
    tests = results["calibration"]
    assert all(tests[n]["test"]["images"] > 0 for n in ("bad", "killed")) and not tests["dots"].get("test")


def test_without_ray_the_flag_fails_in_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    from moleflow import extras

    monkeypatch.setitem(extras.EXTRAS, "ray", ("ray_is_not_installed_here",))
    assert main(learn_args(tmp_path / "run", "a=synthetic:dots", "b=synthetic:disc", extra=("--parallel", "ray"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "moleflow: error: --parallel ray needs the optional package(s) ray_is_not_installed_here: "
        "pip install 'moleflow[ray]'"
    )
    assert not (tmp_path / "run" / "tasks.json").exists()  # refused before anything was written
