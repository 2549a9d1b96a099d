"""CPU latency and throughput of the torch detector vs the onnxruntime export of the same run.

    python benchmarks/onnx_vs_torch.py [--run RUN_DIR] [--threads 2] [--repeats 10] [--json PATH]

Without ``--run`` it learns a throwaway run of the ``offline`` preset (two synthetic products, one epoch:
the architecture and so the cost are the preset's, the accuracy is beside the point), exports it, then
times ``predict`` end to end (uint8 images -> Predictions with maps at input resolution) at batch 1 and
batch 32 on both runtimes, with the same number of threads, and reports the worst parity differences
on the timed images. Medians after a warm-up; the two runtimes take turns, so a shared machine's load
weighs on both alike (the load average is printed with the table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moleflow.cli import main as cli
from moleflow.data.synthetic import render_sample
from moleflow.deploy.export import export_run
from moleflow.deploy.runtime import OnnxDetector
from moleflow.detector import Detector

BATCHES = (1, 32)


def _learn(run: Path) -> None:
    args = ["learn", str(run), "stripes=synthetic:stripes", "disc=synthetic:disc", "--limits", "40,10"]
    assert cli([*args, "--set", "train.epochs=1", "--eval", "none", "--no-progress", "-q"]) == 0


def _time(predictors: dict, images: list[np.ndarray], batch: int, repeats: int) -> list[dict]:
    """Median seconds of ``predict`` on ``batch`` images per runtime; the runtimes take turns, so that a
    shared machine's changing load weighs on both alike."""
    chunk = images[:batch]
    seconds: dict[str, list[float]] = {name: [] for name in predictors}
    for det in predictors.values():  # warm-up: sessions, caches, thread pools
        det.predict(chunk, batch_size=batch)
    for _ in range(repeats):
        for name, det in predictors.items():
            start = time.perf_counter()
            det.predict(chunk, batch_size=batch)
            seconds[name].append(time.perf_counter() - start)
    rows = []
    for name, times in seconds.items():
        median = statistics.median(times)
        rows.append(
            {
                "runtime": name,
                "batch": batch,
                "ms_per_batch": 1e3 * median,
                "ms_per_image": 1e3 * median / batch,
                "images_per_s": batch / median,
            }
        )
    return rows


def _parity(torch_det, onnx_det, images: list[np.ndarray]) -> dict[str, float]:
    a, b = torch_det.predict(images), onnx_det.predict(images)
    return {
        "same_routing": all(x.product == y.product for x, y in zip(a, b, strict=True)),
        "same_verdicts": all(x.verdict == y.verdict for x, y in zip(a, b, strict=True)),
        "score_rel_max": max(abs(x.score - y.score) / abs(x.score) for x, y in zip(a, b, strict=True)),
        "map_rel_max": max(
            float(np.abs(x.anomaly_map - y.anomaly_map).max() / np.ptp(x.anomaly_map)) for x, y in zip(a, b, strict=True)
        ),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="a trained run (default: learn a throwaway offline run)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of both runtimes")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--size", type=int, default=256, help="side of the synthetic input images")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or Path(tmp) / "run"
        if args.run is None:
            _learn(run)
        export = Path(tmp) / "export"
        start = time.perf_counter()
        export_run(run, export)
        export_s = time.perf_counter() - start
        torch_det = Detector.load(run, device="cpu", progress=False)
        onnx_det = OnnxDetector.load(export, threads=args.threads)
        images = [
            render_sample(k, "test", i, size=args.size, defective=i % 2 == 1)[0]
            for i in range(16)
            for k in ("stripes", "disc")
        ]
        load_before = os.getloadavg()[0]
        predictors = {"torch": torch_det, "onnxruntime": onnx_det}
        rows = [row for batch in BATCHES for row in _time(predictors, images, batch, args.repeats)]
        load_after = os.getloadavg()[0]
        parity = _parity(torch_det, onnx_det, images)
        preset = torch_det.cfg.preset
    print(
        f"preset {preset}, {args.threads} threads, {args.size}x{args.size} inputs, export took {export_s:.1f} s, "
        f"load average {load_before:.1f} before / {load_after:.1f} after the timings\n"
    )
    print("| runtime | batch | ms / batch | ms / image | images/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        cells = [
            r["runtime"],
            r["batch"],
            f"{r['ms_per_batch']:.1f}",
            f"{r['ms_per_image']:.1f}",
            f"{r['images_per_s']:.1f}",
        ]
        print("| " + " | ".join(map(str, cells)) + " |")
    print(f"\nparity on the {len(images)} timed images: {parity}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "preset": preset,
                    "threads": args.threads,
                    "rows": rows,
                    "parity": parity,
                    "load": [load_before, load_after],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
