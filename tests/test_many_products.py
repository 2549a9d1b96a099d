"""Runs of many products: the per-task state paths that keep loading linear give what the full state dict
gives, and a lazily loaded detector (parts read on first use, few kept) scores exactly like an eager one."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from moleflow.config import preset
from moleflow.data.synthetic import render_sample
from moleflow.detector import Detector
from moleflow.features.cache import CachedFeatures
from moleflow.flow.model import _neutral, _task_of
from moleflow.routing import Router
from tests.helpers import build_perturbed_model


@pytest.mark.parametrize("name", ["offline", "v5", "paper"])
def test_task_state_is_the_tasks_slice_of_the_full_state_dict(name):
    model = build_perturbed_model(name, tasks=("t0", "t1", "t2"))
    full = model.state_dict()
    for task in model.tasks:
        expected = {_neutral(k): v for k, v in full.items() if _task_of(k) == task}
        got = model.task_state_dict(task)
        assert list(got) == list(expected)  # same keys, same order
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    state = {k: v + 1 for k, v in model.task_state_dict("t1").items()}
    model.load_task_state_dict("t1", state)
    assert all(torch.equal(model.task_state_dict("t1")[k], state[k]) for k in state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in full.items() if _task_of(k) != "t1")


def test_router_extend_equals_adding_one_by_one():
    gen = torch.Generator().manual_seed(0)
    means, factors = torch.randn(5, 3, generator=gen), torch.randn(5, 3, 3, generator=gen)
    precisions = factors @ factors.transpose(1, 2) + torch.eye(3)
    one, bulk = Router(preset("offline").router), Router(preset("offline").router)
    for i in range(5):
        one.add(f"t{i}", means[i], precisions[i])
    bulk.extend(["t0", "t1"], means[:2], precisions[:2])
    bulk.extend(["t2", "t3", "t4"], means[2:], precisions[2:])
    assert one.tasks == bulk.tasks and torch.equal(one.means, bulk.means) and torch.equal(one.precisions, bulk.precisions)
    with pytest.raises(ValueError, match="already has a prototype for 't1'"):
        bulk.extend(["t9", "t1"], means[:2], precisions[:2])
    assert bulk.tasks == one.tasks  # nothing added by the refused call


def _outputs(detector: Detector, images) -> list[tuple]:
    return [(p.product, p.score, p.routing_distance, p.verdict, p.anomaly_map.tobytes()) for p in detector.predict(images)]


def _scores(detector: Detector, feats: CachedFeatures) -> tuple:
    s = detector.score(feats)
    return s.task_index.tolist(), s.image_scores.tolist(), s.distances.tolist(), s.patch_scores.numpy().tobytes()


def test_a_lazy_detector_reads_parts_on_first_use_keeps_few_and_scores_the_same(run_copy):
    images = [render_sample(kind, "test", i, defective=i % 2 == 1)[0] for kind in ("stripes", "disc") for i in range(3)]
    eager = Detector.load(run_copy)
    lazy = Detector.load(run_copy, lazy=True, max_resident=1)
    assert lazy.lazy and lazy.model.tasks == [] and lazy.products == eager.products
    assert _outputs(lazy, images) == _outputs(eager, images)  # a mixed batch needs both: both read
    found = eager.extractor.extract(images)
    feats = CachedFeatures(found.patches, None, found.pooled)
    stripes, disc = feats[0:3], feats[3:6]
    assert _scores(lazy, disc) == _scores(eager, disc)
    assert lazy.model.tasks == ["disc"]  # stripes, least recently used beyond max_resident, dropped again
    assert _scores(lazy, stripes) == _scores(eager, stripes) and lazy.model.tasks == ["stripes"]

    lazy.remove("disc")  # not in memory: forgetting it still works
    assert Detector.load(run_copy).products == ["stripes"]
    assert _scores(Detector.load(run_copy, lazy=True), stripes) == _scores(eager, stripes)


def test_learning_on_a_lazy_detector_reads_every_product_first(run_copy, tmp_path):
    reference = tmp_path / "reference"
    shutil.copytree(run_copy, reference)
    lazy = Detector.load(run_copy, lazy=True, progress=False)
    lazy.learn("dots", "synthetic:dots", limits=(20, 10))
    assert not lazy.lazy and lazy.model.tasks == ["stripes", "disc", "dots"]
    eager = Detector.load(reference, progress=False)
    eager.learn("dots", "synthetic:dots", limits=(20, 10))
    a, b = Detector.load(run_copy).export_product("dots"), Detector.load(reference).export_product("dots")
    assert all(torch.equal(a.parts[k], b.parts[k]) for k in a.parts) and np.isclose(
        a.record.calibration.image_threshold, b.record.calibration.image_threshold, rtol=0, atol=0
    )


def test_a_router_file_left_behind_by_per_product_commits_is_read_around(run_copy):
    import dataclasses
    import json

    from moleflow.checkpoint import new_id

    detector = Detector.load(run_copy)
    product = detector.export_product("disc")
    twin = dataclasses.replace(product, record=dataclasses.replace(product.record, name="twin", parts_id=new_id()))
    detector.adopt(twin, commit=False)
    detector.commit(write_router=False)  # as a many-product command commits each product
    with safe_open(str(run_copy / "checkpoints" / "router.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["tasks"]) == ["stripes", "disc"]  # the router file lags the index
    for loaded in (Detector.load(run_copy), Detector.load(run_copy, lazy=True)):
        assert loaded.products == ["stripes", "disc", "twin"]
        mean, precision = loaded.router.prototype("twin")
        assert torch.equal(mean, product.mean) and torch.equal(precision, product.precision)
    detector.commit()  # the end of the command: the router file catches up
    with safe_open(str(run_copy / "checkpoints" / "router.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["tasks"]) == ["stripes", "disc", "twin"]


def test_results_lagging_the_index_gain_empty_rows_and_keep_what_they_had():
    from moleflow.evaluation.results import ResultsBook

    book = ResultsBook(["a"])
    book.matrices["routed"]["image_auroc"][0][0] = 0.75
    stored = {"tasks": ["a"], "metrics": {"image_auroc": {"matrix": [[0.75]]}}}
    again = ResultsBook.from_json(stored, ["a", "b"])
    assert again.tasks == ["a", "b"]
    assert again.matrices["routed"]["image_auroc"] == [[0.75, None], [None, None]]
    assert ResultsBook.from_json(stored, ["b", "a"]).matrices["routed"]["image_auroc"] == [[None, None], [None, None]]
