"""Unknown-product rejection, leave one product out, on a trained run.

    python benchmarks/unknown_products.py RUN_DIR [--out DIR] [--margins 1,3,10,30]

For every product P of the run: P is forgotten (in memory; the run is not changed), then P's test images
(the "unknown product") and the test images of every other product ("known", normal and anomalous) go
through the detector's own routing and rejection (``Detector.score`` + ``Detector.decide``, as
``predict`` does). Reported per P: AUROC of unknown vs known images on the rejection statistic (routing
distance over the routed product's unknown threshold; independent of the margin), the share of P's images
rejected as unknown at the calibrated thresholds, and the share of known images wrongly rejected (normal
and anomalous separately). With ``--margins``, the last two are also given at other values of
``calibration.unknown_margin`` (the thresholds rescaled). Writes ``unknown_products.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from moleflow.atomic import write_json_atomic, write_text_atomic
from moleflow.detector import Detector
from moleflow.session import RunSession

log = logging.getLogger("unknown_products")


def rejection_ratios(detector: Detector, features) -> np.ndarray:
    """Routing distance / routed product's unknown threshold, per image (> 1: rejected)."""
    scored = detector.score(features)
    limits = np.array(
        [detector.records[detector.router.tasks[t]].calibration.unknown_threshold for t in scored.task_index.tolist()]
    )
    return scored.distances.numpy() / limits


def leave_one_out(run_dir: Path, margins: list[float], feature_cache: Path | None = None) -> dict:
    session = RunSession(Detector.load(run_dir, progress=False, feature_cache=feature_cache))
    detector = session.detector
    sets = {name: session.eval_set(name) for name in detector.products}
    missing = [n for n, es in sets.items() if es is None]
    if missing:
        raise SystemExit(f"test images of {missing} not found; run this where the run's data is")
    margin = detector.cfg.calibration.unknown_margin
    rows = []
    for held in detector.products:
        loo = Detector.load(run_dir, progress=False)
        loo.remove(held, commit=False)
        unknown = rejection_ratios(loo, sets[held].features)
        known, labels = [], []
        for name in loo.products:
            known.append(rejection_ratios(loo, sets[name].features))
            labels.append(sets[name].labels)
        known, labels = np.concatenate(known), np.concatenate(labels)
        y = np.r_[np.zeros(known.size), np.ones(unknown.size)]
        row = {
            "held_out": held,
            "unknown_images": int(unknown.size),
            "known_images": int(known.size),
            "auroc": float(roc_auc_score(y, np.log(np.r_[known, unknown]))),
        }
        for m in sorted({margin, *margins}):
            scale = m / margin  # thresholds scale with the margin; the ratio scales inversely
            row[f"margin_{m:g}"] = {
                "unknown_caught": float(np.mean(unknown / scale > 1)),
                "known_rejected": float(np.mean(known / scale > 1)),
                "known_normal_rejected": float(np.mean(known[labels == 0] / scale > 1)),
                "known_anomalous_rejected": float(np.mean(known[labels == 1] / scale > 1)) if (labels == 1).any() else None,
            }
        rows.append(row)
        log.info("%s: AUROC %.3f, %s", held, row["auroc"], row[f"margin_{margin:g}"])
    return {"run": str(run_dir), "products": detector.products, "margin": margin, "rows": rows}


def markdown(result: dict) -> str:
    margins = sorted({float(k.split("_", 1)[1]) for r in result["rows"] for k in r if k.startswith("margin_")})

    def pct(v):
        return "–" if v is None else f"{100 * v:.1f}"

    lines = [
        f"Run: `{result['run']}` (default margin {result['margin']:g})",
        "",
        "| unknown product (held out) | AUROC unknown vs known | "
        + " | ".join(f"m={m:g}: caught / known rejected (normal, anomalous)" for m in margins)
        + " |",
        "|---|---|" + "---|" * len(margins),
    ]
    for r in result["rows"]:
        cells = []
        for m in margins:
            c = r[f"margin_{m:g}"]
            normal, anomalous = pct(c["known_normal_rejected"]), pct(c["known_anomalous_rejected"])
            cells.append(f"{pct(c['unknown_caught'])} / {pct(c['known_rejected'])} ({normal}, {anomalous})")
        lines.append(f"| {r['held_out']} | {100 * r['auroc']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, help="output directory (default: RUN_DIR)")
    p.add_argument("--margins", default="1,3,10,30", help="other unknown margins to report (comma-separated)")
    p.add_argument("--feature-cache", type=Path, help="backbone features kept between runs (as moleflow learn's)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    result = leave_one_out(args.run_dir, [float(m) for m in args.margins.split(",") if m], args.feature_cache)
    out = args.out or args.run_dir
    write_json_atomic(result, out / "unknown_products.json")
    write_text_atomic(markdown(result), out / "unknown_products.md")
    print(markdown(result))


if __name__ == "__main__":
    main()
