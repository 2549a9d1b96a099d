"""Our AUPRO / pixel F1-max against anomalib's on realistic-size maps (needs ``pip install anomalib``).

    PYTHONPATH=src python benchmarks/aupro_vs_anomalib.py [--images 40] [--size 224]

Prints one line per FPR limit with both values and their difference; the test suite checks the same on
smaller inputs (tests/test_metrics_anomalib.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from anomalib.metrics import AUPRO, F1Max

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_metrics_anomalib import _blobs  # noqa: E402

from moleflow.evaluation import metrics as M  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=2)
    args = parser.parse_args()
    maps, masks = _blobs(args.images, args.size, args.seed)
    batch = SimpleNamespace(anomaly_map=torch.from_numpy(maps), gt_mask=torch.from_numpy(masks))
    print(f"{args.images} maps of {args.size}x{args.size}, {int(masks.sum())} anomalous pixels")
    for limit in (0.05, 0.3, 1.0):
        start = time.perf_counter()
        ours = M.aupro(maps, masks, limit)
        mid = time.perf_counter()
        metric = AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=limit)
        metric.update(batch)
        theirs = float(metric.compute())
        end = time.perf_counter()
        print(
            f"AUPRO@{limit:<4}  ours {ours:.9f} ({mid - start:.2f} s)  anomalib {theirs:.9f} ({end - mid:.2f} s)"
            f"  diff {ours - theirs:+.1e}"
        )
    f1 = F1Max(fields=["anomaly_map", "gt_mask"])
    f1.update(SimpleNamespace(anomaly_map=batch.anomaly_map.flatten(), gt_mask=batch.gt_mask.flatten()))
    theirs = float(f1.compute())
    ours = M.pixel_f1_max(maps, masks)
    print(
        f"pixel F1-max  ours {ours.value:.9f} at {ours.threshold:.6f}  anomalib {theirs:.9f} at "
        f"{float(f1.threshold):.6f}  diff {ours.value - theirs:+.1e}"
    )


if __name__ == "__main__":
    main()
