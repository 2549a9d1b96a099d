"""Deploying a run without torch: per-product ONNX export and an onnxruntime detector.

- :mod:`.manifest`: the export directory's layout and ``manifest.json`` (no torch, no onnx).
- :mod:`.graphs`: the torch modules that are traced to ONNX (backbone, product heads) and the router graph.
- :mod:`.export`: ``export_run(run_dir, out_dir)``, incremental (only new or changed products are written).
- :mod:`.arrays`: preprocessing, image scores and anomaly maps in numpy, as the torch path computes them.
- :mod:`.runtime`: :class:`~moleflow.deploy.runtime.OnnxDetector`, the same predict API on onnxruntime.

Nothing here is imported by ``import moleflow``; the export and the runtime need the ``[onnx]`` extra.
"""
