"""Every metric of moleflow.evaluation.task_metrics on a trained run (routed, after the last task).

    PYTHONPATH=src python benchmarks/run_metrics.py runs/mig_hazelnut

Prints JSON: per task the eight metrics (image AUROC / AP / F1-max, pixel AUROC / AP / F1-max, AUPRO,
PRO at the task's calibrated threshold) and the operating points (the F1-max thresholds). The same
numbers ``results.json`` carries once the experiment records ``task_metrics``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moleflow.analysis.run_loading import load_run
from moleflow.evaluation.task_metrics import task_metrics
from moleflow.scoring import anomaly_maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data", help="data root, if it moved since training")
    args = parser.parse_args()
    run = load_run(args.run_dir, data_root=args.data)
    exp, out = run.experiment, {}
    for task in run.tasks:
        eval_set = exp.prepare_eval_set(task)
        scored = exp.score(eval_set.features)  # routed
        maps = None
        if eval_set.masks is not None:
            size = (exp.eval_size, exp.eval_size)
            maps = anomaly_maps(scored.patch_scores, size, run.cfg.scoring.smoothing_sigma).numpy()
        result = task_metrics(
            scored.image_scores.numpy(), eval_set.labels, maps, eval_set.masks, exp.thresholds.get(task.name)
        )
        out[task.name] = {"metrics": result.values, "operating_points": result.operating_points}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
