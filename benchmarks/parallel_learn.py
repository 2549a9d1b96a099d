"""Wall time of learning 8 small products one by one against ``--parallel ray``, on this machine.

A base run (one product, which trains the shared base) is made once; each variant then learns the same 8
products into its own copy with ``moleflow learn ... --eval none`` in a fresh process, timed from start to
exit (Ray's start-up included, as a user sees it). The products are the 4 synthetic kinds twice (names
differ, so seeds differ), offline preset, ``--limits 40,20``, ``train.epochs`` as given.

    OMP_NUM_THREADS=1 python benchmarks/parallel_learn.py --out runs/parallel-bench --json parallel.json

Variants: ``sequential-1t`` / ``sequential-2t`` (no Ray, torch at 1 / 2 threads), ``ray-1cpu`` (tasks of 1 CPU
and 1 thread: up to 2 at once on 2 cores), ``ray-2cpu`` (tasks of 2 CPUs: one at a time). The products of
``ray-1cpu`` are checked bit for bit against ``sequential-1t`` (same thread count). Per-product seconds
(features / train / calibration) come from the run's records: the basis of the estimate for 1,000 products in
docs/PERFORMANCE.md ("Many products in parallel").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("stripes", "dots", "grid", "disc")
VARIANTS = {
    "sequential-1t": ({"OMP_NUM_THREADS": "1"}, []),
    "sequential-2t": ({"OMP_NUM_THREADS": "2"}, []),
    "ray-1cpu": ({"OMP_NUM_THREADS": "1"}, ["--parallel", "ray", "--cpus-per-task", "1"]),
    "ray-2cpu": ({"OMP_NUM_THREADS": "2"}, ["--parallel", "ray", "--cpus-per-task", "2"]),
}


def _learn(run: Path, products: list[str], env: dict[str, str], extra: list[str], epochs: int) -> float:
    argv = [sys.executable, "-m", "moleflow", "learn", str(run), *products, "--eval", "none", "--limits", "40,20"]
    argv += ["--no-progress", "--set", f"train.epochs={epochs}", *extra]
    start = time.perf_counter()
    proc = subprocess.run(argv, env={**os.environ, **env, "PYTHONPATH": str(ROOT / "src")}, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return seconds


def _products_equal(a: Path, b: Path, names: list[str]) -> bool:
    import torch

    from moleflow.detector import Detector

    da, db = Detector.load(a), Detector.load(b)
    for name in names:
        pa, pb = da.export_product(name), db.export_product(name)
        same = all(torch.equal(pa.parts[k], pb.parts[k]) for k in pa.parts) and torch.equal(pa.precision, pb.precision)
        if not same or pa.record.calibration.to_json() != pb.record.calibration.to_json():
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/parallel-bench"))
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    base = args.out / "base"
    if not (base / "tasks.json").is_file():
        shutil.rmtree(base, ignore_errors=True)
        took = _learn(base, ["base=synthetic:stripes"], {"OMP_NUM_THREADS": "1"}, [], args.epochs)
        print(f"base run (1 product, trains the shared base): {took:.1f} s", flush=True)
    names = [f"{kind}{i}" for i in range(2) for kind in KINDS]
    products = [f"{name}=synthetic:{name[:-1]}" for name in names]
    rows = {}
    for variant in args.variants:
        env, extra = VARIANTS[variant]
        run = args.out / variant
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(base, run)
        rows[variant] = {"wall_s": _learn(run, products, env, extra, args.epochs)}
        records = json.loads((run / "tasks.json").read_text())["tasks"]
        per = [r["seconds"] for r in records if r["name"] in names]
        rows[variant]["per_product_s"] = {k: sum(s[k] for s in per) / len(per) for k in per[0]}
        print(
            f"{variant:14s} 8 products: {rows[variant]['wall_s']:6.1f} s wall; per product (mean) "
            + ", ".join(f"{k} {v:.2f} s" for k, v in rows[variant]["per_product_s"].items()),
            flush=True,
        )
    if {"sequential-1t", "ray-1cpu"} <= set(rows):
        same = _products_equal(args.out / "sequential-1t", args.out / "ray-1cpu", names)
        rows["ray-1cpu"]["bit_identical_to_sequential-1t"] = same
        print(f"ray-1cpu products bit for bit those of sequential-1t: {same}")
    if args.json:
        args.json.write_text(json.dumps({"epochs": args.epochs, "cpus": os.cpu_count(), "variants": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
