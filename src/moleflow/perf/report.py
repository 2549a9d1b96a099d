"""Markdown report of a ``moleflow bench`` result."""

from __future__ import annotations

from typing import Any


def _si(x: float, unit: str = "") -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.2f} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


MATMULS = {"linear", "mm", "addmm", "bmm", "matmul", "convolution"}


def to_markdown(result: dict) -> str:
    """A human-readable report of a :func:`run_bench` result; sections missing from ``result`` are skipped."""
    lines = ["# moleflow bench" + (" (quick)" if result.get("quick") else ""), ""]
    env = result.get("environment", {})
    if env:
        lines += [", ".join(f"{k}: {v}" for k, v in env.items()), ""]
    ceil = result.get("ceiling")
    if ceil:
        lines += [
            "## Machine ceiling",
            "",
            f"{ceil['size']}x{ceil['size']} matmul in {ceil['dtype']}: **{_si(ceil['flops_per_s'], 'FLOP/s')}**",
            "",
        ]
    if result.get("head"):
        lines += ["## Flow head (inference, DIA + patch scores)", ""]
        lines += _table(
            ["preset", "D", "batch", "images/s", "ms/image", "FLOPs/image", "achieved", "efficiency"],
            [
                [
                    h["preset"],
                    h["embed_dim"],
                    h["batch"],
                    f"{h['images_per_s']:.1f}",
                    f"{h['ms_per_image']:.2f}",
                    _si(h["head_flops"]),
                    _si(h["achieved_flops_per_s"], "FLOP/s"),
                    f"{100 * h['head_efficiency']:.1f}%",
                ]
                for h in result["head"]
            ],
        )
    if result.get("head_bound"):
        lines += [
            "## What bounds the head (every operator of one inference pass timed, bytes read + written counted)",
            "",
            "`matmul rate`: FLOP/s of the matmuls alone, share of the ceiling; `other ops`: bytes/s of all other "
            "operators, share of this machine's rate for passes over tensors of the head's size; `roofline`: the "
            "bound that bytes per FLOP put on unfused execution, share of the ceiling.",
            "",
        ]
        lines += _table(
            ["preset", "batch", "bytes/FLOP", "matmul time", "matmul rate", "other ops", "roofline", "top other ops"],
            [
                [
                    b["preset"],
                    b["batch"],
                    f"{b['bytes_per_flop']:.3f}",
                    f"{100 * b['matmul_time_share']:.0f}%",
                    f"{_si(b['matmul_flops_per_s'], 'FLOP/s')} ({100 * b['matmul_efficiency']:.0f}%)",
                    f"{_si(b['other_bytes_per_s'], 'B/s')} ({100 * b['other_pass_efficiency']:.0f}%)",
                    f"{100 * b['bound_efficiency']:.0f}%",
                    ", ".join(
                        f"{o['op']} {100 * o['time_share']:.0f}%" for o in b["top_operators"] if o["op"] not in MATMULS
                    )[:80],
                ]
                for b in result["head_bound"]
            ],
        )
    if result.get("train"):
        lines += ["## Training step of the head (first task, analytic cost = 3 x forward)", ""]
        lines += _table(
            ["preset", "optimizer", "batch", "steps/s", "images/s", "achieved", "efficiency"],
            [
                [
                    t["preset"],
                    t["optimizer"],
                    t["batch"],
                    f"{t['steps_per_s']:.2f}",
                    f"{t['images_per_s']:.1f}",
                    _si(t["achieved_flops_per_s"], "FLOP/s"),
                    f"{100 * t['train_efficiency']:.1f}%",
                ]
                for t in result["train"]
            ],
        )
    if result.get("end_to_end"):
        lines += ["## End to end (uint8 images -> anomaly maps)", ""]
        rows = []
        for e in result["end_to_end"]:
            if e.get("status") == "ok":
                rows.append([e["backbone"], e["batch"], f"{e['images_per_s']:.1f}", f"{e['ms_per_image']:.1f}"])
            else:
                rows.append([e["backbone"], "-", e.get("status", "?"), e.get("reason", "")])
        lines += _table(["backbone", "batch", "images/s", "ms/image"], rows)
    if result.get("routing"):
        lines += [
            "## Routing cost per image vs learned tasks (Mahalanobis; synthetic prototypes shaped like real ones)",
            "",
            "`direct`: float64 evaluation over every task (before); `index`: exact Cholesky index with lower-bound "
            "pruning (now); `share`: index time / routed end-to-end inference time per image (efficientnet_lite2).",
            "",
        ]
        rows = []
        for r in result["routing"]:
            if r.get("status") == "ok":
                share = r.get("share_of_inference")
                rows.append(
                    [
                        r["dim"],
                        r["tasks"],
                        _si(r["precision_bytes"], "B"),
                        f"{r['direct_ms_per_image']:.3f}",
                        f"{r['ms_per_image']:.3f}",
                        f"{r['speedup']:.1f}x",
                        f"{r['tasks_evaluated']:.1f}",
                        "-" if share is None else f"{100 * share:.1f}%",
                        f"{r['batch_ms_per_image']:.3f}",
                        f"{100 * r['batch_share_of_inference']:.1f}%",
                        "yes" if r["agrees_with_direct"] else "NO",
                    ]
                )
            else:
                rows.append([r["dim"], r["tasks"], _si(r["precision_bytes"], "B"), r.get("status", "?")] + ["-"] * 7)
        batch = next((r["batch"] for r in result["routing"] if r.get("status") == "ok"), "B")
        lines += _table(
            [
                "G",
                "tasks",
                "precisions",
                "direct ms",
                "index ms",
                "speed-up",
                "tasks evaluated",
                "share (batch 1)",
                f"ms/img (batch {batch})",
                f"share (batch {batch})",
                "same decisions",
            ],
            rows,
        )
    per_task = result.get("per_task")
    if per_task:
        lines += ["## Per task", ""]

        def estimate(p: dict) -> str:
            seconds = p.get("estimated_learn_seconds")
            return "-" if seconds is None else f"{seconds:.0f} s ({p['epochs']} epochs)"

        lines += _table(
            [
                "preset",
                "per-task params",
                "task file",
                "first-task trainable",
                "base params",
                "300-image task, estimated from the training step",
            ],
            [
                [
                    p["preset"],
                    f"{p['per_task_parameters']:,}",
                    _si(p["task_file_bytes"], "B"),
                    f"{p['first_task_trainable']:,}",
                    f"{p['base_parameters']:,}",
                    estimate(p),
                ]
                for p in per_task.get("presets", [])
            ],
        )
        learn = per_task.get("learn")
        if learn:
            note = (
                f" (extrapolated from {learn['epochs_run']} epoch(s), {learn['seconds_run']:.1f} s)"
                if learn["extrapolated"]
                else ""
            )
            lines += [
                f"Learning a {learn['images']}-image task ({learn['preset']}, {learn['epochs_preset']} epochs, cached "
                f"features): **{learn['seconds_for_preset_epochs']:.0f} s**{note}",
                "",
            ]
    if result.get("optimizations"):
        lines += ["## Optimisations: before / after, measured in this run", ""]
        rows = []
        for o in result["optimizations"]:
            check = ""
            if "max_abs_diff" in o:
                check = f"max abs diff {o['max_abs_diff']:.2g}"
            if "max_rel_diff" in o:
                check = f"max diff {o['max_rel_diff']:.2g} of the range"
            for key in ("same_decisions", "identical_features"):
                if key in o:
                    check = f"{key.replace('_', ' ')}: {'yes' if o[key] else 'NO'}"
            rows.append(
                [
                    o["change"],
                    o["before"],
                    o["after"],
                    f"{o['before_ms']:.1f}",
                    f"{o['after_ms']:.1f}",
                    f"{o['speedup']:.2f}x",
                    check,
                ]
            )
        lines += _table(["change", "before", "after", "before ms", "after ms", "speed-up", "outputs"], rows)
    mem = result.get("memory")
    if mem:
        lines += ["## Peak memory", ""] + [f"- {k}: {_si(v, 'B')}" for k, v in mem.items()] + [""]
    if "total_seconds" in result:
        secs = ", ".join(f"{k} {v:.1f}s" for k, v in result.get("section_seconds", {}).items())
        lines += [f"Total: {result['total_seconds']:.1f} s ({secs})", ""]
    return "\n".join(lines)
