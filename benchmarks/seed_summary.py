"""Mean and spread over seeds of quality-sweep runs, next to PatchCore, with the calibrated verdicts.

    python benchmarks/seed_summary.py runs/quality/s0 runs/quality/s1 runs/quality/s2 --out runs/quality/seeds

Each argument is the ``--out`` of one ``benchmarks/quality_sweep.py`` run (its ``summary.json`` and
``results.json``), all of the same tasks. Per task and metric: the routed value's mean and sample standard
deviation over the runs, PatchCore's (task id given; one value when its runs agree, else their mean), and
whether MoLE-Flow's mean is at or above it. Then routing accuracy, and per product the calibrated verdict's
recall on defective test images, false-alarm rate on normal ones and the share rejected as unknown.
Writes ``seeds.json`` and ``seeds.md`` into ``--out`` and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from moleflow.atomic import write_json_atomic, write_text_atomic

METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")
VERDICT = ("recall", "false_alarm_rate", "unknown_rate")


def mean_std(values: list[float]) -> tuple[float, float] | None:
    """``(mean, sample std)`` of the values that are not None; std 0 for one value; None for none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def load_run(path: Path) -> dict:
    summary = json.loads((path / "summary.json").read_text())
    results = json.loads((path / "results.json").read_text())
    return {"summary": summary, "results": results}


def aggregate(runs: list[dict]) -> dict:
    """Per task: ``{metric: {"routed": (mean, std), "patchcore": value, "at_or_above": bool}}``, routing, verdicts."""
    names = list(runs[0]["summary"]["tasks"])
    for run in runs[1:]:
        if list(run["summary"]["tasks"]) != names:
            raise SystemExit(f"the runs hold different tasks: {names} vs {list(run['summary']['tasks'])}")
    tasks = {}
    for name in names:
        rows = [run["summary"]["tasks"][name] for run in runs]
        cells = {}
        for m in METRICS:
            routed = mean_std([r["routed"][m] for r in rows])
            pcs = [r["patchcore"][m] for r in rows if r["patchcore"] and r["patchcore"].get(m) is not None]
            patchcore = statistics.fmean(pcs) if pcs else None
            above = None if routed is None or patchcore is None else routed[0] >= patchcore
            cells[m] = {"routed": routed, "patchcore": patchcore, "at_or_above": above}
        verdict = {}
        for key in VERDICT:
            verdict[key] = mean_std([(run["results"]["calibration"][name].get("test") or {}).get(key) for run in runs])
        tasks[name] = {"metrics": cells, "verdict": verdict}
    routing = mean_std([run["results"]["routing"]["accuracy"] for run in runs])
    seeds = [run["summary"]["config"]["train"]["seed"] for run in runs]  # the runs' own train.seed
    return {"runs": len(runs), "seeds": seeds, "tasks": tasks, "routing": routing}


def _pct(cell: tuple[float, float] | None) -> str:
    return "–" if cell is None else f"{100 * cell[0]:.1f} ± {100 * cell[1]:.1f}"


def markdown(agg: dict, commands: list[str]) -> str:
    lines = [f"{agg['runs']} runs (seeds {', '.join(str(s) for s in agg['seeds'])}); mean ± sample std, %.", ""]
    lines += [f"- `{c}`" for c in commands] + [""]
    head = " | ".join(f"{m} MoLE-Flow routed / PatchCore" for m in METRICS)
    lines += [f"| task | {head} |", "|---|" + "---|" * len(METRICS)]
    below = 0
    for name, row in agg["tasks"].items():
        cells = []
        for m in METRICS:
            c = row["metrics"][m]
            pc = "–" if c["patchcore"] is None else f"{100 * c['patchcore']:.1f}"
            mark = "" if c["at_or_above"] is None else (" ✓" if c["at_or_above"] else " ✗")
            below += c["at_or_above"] is False
            cells.append(f"{_pct(c['routed'])} / {pc}{mark}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"✓ at or above PatchCore, ✗ below it: {below} cells below.", ""]
    lines += [f"Routing accuracy over all test images: {_pct(agg['routing'])}", ""]
    lines += ["| product | recall (defective flagged) | false alarms (normal flagged) | rejected as unknown |"]
    lines += ["|---|---|---|---|"]
    for name, row in agg["tasks"].items():
        v = row["verdict"]
        lines.append(f"| {name} | {_pct(v['recall'])} | {_pct(v['false_alarm_rate'])} | {_pct(v['unknown_rate'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="quality_sweep.py --out directories")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    runs = [load_run(path) for path in args.runs]
    agg = aggregate(runs)
    text = markdown(agg, [run["summary"]["command"] for run in runs])
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(agg, args.out / "seeds.json")
    write_text_atomic(text, args.out / "seeds.md")
    print(text)


if __name__ == "__main__":
    main()
