"""moleflow: continual image anomaly detection with MoLE-Flow."""

__version__ = "0.1.0"
