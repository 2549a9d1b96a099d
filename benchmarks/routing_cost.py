"""What routing costs per image among many products, per router feature (docs/PERFORMANCE.md, "Routing among
1,000 products of G = 336").

    OMP_NUM_THREADS=1 python benchmarks/routing_cost.py [--products 100,1000] [--features patch_mean,patch_moments]
        [--batches 1,64] [--repeats 20] [--config offline] [--json PATH]

For each router feature of the config's router (pooled covariance in ``offline``): a router with that many
synthetic prototypes shaped like real ones (``moleflow.perf.sections.synthetic_router``, of the feature's
width G), the time of its first call (the pooled metric built), then the median time of ``Router.nearest``
(route, and the distance to the routed product under its own precision) per image at each batch size, and
the memory of the precisions. No model, no image: routing only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from moleflow.config import apply_overrides, load_config
from moleflow.perf.sections import synthetic_router
from moleflow.training import router_dim


def measure(config: str, feature: str, products: int, batches: list[int], repeats: int) -> dict:
    cfg = apply_overrides(load_config(config), [f"router.feature={feature}"])
    g = router_dim(cfg, 0)
    router, sample = synthetic_router(cfg, g, products, torch.device("cpu"))
    queries = {b: sample(b).float() for b in batches}
    start = time.perf_counter()
    router.nearest(queries[batches[0]])  # the first call builds what routing needs (pooled metric, index)
    first = time.perf_counter() - start
    per_image = {}
    for b, x in queries.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            router.nearest(x)
            times.append((time.perf_counter() - start) / b)
        per_image[b] = 1e3 * statistics.median(times)
    return {
        "feature": feature,
        "G": g,
        "products": products,
        "first_call_s": first,
        "ms_per_image": per_image,
        "precisions_mib": router.precisions.numel() * router.precisions.element_size() / 2**20,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="offline")
    p.add_argument("--products", default="100,1000")
    p.add_argument("--features", default="patch_mean,patch_moments")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    columns = " | ".join(f"batch {b}, ms per image" for b in batches)
    print(f"| feature | G | products | first call | {columns} | precisions |")
    print("|---|---|---|---|" + "---|" * len(batches) + "---|")
    for feature in args.features.split(","):
        for products in (int(n) for n in args.products.split(",")):
            row = measure(args.config, feature, products, batches, args.repeats)
            rows.append(row)
            cells = " | ".join(f"{row['ms_per_image'][b]:.3f}" for b in batches)
            print(
                f"| {feature} | {row['G']} | {products} | {row['first_call_s']:.2f} s | {cells} | "
                f"{row['precisions_mib']:.0f} MiB |",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
