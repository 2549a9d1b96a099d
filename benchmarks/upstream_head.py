"""Our flow head against the public upstream MoLE-Flow head (crimama/moleflow), side by side in one process.

    python benchmarks/upstream_head.py PATH [--batch 8] [--repeats 10] [--threads 1] [--compile] [--json OUT]

``PATH`` is a checkout of the upstream code (a directory holding ``moleflow/models/mole_nf.py``); it is
not a dependency of this repository, and without it the script says so and exits 0. The upstream package
is also called ``moleflow``: it is imported with our modules set aside and then kept under private
names, so both live in one process.

What is compared, at the v5 sizes (D = 768, 14 x 14 patches, 8 couplings, LoRA rank 64 with alpha 1, an
MLP subnet D/2 -> D -> D, whitening adapter, spatial mixer, a 2-block DIA), on the same random features,
the same dtype and the same number of threads:

- ``train``: one optimisation step of the first task (base trainable): forward, the tail-aware loss
  (0.7 x mean patch NLL + 0.3 x mean of the top 5 % of the batch's patches, the whitening identity
  penalty), backward, global-norm clipping at 1.0 and an AdamW step over each head's trainable parameters.
- ``inference``: patch scores ``0.5 |z|^2 - log|det J|`` of a batch under ``torch.inference_mode`` in
  eval mode, each head as its code runs it (ours folds the LoRA adapters into the weights).

Upstream runs in float32, as its code does. Ours runs at each ``--precision`` given: fp32, and bf16
(``train.precision`` / ``scoring.precision``, moleflow.precision: matmuls under CPU autocast, latents and
log-dets float32), so the bf16 rows are ours in bf16 against upstream in fp32. Repetitions alternate
between the heads (upstream, ours, ours, upstream, ...) so a shared machine's load weighs on both; the
reported ratio is the median of the per-pair ratios. ``--compile`` adds rows with ours under
``torch.compile`` (inductor, static shapes; the training step's forward and loss compiled, its backward
through AOTAutograd), each with the seconds its first call took.
The heads differ in design, not only in speed: FrEIA's ``AllInOneBlock(permute_soft=True)`` multiplies
by a dense D x D rotation in every coupling where ours gathers a permutation, and upstream's DIA has two
3-layer subnets per block where ours has one 2-layer subnet; the analytic matmul FLOPs of each head are
printed so that the two sources of the ratio (less work, faster work) can be told apart.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch

from moleflow.atomic import write_json_atomic
from moleflow.config import apply_overrides, preset
from moleflow.losses import patch_nll, tail_mean
from moleflow.perf.flops import head_flops
from moleflow.perf.sections import build_head, random_features
from moleflow.precision import autocast
from moleflow.scoring import patch_scores
from moleflow.training import ContinualTrainer, build_optimizer

GRID = (14, 14)


def import_upstream(path: Path) -> ModuleType:
    """Upstream's ``moleflow.models.mole_nf``, imported from ``path`` beside our own ``moleflow``."""
    ours = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "moleflow" or k.startswith("moleflow.")}
    sys.path.insert(0, str(path))
    try:
        module = importlib.import_module("moleflow.models.mole_nf")
    finally:
        sys.path.remove(str(path))
        theirs = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "moleflow" or k.startswith("moleflow.")}
        sys.modules.update(ours)
        sys.modules.update({f"_upstream_{k}": v for k, v in theirs.items()})
    return module


def upstream_head(mole_nf: ModuleType, dim: int, couplings: int, rank: int) -> torch.nn.Module:
    """Upstream's head in its v5 configuration (whitening adapter, depthwise-residual mixer, DIA, MLP subnet)."""
    ablation = SimpleNamespace(
        use_lora=True,
        use_task_adapter=True,
        use_task_bias=True,
        adapter_mode="whitening",
        soft_ln_init_scale=0.01,
        use_spatial_context=True,
        spatial_context_mode="depthwise_residual",
        spatial_context_kernel=3,
        use_scale_context=False,
        scale_context_kernel=3,
        scale_context_init_scale=0.1,
        scale_context_max_alpha=0.2,
        use_ms_context=False,
        ms_context_dilations=(1, 2, 4),
        ms_context_use_regional=True,
        use_whitening_adapter=True,
        use_adaptive_unfreeze=False,
        adaptive_unfreeze_ratio=0.4,
        use_dia=True,
        dia_n_blocks=2,
        dia_hidden_ratio=0.5,
        use_task_conditioned_ms_context=False,
        tc_ms_context_dilations=(1, 2, 4),
        tc_ms_context_use_regional=True,
        tc_ms_context_lora_rank=16,
    )
    torch.manual_seed(0)
    stdout = sys.stdout
    with open(os.devnull, "w") as quiet:  # upstream prints a banner per component
        sys.stdout = quiet
        try:
            model = mole_nf.MoLESpatialAwareNF(dim, couplings, 1.9, rank, 1.0, "cpu", ablation)
            model.add_task(0)
        finally:
            sys.stdout = stdout
    return model


def upstream_flops(dim: int, couplings: int, rank: int, grid: tuple[int, int], with_lora: bool) -> int:
    """Analytic matmul + conv FLOPs per image of upstream's v5 head (same convention as ``head_flops``)."""
    half, hidden, dia_hidden = dim // 2, dim, dim // 2
    lora = 2 * rank * ((half + hidden) + (hidden + dim)) if with_lora else 0
    block = 2 * (half * hidden + hidden * dim) + lora + 2 * dim * dim  # subnet + soft permutation
    dia = 2 * 2 * 2 * (half * dia_hidden + dia_hidden * dia_hidden + dia_hidden * half)  # 2 blocks x (s, t) nets
    per_patch = couplings * block + dia + 2 * 9 * dim  # + the mixer's depthwise 3x3
    return per_patch * grid[0] * grid[1]


def _upstream_loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    z, logdet = model(x)
    nll = patch_nll(z.float(), logdet.float())
    loss = 0.7 * nll.mean() + 0.3 * tail_mean(nll, 0.05, "batch")
    return loss + model.input_adapters["0"].identity_regularization()


def _train_steps(theirs: torch.nn.Module, ours: torch.nn.Module, feats, cfg) -> dict[str, Callable[[], None]]:
    """One training step per head; both AdamW at the v5 learning rate, clipped at 1.0."""
    x = feats.patches
    ours.set_trainable("t0", train_base=True)
    groups = ours.parameter_groups("t0", train_base=True)
    our_params = [p for ps in groups.values() for p in ps]
    our_opt = build_optimizer(groups, cfg.train)
    trainer = ContinualTrainer(ours, None, cfg)
    their_params = list(dict.fromkeys(theirs.get_trainable_params(0)))
    their_opt = torch.optim.AdamW(their_params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    def step(loss_fn: Callable[[], torch.Tensor], params, opt) -> None:
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return {
        "upstream": lambda: step(lambda: _upstream_loss(theirs, x), their_params, their_opt),
        "ours": lambda: step(lambda: trainer.objective(feats, "t0", trains_base=True)[0], our_params, our_opt),
    }


def _inference_steps(theirs: torch.nn.Module, ours: torch.nn.Module, feats, precision: str) -> dict[str, Callable]:
    def upstream() -> torch.Tensor:
        z, logdet = theirs(feats.patches)
        return patch_scores(z, logdet)

    def our() -> torch.Tensor:  # as moleflow.inference.score_features runs the head, without the router
        with autocast("cpu", precision):
            out = ours(feats.patches, "t0", None)
        return patch_scores(out.z, out.logdet)

    return {"upstream": upstream, "ours": our}


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, context: Callable) -> dict[str, object]:
    """Median seconds per function and the median of the per-pair ratios upstream / ours."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with context():
        for fn in fns.values():  # warm-up
            fn()
        for rep in range(repeats):
            order = list(fns) if rep % 2 == 0 else list(reversed(fns))
            for name in order:
                start = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - start)
    ratios = [u / o for u, o in zip(times["upstream"], times["ours"], strict=True)]
    return {
        "upstream_ms": 1e3 * statistics.median(times["upstream"]),
        "ours_ms": 1e3 * statistics.median(times["ours"]),
        "speedup": statistics.median(ratios),
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
    }


def compiled(fns: dict[str, Callable[[], object]], context: Callable) -> tuple[dict[str, Callable[[], object]], float]:
    """``fns`` with ours under ``torch.compile`` (inductor, static shapes) and the seconds its first call took
    (tracing and code generation; a later process reuses inductor's on-disk cache)."""
    ours = torch.compile(fns["ours"], dynamic=False)
    with context():
        start = time.perf_counter()
        ours()
        seconds = time.perf_counter() - start
    return {"upstream": fns["upstream"], "ours": ours}, seconds


def step_rows(step: str, precision: str, steps: dict[str, Callable[[], object]], context: Callable, repeats: int,
              compile_ours: bool) -> list[dict]:  # fmt: skip
    """The row of ``step`` with ours at ``precision``; with ``compile_ours`` also ours compiled (same parameters
    and optimizer state)."""
    rows = [{"step": step, "upstream": "fp32", "ours": precision, **interleaved(steps, repeats, context)}]
    if compile_ours:
        steps, seconds = compiled(steps, context)
        row = interleaved(steps, repeats, context)
        rows.append({"step": step, "upstream": "fp32", "ours": f"{precision}+compile", "compile_s": seconds, **row})
    return rows


def compare(
    path: Path, batch: int, repeats: int, precisions: tuple[str, ...] = ("fp32", "bf16"), compile_ours: bool = False
) -> dict:
    mole_nf = import_upstream(path)
    cfg = preset("v5")
    dim, couplings, rank = cfg.model.backbone.embed_dim, cfg.model.flow.coupling_layers, cfg.model.flow.lora.rank
    feats = random_features(cfg, batch, torch.device("cpu"), GRID)
    result: dict = {
        "sizes": {"embed_dim": dim, "couplings": couplings, "lora_rank": rank, "batch": batch, "grid": list(GRID)},
        "threads": torch.get_num_threads(),
        "load_average_before": os.getloadavg(),
        "flops_per_image": {
            "ours_train": 3 * head_flops(cfg.model, GRID),
            "upstream_train": 3 * upstream_flops(dim, couplings, rank, GRID, with_lora=True),
            "ours_inference": head_flops(cfg.model, GRID, with_lora=False),
            "upstream_inference": upstream_flops(dim, couplings, rank, GRID, with_lora=True),
        },
        "rows": [],
    }
    for precision in precisions:
        ours_cfg = apply_overrides(cfg, [f"train.precision={precision}", f"scoring.precision={precision}"])
        theirs, ours = upstream_head(mole_nf, dim, couplings, rank), build_head(ours_cfg, torch.device("cpu"))
        theirs.train(), ours.train()
        rows = step_rows(
            "train", precision, _train_steps(theirs, ours, feats, ours_cfg), contextlib.nullcontext, repeats, compile_ours
        )
        theirs.eval(), ours.eval()
        ours.set_trainable(None, train_base=False)
        steps = _inference_steps(theirs, ours, feats, ours_cfg.scoring.precision)
        rows += step_rows("inference", precision, steps, torch.inference_mode, repeats, compile_ours)
        result["rows"] += rows
    result["load_average_after"] = os.getloadavg()
    return result


def _table(result: dict) -> str:
    lines = [
        f"v5 sizes {result['sizes']}, {result['threads']} thread(s), load average {result['load_average_before'][0]:.2f} "
        f"before / {result['load_average_after'][0]:.2f} after",
        "| step | upstream | ours | upstream ms | ours ms | speed-up (median of pairs) | min - max | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
        lines.append(
            f"| {r['step']} | {r['upstream']} | {r['ours']} | {r['upstream_ms']:.1f} | {r['ours_ms']:.1f} "
            f"| {r['speedup']:.2f}x | {r['speedup_min']:.2f} - {r['speedup_max']:.2f} | {compile_s} |"
        )
    f = result["flops_per_image"]
    lines.append(
        f"matmul GFLOP per image: train ours {f['ours_train'] / 1e9:.2f} / upstream {f['upstream_train'] / 1e9:.2f}, "
        f"inference ours {f['ours_inference'] / 1e9:.2f} / upstream {f['upstream_inference'] / 1e9:.2f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "upstream", type=Path, nargs="?", help="a checkout of crimama/moleflow (holds moleflow/models/mole_nf.py)"
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both", help="ours; upstream runs fp32")
    p.add_argument("--compile", action="store_true", help="also ours under torch.compile (inductor), with the compile time")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.upstream is None or not (args.upstream / "moleflow" / "models" / "mole_nf.py").is_file():
        print(
            f"upstream_head: skipped: no upstream checkout at {args.upstream} "
            "(give the directory holding moleflow/models/mole_nf.py)"
        )
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = ("fp32", "bf16") if args.precision == "both" else (args.precision,)
    result = compare(args.upstream, args.batch, args.repeats, precisions, compile_ours=args.compile)
    print(_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
