"""Per-task and shared parameter counts per preset at the spec's sizes, next to the spec's figures.

    python benchmarks/parameter_table.py > docs/PARAMETERS.md   (the table part)

Counts come from the live model (``MoLEFlow.parameter_counts``) split by component.
"""

from __future__ import annotations

from collections import defaultdict

from moleflow.config import preset
from moleflow.flow.model import MoLEFlow, _task_of

# the spec's own figures (method-outline.md "파라미터 수"; implementation-notes.md "Parameter Count")
SPEC = {
    "paper": {
        "lora": "1.92M",
        "task_bias": "14K",
        "whitening": "1.5K",
        "dia": "1.77M",
        "per_task": "3.71M",
        "base": "8.9M (NF base)",
    },
    "v5": {
        "lora": "1.57M",
        "task_bias": "12K",
        "whitening": "1.5K",
        "dia": "~500K",
        "per_task": "~2.1M",
        "base": "19.5M (18.9M NF + 0.6M mixer)",
    },
    "offline": {},
}
CONTEXT_DIM = {"paper": 1536, "v5": None, "offline": 168}


def component(name: str) -> str:
    parts = name.split(".")
    if parts[0] in ("whitening", "dia"):
        return parts[0]
    if "task_bias" in parts:
        return "task_bias"
    if "lora_A" in parts or "lora_B" in parts:
        return "lora"
    return "mixer_gate" if "gates" in parts else "other"


def counts(name: str) -> dict[str, int]:
    cfg = preset(name)
    model = MoLEFlow(cfg.model, CONTEXT_DIM[name] if cfg.model.scale_context else None)
    model.add_task("t0")
    out: dict[str, int] = defaultdict(int)
    for pname, p in model.named_parameters():
        if _task_of(pname) == "t0":
            out[component(pname)] += p.numel()
            out["per_task"] += p.numel()
        else:
            out["base"] += p.numel()
    return dict(out)


def fmt(n: int) -> str:
    return f"{n / 1e6:.3f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def main() -> None:
    rows = ["lora", "task_bias", "whitening", "mixer_gate", "dia", "per_task", "base"]
    print("| component | " + " | ".join(f"{p} (ours) | {p} (spec)" for p in SPEC) + " |")
    print("|---|" + "---|---|" * len(SPEC))
    table = {p: counts(p) for p in SPEC}
    for r in rows:
        cells = []
        for p in SPEC:
            cells += [fmt(table[p].get(r, 0)) if table[p].get(r, 0) else "–", SPEC[p].get(r, "–")]
        print(f"| {r} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
