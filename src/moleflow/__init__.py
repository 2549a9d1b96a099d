"""moleflow: continual image anomaly detection (MoLE-Flow). The object at the centre is
:class:`moleflow.Detector` (imported lazily, so that ``import moleflow`` and ``moleflow --help`` stay fast)."""

__version__ = "0.2.0"

__all__ = ["Detector", "Prediction", "__version__"]


def __getattr__(name: str):
    if name == "Detector":
        from moleflow.detector import Detector

        return Detector
    if name == "Prediction":
        from moleflow.prediction import Prediction

        return Prediction
    raise AttributeError(f"module 'moleflow' has no attribute {name!r}")
