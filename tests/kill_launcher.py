"""Run the moleflow CLI and SIGKILL the process at a chosen point (a test helper, not a test module).

    python tests/kill_launcher.py POINT N moleflow-args...

POINT: ``extract`` (the N-th backbone batch), ``train`` (the N-th training step), ``rename`` (just before
the N-th rename of a file into place: the new content is complete in its temporary or staged file, the
target still holds the old one) or ``write`` (the same, with the new file cut in half, as a kill in the
middle of writing it leaves it); ``trace`` kills nothing and prints every rename's target. Renames are
counted through ``os.replace``.
"""

from __future__ import annotations

import os
import signal
import sys


def _kill_on_call(n: int, fn):
    count = 0

    def wrapped(*args, **kwargs):
        nonlocal count
        count += 1
        if count == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)

    return wrapped


def main() -> int:
    point, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if point == "extract":
        from moleflow.features.extractor import FeatureExtractor

        FeatureExtractor.forward = _kill_on_call(n, FeatureExtractor.forward)
    elif point == "train":
        from moleflow.training import ContinualTrainer

        ContinualTrainer.objective = _kill_on_call(n, ContinualTrainer.objective)
    elif point == "rename":
        from moleflow import atomic

        atomic.os.replace = _kill_on_call(n, os.replace)
    elif point == "write":
        from moleflow import atomic

        real, count = os.replace, 0

        def truncated_then_killed(src, dst):
            nonlocal count
            count += 1
            if count == n:  # leave the temporary file as a kill in mid-write would
                with open(src, "r+b") as f:
                    f.truncate(os.path.getsize(src) // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst)

        atomic.os.replace = truncated_then_killed
    elif point == "trace":  # no kill: print every rename's target, in order
        real = os.replace

        def traced(src, dst):
            print(f"RENAME {dst}", file=sys.stderr, flush=True)
            return real(src, dst)

        os.replace = traced
    else:
        raise SystemExit(f"unknown point {point}")
    from moleflow.cli import main as cli

    return cli(argv)


if __name__ == "__main__":
    raise SystemExit(main())
