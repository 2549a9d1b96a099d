"""Learning and evaluating many products at once, one Ray task per product (``moleflow learn ... --parallel
ray``). Ray is the optional ``[ray]`` extra: ``pip install 'moleflow[ray]'``.

    from moleflow import Detector
    from moleflow.parallel import RayOptions

    det = Detector.load("runs/plant")
    report = det.learn_many([("a", "data/a"), ("b", "data/b")], parallel=RayOptions(cpus_per_task=1))
    print(report.learned, report.failed)
"""

from moleflow.parallel.learn import evaluate_many, learn_many
from moleflow.parallel.options import LearnReport, ParallelError, RayOptions

__all__ = ["LearnReport", "ParallelError", "RayOptions", "evaluate_many", "learn_many"]
