"""Optional dependencies: which ``pip install 'moleflow[EXTRA]'`` brings the packages a command needs.

A command that needs an extra calls :func:`require_extra` before doing any work, so a missing package
costs one line (``MissingExtraError``, a RuntimeError the command line prints), never an hour of
training followed by an ImportError.
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRAS", "MissingExtraError", "require_extra"]

#: extra -> the importable modules it provides (pyproject.toml's [project.optional-dependencies]).
EXTRAS: dict[str, tuple[str, ...]] = {
    "demo": ("elpv_dataset",),
    "analysis": ("statsmodels", "pandas"),
    "serve": ("fastapi", "starlette", "uvicorn", "python_multipart"),
    "onnx": ("onnx", "onnxruntime"),
    "ray": ("ray",),
    "tensorboard": ("tensorboard",),
    "mlflow": ("mlflow",),
}


class MissingExtraError(RuntimeError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require_extra(extra: str, what: str) -> None:
    """Raise MissingExtraError unless every module of ``extra`` is importable; ``what`` names the user."""
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(
            f"{what} needs the optional package(s) {', '.join(missing)}: pip install 'moleflow[{extra}]'"
        )
