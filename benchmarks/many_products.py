"""How a run with many products loads: time and memory of ``Detector.load`` against the number of products.

The runs are synthetic: the base and every product's parts are the model's own initialisation plus random
noise, the prototypes shaped like real ones (``moleflow.perf.sections.synthetic_router``), the calibrations
fitted on random values; no
image is read and nothing is trained, so a 1,000-product run is written in about a minute. Files, shapes and
records are exactly those of a learned run of the same config (the offline preset by default).

    python benchmarks/many_products.py build runs/many --products 1000
    python benchmarks/many_products.py measure runs/many-{125,250,500,1000} --json many.json
    python benchmarks/many_products.py sweep runs/many --sizes 125 250 500 1000 --json many.json

``measure`` loads each run in a fresh process (``--lazy`` too: product parts read on first use) and
reports the seconds of ``Detector.load``, the resident memory it added (peak RSS after minus before), the run's
size on disk, and the time to route and score one image (docs/PERFORMANCE.md, "Many products").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def build(run_dir: Path, products: int, config: str = "offline", seed: int = 0) -> float:
    """Write a run of ``products`` synthetic products to ``run_dir`` (new); returns the seconds it took."""
    from moleflow.calibration import Calibration
    from moleflow.checkpoint import new_id, save_base, save_router, save_task, task_file
    from moleflow.config import load_config
    from moleflow.detector import Detector
    from moleflow.perf.sections import synthetic_router
    from moleflow.rundir import RunDirectory, RunIndex, TaskRecord
    from moleflow.training import router_dim

    start = time.perf_counter()
    cfg = load_config(config)
    detector = Detector.create(cfg, run_dir, progress=False)
    model, router, run = detector.model, detector.router, RunDirectory(run_dir)
    base_id, gen, rng = new_id(), torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    settings = detector.scoring_settings()
    # prototypes like real ones
    shaped, _ = synthetic_router(cfg, router_dim(cfg, 0), products, torch.device("cpu"), seed=seed)
    records = []
    for i in range(products):
        name = f"p{i:04d}"
        model.add_task(name)
        with torch.no_grad():
            for key, p in model.named_parameters():
                if f".{name}" in key or key.endswith(name):
                    p.add_(0.01 * torch.randn(p.shape, generator=gen))
        router.add(name, shaped.means[i], shaped.precisions[i])
        cal = Calibration.fit(
            method="holdout",
            scoring=settings,
            scores=rng.normal(10, 1, 20),
            distances=rng.lognormal(5, 0.3, 20),
            pixels=rng.normal(1, 0.2, (20, 32, 32)),
            image_fpr=0.01,
            pixel_fpr=0.01,
            unknown_fpr=0.01,
            unknown_margin=10.0,
            global_weight=cfg.scoring.global_weight,
        )
        record = TaskRecord(name, "synthetic (random parts)", "2026-01-01T00:00:00+00:00", 80, i, cal, new_id())
        save_task(model, router, cfg, name, task_file(run.checkpoints, name), base_id, record.parts_id)
        model.remove_task(name)  # keep the builder's memory flat; the file holds the product
        router.remove(name)
        records.append(record)
        if i == 0:
            save_base(model, cfg, run.checkpoints, base_id)
    router.extend([r.name for r in records], shaped.means, shaped.precisions)
    with run.writing():
        save_router(router, cfg, run.checkpoints, base_id, [r.parts_id for r in records])
        run.write_index(RunIndex(base_id=base_id, tasks=records))
    return time.perf_counter() - start


def _rss_mb() -> float:
    """Current resident memory of this process (MiB), from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_one(run_dir: Path, lazy: bool) -> dict:
    """In this (fresh) process: load ``run_dir`` and score one image routed to a product."""
    from moleflow.detector import Detector
    from moleflow.features.cache import CachedFeatures
    from moleflow.flow.model import MoLEFlow  # noqa: F401  (imported before the baseline is taken)

    torch.set_num_threads(1)
    before = _rss_mb()
    start = time.perf_counter()
    detector = Detector.load(run_dir, lazy=lazy) if lazy else Detector.load(run_dir)
    load_s = time.perf_counter() - start
    after = _rss_mb()
    dim, grid = detector.cfg.model.backbone.embed_dim, 14
    mean = detector.router.means[len(detector) // 2].float()  # an image of a product in the middle of the run
    noise = torch.randn(1, grid, grid, dim, generator=torch.Generator().manual_seed(0))
    if detector.cfg.router.feature == "patch_moments":  # patches whose channel means and spreads are the prototype's
        noise = (noise - noise.mean(dim=(1, 2), keepdim=True)) / noise.flatten(1, 2).std(dim=1)[:, None, None]
        patches = mean[:dim] + mean[dim:].abs() * noise
    else:  # routing feature ~ that product's mean
        patches = mean - detector.model.positional(grid, grid, noise) + 0.5 * noise
    feats = CachedFeatures(patches, None, patches.mean(dim=(1, 2)))
    start = time.perf_counter()
    scored = detector.score(feats)  # first routed image: the router index is built, the product read if lazy
    first_s = time.perf_counter() - start
    assert int(scored.task_index[0]) == len(detector) // 2, "the probe image was not routed to its product"
    start = time.perf_counter()
    for _ in range(5):
        detector.score(feats)
    score_s = (time.perf_counter() - start) / 5
    files = list(Path(run_dir).rglob("*"))
    return {
        "products": len(detector),
        "lazy": lazy,
        "load_s": load_s,
        "load_rss_mb": after - before,
        "first_image_s": first_s,
        "image_s": score_s,
        "rss_after_scoring_mb": _rss_mb() - before,
        "disk_mb": sum(p.stat().st_size for p in files if p.is_file()) / 2**20,
        "index_mb": (Path(run_dir) / "tasks.json").stat().st_size / 2**20,
        "router_mb": (Path(run_dir) / "checkpoints" / "router.safetensors").stat().st_size / 2**20,
    }


def measure_commit(run_dir: Path, repeats: int = 3) -> dict:
    """Seconds the driver spends committing one more product into a copy of ``run_dir``: the product file and
    the index (what ``learn --parallel`` does per product), and the same with the router file rewritten."""
    import dataclasses
    import shutil
    import tempfile

    from moleflow.checkpoint import new_id
    from moleflow.detector import Detector

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=Path(run_dir).parent) as tmp:
        copy = Path(tmp) / "run"
        shutil.copytree(run_dir, copy)
        detector = Detector.load(copy)
        product = detector.export_product(detector.products[0])
        out = {"products": len(detector)}
        for key, write_router in (("commit_s", False), ("commit_with_router_s", True)):
            times = []
            for k in range(repeats):
                name = f"new{int(write_router)}{k}"
                record = dataclasses.replace(product.record, name=name, parts_id=new_id())
                detector.adopt(dataclasses.replace(product, record=record), commit=False)
                start = time.perf_counter()
                detector.commit(write_router=write_router)
                times.append(time.perf_counter() - start)
            out[key] = sorted(times)[len(times) // 2]
        from moleflow.session import RunSession

        start = time.perf_counter()
        text = json.dumps(RunSession(detector).results())  # results.json of the run, nothing evaluated yet
        out["results_json_s"], out["results_json_mb"] = time.perf_counter() - start, len(text) / 2**20
    return out


def measure(run_dirs: list[Path], lazy_too: bool = True, commit: bool = True) -> list[dict]:
    """:func:`measure_one` of each run, each in its own process (so that memory is not shared)."""
    rows = []
    for run_dir in run_dirs:
        for lazy in (False, True) if lazy_too else (False,):
            code = (
                "import json, sys; from benchmarks.many_products import measure_one as m; "
                f"print(json.dumps(m(sys.argv[1], {lazy})))"
            )
            out = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                raise SystemExit(out.stderr)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(_fmt(rows[-1]), flush=True)
        if not commit:
            continue
        row = measure_commit(run_dir)
        rows.append(row)
        print(
            f"{row['products']:5d} products: commit one more {row['commit_s'] * 1000:.0f} ms, "
            f"with the router file rewritten {row['commit_with_router_s'] * 1000:.0f} ms; results.json "
            f"{row['results_json_mb']:.1f} MiB in {row['results_json_s']:.2f} s",
            flush=True,
        )
    return rows


def _fmt(row: dict) -> str:
    return (
        f"{row['products']:5d} products {'lazy ' if row['lazy'] else 'eager'}: load {row['load_s']:7.2f} s, "
        f"+{row['load_rss_mb']:7.1f} MiB, first image {row['first_image_s'] * 1000:7.1f} ms, then "
        f"{row['image_s'] * 1000:6.1f} ms, disk {row['disk_mb']:7.1f} MiB (index {row['index_mb']:.1f}, "
        f"router {row['router_mb']:.1f})"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("run_dir", type=Path)
    b.add_argument("--products", type=int, default=1000)
    b.add_argument("--config", default="offline")
    m = sub.add_parser("measure")
    m.add_argument("run_dirs", type=Path, nargs="+")
    m.add_argument("--eager-only", action="store_true")
    m.add_argument("--load-only", action="store_true", help="eager loading only (runs with older moleflow code)")
    m.add_argument("--json", type=Path)
    s = sub.add_parser("sweep", help="build RUN_DIR-N for every size, then measure them all")
    s.add_argument("run_dir", type=Path)
    s.add_argument("--sizes", type=int, nargs="+", default=[125, 250, 500, 1000])
    s.add_argument("--config", default="offline")
    s.add_argument("--eager-only", action="store_true")
    s.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.command == "build":
        print(
            f"built {args.run_dir} with {args.products} products in {build(args.run_dir, args.products, args.config):.1f} s"
        )
        return 0
    dirs = args.run_dirs if args.command == "measure" else []
    if args.command == "sweep":
        for n in args.sizes:
            run_dir = Path(f"{args.run_dir}-{n}")
            if not (run_dir / "tasks.json").is_file():
                print(f"built {run_dir} in {build(run_dir, n, args.config):.1f} s", flush=True)
            dirs.append(run_dir)
    load_only = getattr(args, "load_only", False)
    rows = measure(dirs, lazy_too=not (args.eager_only or load_only), commit=not load_only)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
