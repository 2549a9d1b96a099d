"""The flow head of this checkout against the head of another moleflow source tree, in one process.

    git archive COMMIT src | tar -x -C /tmp/before
    OMP_NUM_THREADS=1 python benchmarks/head_ab.py /tmp/before/src [--presets offline,v5] [--batch 8]
        [--steps train,train_frozen,inference] [--bf16] [--repeats 8] [--json OUT]

Both heads get the same weights (the other tree's model loads this one's state dict, whose keys are the
same; every parameter perturbed so that the adapters are non-zero) and the same random features. Timed
interleaved (before, after, after, before, ...) so that a shared machine's load weighs on both arms:

- ``train``: one training step of the first task, base trainable (the trainer's objective, backward,
  clipping at 1.0, the preset's optimizer), every repetition from the same weights;
- ``train_frozen``: the same for a second task, base frozen (only its adapters, whitening and DIA train);
- ``inference``: patch scores of the first task under ``torch.inference_mode``.

``--bf16`` adds, for this checkout alone, bf16 autocast against its own fp32 (``moleflow.precision``).
Reported: median times, the median of the per-pair ratios (before / after: > 1 means this checkout is
faster), and the largest difference of the outputs (patch scores; the loss of a training step) relative
to their largest magnitude.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from moleflow.atomic import write_json_atomic
from moleflow.config import apply_overrides, preset
from moleflow.perf.sections import build_head, random_features
from moleflow.precision import autocast
from moleflow.scoring import patch_scores
from moleflow.training import ContinualTrainer, build_optimizer

STEPS = ("train", "train_frozen", "inference")


def import_tree(src: Path) -> dict[str, ModuleType]:
    """``moleflow.flow.model``, ``moleflow.training`` and ``moleflow.config`` of another source tree."""
    ours = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "moleflow" or k.startswith("moleflow.")}
    sys.path.insert(0, str(src))
    try:
        mods = {name: importlib.import_module(f"moleflow.{name}") for name in ("flow.model", "training", "config")}
    finally:
        sys.path.remove(str(src))
        theirs = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "moleflow" or k.startswith("moleflow.")}
        sys.modules.update(ours)
        sys.modules.update({f"_before_{k}": v for k, v in theirs.items()})
    return mods


def _models(mods: dict[str, ModuleType], name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(before, after): two tasks t0, t1 with the same perturbed weights in both heads."""
    after = build_head(preset(name), torch.device("cpu"), tasks=2)
    with torch.no_grad():  # trained tasks: non-zero adapters, so that merging and the low-rank path both matter
        for p in after.parameters():
            p.add_(0.01 * torch.randn_like(p))
    before = mods["flow.model"].MoLEFlow(mods["config"].preset(name).model, None)
    for task in ("t0", "t1"):
        before.add_task(task)
    before.load_state_dict(after.state_dict())
    return before.eval(), after.eval()


def _train_step(model, trainer_cls, optimizer_fn, cfg, feats, task: str) -> Callable[[], float]:
    base = task == "t0"
    model.set_trainable(task, train_base=base)
    groups = model.parameter_groups(task, train_base=base)
    params = [p for ps in groups.values() for p in ps]
    optimizer = optimizer_fn(groups, cfg.train)
    trainer = trainer_cls(model, None, cfg)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def step() -> float:
        model.set_trainable(task, train_base=base)  # the two heads' steps may share one model (bf16 rows)
        model.train()
        loss, _ = trainer.objective(feats, task, trains_base=base)  # at cfg.train.precision (this tree)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        with torch.no_grad():  # every repetition from the same weights: each step's loss is comparable
            optimizer.step()
            model.load_state_dict(start)
        return float(loss.detach())

    return step


def _score(model, feats, precision: str) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        model.eval()
        with torch.inference_mode(), autocast("cpu", precision):
            out = model(feats.patches, "t0", None)
            return patch_scores(out.z, out.logdet)

    return run


def interleaved(a: Callable, b: Callable, repeats: int) -> dict:
    """Median ms of ``a`` and ``b``, the median of the per-pair ratios a / b, the outputs' difference."""
    a(), b()
    ta, tb, outs = [], [], {}
    for rep in range(repeats):
        for label, fn, times in (("a", a, ta), ("b", b, tb)) if rep % 2 == 0 else (("b", b, tb), ("a", a, ta)):
            start = time.perf_counter()
            outs[label] = fn()
            times.append(time.perf_counter() - start)
    ratios = [x / y for x, y in zip(ta, tb, strict=True)]
    oa, ob = outs["a"], outs["b"]
    if isinstance(oa, torch.Tensor):
        diff = float((oa.float() - ob.float()).abs().max() / ob.float().abs().max())
    else:
        diff = abs(oa - ob) / abs(ob)
    return {
        "a_ms": 1e3 * statistics.median(ta),
        "b_ms": 1e3 * statistics.median(tb),
        "speedup": statistics.median(ratios),
        "max_rel_diff": diff,
    }


def _arms(mods, name: str, step: str, batch: int, bf16: bool) -> list[tuple[str, Callable, str, Callable]]:
    """The pairs to time for one preset and step: (label, fn, label, fn); this tree's bf16 if ``bf16``."""
    before, after = _models(mods, name)
    cfg, cfg_before = preset(name), mods["config"].preset(name)
    feats = random_features(cfg, batch, torch.device("cpu"))
    if step == "inference":
        other, this = _score(before, feats, "fp32"), _score(after, feats, "fp32")
        this_bf16 = (lambda: _score(after, feats, "bf16")) if bf16 else None
    else:
        task = "t0" if step == "train" else "t1"
        theirs = mods["training"].ContinualTrainer, mods["training"].build_optimizer
        other = _train_step(before, *theirs, cfg_before, feats, task)
        this = _train_step(after, ContinualTrainer, build_optimizer, cfg, feats, task)
        cfg_bf16 = apply_overrides(cfg, ["train.precision=bf16"]) if bf16 else None
        this_bf16 = (lambda: _train_step(after, ContinualTrainer, build_optimizer, cfg_bf16, feats, task)) if bf16 else None
    pairs = [("other tree fp32", other, "this fp32", this)]
    if this_bf16 is not None:
        pairs.append(("this fp32", this, "this bf16", this_bf16()))
    return pairs


def run(src: Path, presets: list[str], steps: list[str], batch: int, repeats: int, bf16: bool) -> dict:
    mods = import_tree(src)
    rows = []
    load_before = os.getloadavg()
    for name in presets:
        for step in steps:
            for before, a, after, b in _arms(mods, name, step, batch, bf16):
                rows.append({"preset": name, "step": step, "before": before, "after": after, **interleaved(a, b, repeats)})
    return {
        "other_tree": str(src),
        "batch": batch,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="the other tree's src directory (holding moleflow/)")
    p.add_argument("--presets", default="offline,v5")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--bf16", action="store_true", help="also time this checkout under bf16 autocast")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    steps = args.steps.split(",")
    if unknown := sorted(set(steps) - set(STEPS)):
        p.error(f"--steps: unknown {', '.join(unknown)}; use {', '.join(STEPS)}")
    result = run(args.src, args.presets.split(","), steps, args.batch, args.repeats, args.bf16)
    print(
        f"batch {result['batch']}, {result['threads']} thread(s), load average "
        f"{result['load_average_before'][0]:.2f} before / {result['load_average_after'][0]:.2f} after"
    )
    print("| preset | step | before | after | before ms | after ms | speed-up | max rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(
            f"| {r['preset']} | {r['step']} | {r['before']} | {r['after']} | {r['a_ms']:.1f} | {r['b_ms']:.1f} "
            f"| {r['speedup']:.2f}x | {r['max_rel_diff']:.1e} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
