"""Component registry, factorial / ablation runs and their ANOVA (analysis/factorial.py, analysis/runs.py).

Most tests replace the continual experiment by a fake whose metric is a known function of the config,
so the statistics can be checked against hand computations; one test runs the real experiment to
check that a seed changes a run and repeats it exactly.
"""

import argparse
import json

import numpy as np
import pytest

from moleflow.analysis import factorial as FA
from moleflow.analysis import runs as R
from moleflow.config import apply_overrides, preset
from moleflow.data.synthetic import make_synthetic_task


def fake_results(tasks, value, masks=()):
    """A results.json dict: ``value(i, name)`` after training row ``i``; tasks in ``masks`` get pixel AP,
    the others image AUROC (their pixel AP is null). Routed and oracle matrices are equal."""
    size = len(tasks)

    def matrix(pixel):
        return [
            [
                (value(i, n) if (n in masks) == pixel else (0.5 if not pixel else None)) if j <= i else None
                for j, n in enumerate(tasks)
            ]
            for i in range(size)
        ]

    section = {
        "image_auroc": {"matrix": matrix(False), "final_mean": None, "forgetting": None},
        "pixel_ap": {"matrix": matrix(True), "final_mean": None, "forgetting": None},
    }
    return {
        "tasks": list(tasks),
        "metrics": section,
        "metrics_oracle": section,
        "routing": {"accuracy": 1.0},
        "timing": {"train_seconds": [0.0] * size},
    }


class FakeExperiment:
    """Metric = base + effects of (frozen, whitening, dia) + a seed-dependent offset; records each call."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, cfg, tasks, run_dir, feature_cache):
        self.calls.append(cfg)
        key = (cfg.train.base_policy == "frozen_after_first", cfg.model.whitening is not None, cfg.model.dia is not None)
        v = self.table[key] + 0.01 * np.sin(3.0 * cfg.train.seed + 1.0)
        names = [t.name for t in tasks]
        return fake_results(names, lambda i, n: v)


def tiny_tasks():
    return [make_synthetic_task(k, n_train=2, n_test=2, size=32) for k in ("stripes", "disc")]


def test_primary_metric_takes_pixel_ap_where_masks_exist_and_image_auroc_elsewhere():
    values = {(0, "a"): 0.9, (1, "a"): 0.7, (1, "b"): 0.4}
    results = fake_results(["a", "b"], lambda i, n: values[(i, n)], masks=("a",))
    assert R.primary_matrix(results, "oracle") == [[0.9, None], [0.7, 0.4]]
    summary = R.summarize(results, "k", 0, ())
    assert summary.primary["routed"] == pytest.approx(0.55)
    assert summary.primary_forgetting["oracle"] == pytest.approx(0.2)  # task a: 0.9 -> 0.7
    with pytest.raises(ValueError, match="matrix must be one of"):
        R.primary_matrix(results, "both")


def test_every_component_changes_the_offline_config_and_on_overrides_switch_it_on():
    cfg = preset("offline")
    components = FA.resolve_components(list(FA.COMPONENTS))
    FA.check_switchable(cfg, components)  # no component is a no-op
    full = apply_overrides(cfg, FA.Cell(True).overrides(components))
    assert full.model.scale_context is not None and full.model.flow.subnet == "context"
    assert full.train.base_policy == "frozen_after_first"
    off = apply_overrides(cfg, FA.Cell(False, "scale_context").overrides(components))
    assert off.model.scale_context is None and off.train.base_policy == "always_trainable"
    assert off.model.flow.subnet == "context"  # only the named component is switched off


def test_bad_components_give_clear_errors():
    with pytest.raises(ValueError, match="unknown component.*known: whitening"):
        FA.resolve_components(["whitening", "warp"])
    cfg = apply_overrides(preset("offline"), ["model.dia=null"])
    with pytest.raises(ValueError, match="'dia'.*change nothing"):
        FA.check_switchable(cfg, FA.resolve_components(["dia"]))


def test_factorial_shares_full_model_cells_and_reuses_stored_runs(tmp_path):
    table = {(f, w, d): 0.5 for f in (True, False) for w in (True, False) for d in (True, False)}
    fake = FakeExperiment(table)
    cfg, components = preset("offline"), FA.resolve_components(["whitening", "dia"])
    runner = R.Runner(cfg, tiny_tasks(), tmp_path, execute=fake)
    runs = FA.run_cells(runner, FA.factorial_cells(components), components, [0, 1, 2])
    assert len(fake.calls) == 3 * (2 + 2 * 2)  # 2 shared full-model cells + 2 per component, per seed
    assert len({s.key for s in runs.values()}) == len(fake.calls)
    again = R.Runner(cfg, tiny_tasks(), tmp_path, execute=fake)
    FA.run_cells(again, FA.factorial_cells(components), components, [0, 1, 2])
    assert again.executed == [] and len(fake.calls) == 18  # everything read back from disk


def _hand_interaction_f(cells):
    """Balanced 2x2 with n replicates: F = SS_AB / MS_within, SS_AB = n * sum (m_ij - m_i. - m_.j + m..)^2."""
    n = len(cells[(True, True)])
    m = {k: np.mean(v) for k, v in cells.items()}
    grand = np.mean(list(m.values()))
    row = {a: (m[(a, True)] + m[(a, False)]) / 2 for a in (True, False)}
    col = {b: (m[(True, b)] + m[(False, b)]) / 2 for b in (True, False)}
    ss_ab = n * sum((m[(a, b)] - row[a] - col[b] + grand) ** 2 for a, b in cells)
    ss_within = sum(((np.asarray(v) - m[k]) ** 2).sum() for k, v in cells.items())
    return ss_ab / (ss_within / (4 * (n - 1)))


def test_interaction_anova_matches_hand_computation(tmp_path):
    # whitening matters only with the frozen base (interaction); dia adds 0.1 everywhere (no interaction)
    table = {}
    for f in (True, False):
        for w in (True, False):
            for d in (True, False):
                table[(f, w, d)] = 0.5 + (0.2 if f and w else 0.0) + (0.1 if d else 0.0)
    components = FA.resolve_components(["whitening", "dia"])
    seeds = [0, 1, 2, 3]
    runner = R.Runner(preset("offline"), tiny_tasks(), tmp_path, execute=FakeExperiment(table))
    runs = FA.run_cells(runner, FA.factorial_cells(components), components, seeds)
    rows = {r["component"]: r for r in FA.interaction_rows(runs, components, seeds, "oracle")}

    offsets = [0.01 * np.sin(3.0 * s + 1.0) for s in seeds]
    whitening_cells = {(f, on): [table[(f, on, True)] + o for o in offsets] for f in (True, False) for on in (True, False)}
    w = rows["whitening"]
    assert w["f"] == pytest.approx(_hand_interaction_f(whitening_cells), rel=1e-6)
    assert w["p_bonferroni"] == pytest.approx(min(1.0, 2 * w["p"]))
    assert w["category"] == "core" and w["p"] < 1e-6
    assert w["component_effect"] == pytest.approx(0.1)  # mean(on) - mean(off) = (0.2 + 0) / 2
    assert w["frozen_effect"] == pytest.approx(0.1)
    assert w["cells"]["frozen_on"]["mean"] == pytest.approx(0.8 + np.mean(offsets))
    d = rows["dia"]
    assert d["f"] == pytest.approx(0.0, abs=1e-6) and d["category"] == "general"
    assert d["component_effect"] == pytest.approx(0.1)
    assert d["anova"]["component"]["p"] < 1e-6  # the dia main effect itself is strong


def test_ablation_reports_paired_differences(tmp_path):
    table = {
        (f, w, d): 0.6 - (0.05 if not w else 0.0) - (0.02 if not d else 0.0)
        for f in (True, False)
        for w in (True, False)
        for d in (True, False)
    }
    components = FA.resolve_components(["whitening", "dia"])
    fake = FakeExperiment(table)
    runner = R.Runner(preset("offline"), tiny_tasks(), tmp_path, execute=fake)
    runs = FA.run_cells(runner, FA.ablation_cells(components), components, [0, 1])
    rows = {r["component"]: r for r in FA.ablation_rows(runs, components, [0, 1], "routed")}
    assert len(fake.calls) == 2 * 3 and all(c.train.base_policy == "frozen_after_first" for c in fake.calls)
    assert rows["whitening"]["delta"]["mean"] == pytest.approx(-0.05)
    assert rows["whitening"]["delta"]["std"] == pytest.approx(0.0, abs=1e-12)  # same seed offset cancels
    assert rows["dia"]["delta"]["mean"] == pytest.approx(-0.02)


def test_interaction_command_writes_json_markdown_and_figure(tmp_path, monkeypatch):
    table = {(f, w, d): 0.4 + (0.1 if f and w else 0.0) for f in (True, False) for w in (True, False) for d in (True, False)}
    monkeypatch.setattr(R, "execute_experiment", FakeExperiment(table))
    parser = argparse.ArgumentParser()
    FA.register(parser.add_subparsers())
    out = tmp_path / "out"
    args = parser.parse_args(
        ["interaction", "--tasks", "synthetic:stripes,synthetic:disc", "--limits", "3,2", "--components", "whitening",
         "--seeds", "2", "--out", str(out), "--json", str(tmp_path / "x.json")]
    )  # fmt: skip
    assert args.func(args) == 0
    data = json.loads((tmp_path / "x.json").read_text())
    assert [r["component"] for r in data["components"]] == ["whitening"]
    assert len(data["runs"]) == 2 * 4 and data["setup"]["seeds"] == [0, 1]
    assert data["components"][0]["cells"]["unfrozen_on"]["mean"] == pytest.approx(
        0.4 + np.mean([0.01 * np.sin(1), 0.01 * np.sin(4)])
    )
    assert "| whitening |" in (out / "interaction.md").read_text()
    assert (out / "interaction.png").read_bytes()[:4] == b"\x89PNG"

    bad = parser.parse_args(["interaction", "--out", str(out)])
    with pytest.raises(ValueError, match="--tasks"):
        bad.func(bad)


def test_seed_changes_a_real_run_and_repeats_it_exactly(tmp_path):
    cfg = apply_overrides(
        preset("offline"),
        ["train.epochs=1", "train.batch_size=4", "model.flow.coupling_layers=2", "model.backbone.image_size=64"],
    )
    tasks = [make_synthetic_task(k, n_train=4, n_test=4, size=64) for k in ("stripes", "disc")]
    cache = tmp_path / "cache"
    first = R.Runner(cfg, tasks, tmp_path / "a", feature_cache=cache).run(seed=0)
    repeat = R.Runner(cfg, tasks, tmp_path / "b", feature_cache=cache).run(seed=0)
    other = R.Runner(cfg, tasks, tmp_path / "a", feature_cache=cache).run(seed=1)
    assert repeat.final_mean == first.final_mean and repeat.key == first.key
    assert other.key != first.key
    a = json.loads((tmp_path / "a" / "runs" / first.key / "results.json").read_text())
    b = json.loads((tmp_path / "a" / "runs" / other.key / "results.json").read_text())
    assert a["thresholds"] != b["thresholds"]  # another initialisation and batch order
    assert first.primary_forgetting["oracle"] == 0.0  # frozen base: earlier tasks do not change
