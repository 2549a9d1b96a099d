"""Where end-to-end inference spends its time: per-stage milliseconds per image at several batch sizes.

    OMP_NUM_THREADS=1 python benchmarks/inference_stages.py [--threads 1] [--batches 1,8,32] [--repeats 5]
        [--chunks 1,2,4,8,32] [--set KEY=VALUE ...] [--compile] [--json PATH]

Learns a throwaway ``offline`` run (two synthetic products, one epoch: the preset's architecture and so
its cost; accuracy is beside the point), then times, on 256 x 256 inputs, the stages of
``Detector.predict``: ``preprocess`` (uint8 -> normalised tensor), ``extract`` (backbone + patch
aggregation), ``score`` (routing + the routed products' heads), ``maps`` (patch scores -> anomaly maps at
the model's resolution) and ``predict`` (all of it, plus the resize of each map to its image and the
verdicts). Medians after a warm-up. ``--chunks``: also ``extract`` of the largest batch with the backbone
run in micro-batches of each size (``moleflow.features.extractor.CPU_BACKBONE_CHUNK``). ``--set``: config
overrides of the throwaway run, to time a variant of the preset (e.g. ``model.backbone.grid=finest``).
``--compile``: also ``predict`` with the backbone under ``torch.compile`` (``FeatureExtractor.compile_backbone``,
a second detector of the same run), timed interleaved with the eager one (eager, compiled, compiled, eager,
...) so that a shared machine's drift weighs on both; reported with the median of the per-pair ratios and
the compile time of the warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moleflow.cli import main as cli
from moleflow.data.synthetic import render_sample
from moleflow.detector import Detector
from moleflow.features import extractor as extractor_module
from moleflow.features.cache import CachedFeatures
from moleflow.scoring import anomaly_maps


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def stages(det: Detector, images: list, repeats: int) -> dict[str, float]:
    """ms per image of each stage on ``images`` (one batch)."""
    ex, n = det.extractor, len(images)
    size = det.cfg.model.backbone.image_size
    feats = ex.extract(images)
    cached = CachedFeatures(feats.patches, None, feats.pooled)
    scored = det.score(cached)
    sigma = det.cfg.scoring.smoothing_sigma
    timings = {
        "preprocess": _median_ms(lambda: ex.preprocess(images), repeats),
        "extract": _median_ms(lambda: ex.extract(images), repeats),
        "score": _median_ms(lambda: det.score(cached), repeats),
        "maps": _median_ms(lambda: anomaly_maps(scored.patch_scores, (size, size), sigma), repeats),
        "predict": _median_ms(lambda: det.predict(images, batch_size=n), repeats),
    }
    return {k: v / n for k, v in timings.items()}


def compiled_vs_eager(run: Path, images: list, batches: list[int], repeats: int) -> dict[int, dict[str, float]]:
    """``predict`` ms per image, eager backbone against compiled, interleaved; per batch size."""
    from moleflow.features.extractor import extractor_for

    eager = Detector.load(run, device="cpu", progress=False)
    compiled_extractor = extractor_for(eager.cfg).compile_backbone()
    compiled = Detector.load(run, device="cpu", progress=False, extractor=compiled_extractor)
    start = time.perf_counter()
    compiled_extractor.warm_up(max(batches))
    compile_s = time.perf_counter() - start
    rows = {}
    detectors = {"eager": eager, "compiled": compiled}
    for b in batches:
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for det in detectors.values():
            det.predict(images[:b], batch_size=b)
        for rep in range(2 * repeats):
            for name in ("eager", "compiled") if rep % 2 == 0 else ("compiled", "eager"):
                t = time.perf_counter()
                detectors[name].predict(images[:b], batch_size=b)
                times[name].append(time.perf_counter() - t)
        ratios = [e / c for e, c in zip(times["eager"], times["compiled"], strict=True)]
        rows[b] = {
            "eager_ms": 1e3 * statistics.median(times["eager"]) / b,
            "compiled_ms": 1e3 * statistics.median(times["compiled"]) / b,
            "speedup": statistics.median(ratios),
            "compile_s": compile_s,
        }
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunks", help="micro-batch sizes to time extract with, e.g. 1,2,4,8,32")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override of the run")
    p.add_argument("--compile", action="store_true", help="also predict with the backbone compiled, interleaved")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        learn = ["learn", str(run), "stripes=synthetic:stripes", "disc=synthetic:disc", "--limits", "40,10"]
        overrides = [w for kv in ["train.epochs=1", *args.set] for w in ("--set", kv)]
        assert cli([*learn, *overrides, "--eval", "none", "--no-progress", "-q"]) == 0
        det = Detector.load(run, device="cpu", progress=False)
        kinds = ("stripes", "disc")
        images = [render_sample(k, "test", i, size=256, defective=i % 2 == 1)[0] for i in range(16) for k in kinds]
        load = os.getloadavg()[0]
        rows = {b: stages(det, images[:b], args.repeats) for b in batches}
        chunks = {}
        default_chunk = extractor_module.CPU_BACKBONE_CHUNK
        for c in [int(c) for c in args.chunks.split(",")] if args.chunks else []:
            extractor_module.CPU_BACKBONE_CHUNK = c
            chunks[c] = _median_ms(lambda: det.extractor.extract(images[: max(batches)]), args.repeats) / max(batches)
        extractor_module.CPU_BACKBONE_CHUNK = default_chunk
        compiled = compiled_vs_eager(run, images, batches, args.repeats) if args.compile else {}
    print(f"{args.threads} thread(s), load average {load:.1f} before the timings; ms per image\n")
    names = list(next(iter(rows.values())))
    print("| batch | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for b, r in rows.items():
        print(f"| {b} | " + " | ".join(f"{r[k]:.1f}" for k in names) + " |")
    if chunks:
        print(f"\nextract, batch {max(batches)}, ms per image by micro-batch size (default {default_chunk}):\n")
        print("| micro-batch | " + " | ".join(map(str, chunks)) + " |")
        print("|---|" + "---|" * len(chunks))
        print("| ms / image | " + " | ".join(f"{v:.1f}" for v in chunks.values()) + " |")
    if compiled:
        first = next(iter(compiled.values()))
        print(f"\npredict, ms per image, eager vs compiled backbone (interleaved; compile {first['compile_s']:.1f} s):\n")
        print("| batch | eager | compiled | speed-up (median of pairs) |")
        print("|---|---|---|---|")
        for b, r in compiled.items():
            print(f"| {b} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | {r['speedup']:.2f}x |")
    if args.json:
        result = {"threads": args.threads, "load": load, "overrides": args.set, "ms_per_image": rows}
        result["extract_by_chunk"] = chunks
        result["compiled_backbone"] = compiled
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
