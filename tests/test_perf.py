import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moleflow.config import preset, replace
from moleflow.flow.model import MoLEFlow
from moleflow.perf import head_flops, measure_ceiling, to_markdown


def _small(name: str, dim: int = 64, rank: int = 8, layers: int = 2):
    cfg = preset(name).model
    cfg.backbone.embed_dim = dim
    cfg.flow = replace(cfg.flow, coupling_layers=layers, lora=replace(cfg.flow.lora, rank=rank))
    return cfg


def _counted(cfg, grid, context_dim=None, batch=2, training: bool = False) -> int:
    """FLOPs per image that torch counts: deployed inference (merged adapters) or a training forward."""
    torch.manual_seed(0)
    model = MoLEFlow(cfg, context_dim).train(training)
    model.add_task("a")
    # a training forward with the base frozen (a later task's): the adapters run as two low-rank matmuls; with
    # the base trainable they run folded into W per call (moleflow.flow.lora), which head_flops does not count
    model.set_trainable("a", train_base=False)
    patches = torch.randn(batch, *grid, cfg.backbone.embed_dim)
    context = torch.randn(batch, *grid, context_dim) if context_dim else None
    with torch.set_grad_enabled(training):
        model(patches, "a", context)  # inference folds the adapters once, on the first call
        with FlopCounterMode(display=False) as counter:
            model(patches, "a", context)
    return counter.get_total_flops() // batch


@pytest.mark.parametrize(
    "name, context_dim",
    [("v5", None), ("offline", None), ("paper", 96)],
)
@pytest.mark.parametrize("training", [True, False])
def test_head_flops_matches_flop_counter(name, context_dim, training):
    cfg = _small(name)
    grid = (6, 5)
    analytic = head_flops(cfg, grid, context_dim, with_lora=training)
    counted = _counted(cfg, grid, context_dim, training=training)
    assert analytic == pytest.approx(counted, rel=0.02)


def test_head_flops_paper_context_subnet_without_dia_and_mixer():
    cfg = _small("paper", dim=32, rank=4, layers=1)
    cfg.dia = None
    cfg.spatial_mixer = None
    cfg.scale_context = None
    grid = (4, 4)
    assert head_flops(cfg, grid, with_lora=False) == pytest.approx(_counted(cfg, grid), rel=0.02)


def test_head_flops_scales_with_grid_and_lora():
    cfg = _small("v5")
    assert head_flops(cfg, (4, 4)) == 4 * head_flops(cfg, (2, 2))
    assert head_flops(cfg, with_lora=False) < head_flops(cfg)
    with pytest.raises(ValueError):
        head_flops(preset("paper").model)  # scale context without context_dim


def test_ceiling_smoke():
    out = measure_ceiling("cpu", sizes=(32, 64), reps=2, warmup=1)
    assert out["size"] in (32, 64) and out["dtype"] == "float32"
    assert out["flops_per_s"] == max(out["by_size"].values())
    assert out["flops_per_s"] > 0 and out["seconds"] > 0


def test_to_markdown_on_fake_result():
    fake = {
        "quick": True,
        "environment": {"device": "cpu", "torch": "x"},
        "ceiling": {"size": 64, "dtype": "float32", "seconds": 1e-4, "flops_per_s": 5.2e9},
        "head": [
            {
                "preset": "offline",
                "embed_dim": 168,
                "context_dim": None,
                "batch": 8,
                "images_per_s": 100.0,
                "ms_per_image": 10.0,
                "head_flops": 179_457_600,
                "achieved_flops_per_s": 1.8e10,
                "head_efficiency": 0.35,
            }
        ],
        "head_bound": [
            {
                "preset": "offline",
                "batch": 8,
                "bytes_per_flop": 0.21,
                "matmul_time_share": 0.4,
                "matmul_flops_per_s": 6e10,
                "matmul_efficiency": 0.6,
                "other_bytes_per_s": 8e9,
                "other_pass_efficiency": 0.17,
                "bound_efficiency": 1.0,
                "top_operators": [{"op": "linear", "time_share": 0.4}, {"op": "mul", "time_share": 0.12}],
            }
        ],
        "train": [
            {
                "preset": "offline",
                "optimizer": "adamp",
                "batch": 8,
                "steps_per_s": 2.0,
                "images_per_s": 16.0,
                "train_flops_per_image": 5e8,
                "achieved_flops_per_s": 8e9,
                "train_efficiency": 0.15,
            }
        ],
        "end_to_end": [
            {"backbone": "efficientnet_lite2", "status": "ok", "batch": 1, "images_per_s": 20.0, "ms_per_image": 50.0},
            {"backbone": "wide_resnet50_2 (paper)", "status": "unavailable", "reason": "no weights"},
        ],
        "routing": [
            {
                "dim": 168,
                "tasks": 10,
                "precision_bytes": 2_257_920,
                "status": "ok",
                "ms_per_image": 0.1,
                "direct_ms_per_image": 0.4,
                "speedup": 4.0,
                "tasks_evaluated": 1.5,
                "batch": 8,
                "batch_ms_per_image": 0.02,
                "share_of_inference": 0.002,
                "batch_share_of_inference": 0.0007,
                "agrees_with_direct": True,
            },
            {"dim": 768, "tasks": 1000, "precision_bytes": 4_718_592_000, "status": "skipped (quick mode on CPU)"},
        ],
        "optimizations": [
            {
                "change": "merged LoRA",
                "before": "separate",
                "after": "merged",
                "before_ms": 3.0,
                "after_ms": 1.5,
                "speedup": 2.0,
                "max_abs_diff": 1e-6,
            }
        ],
        "per_task": {
            "presets": [
                {
                    "preset": "offline",
                    "per_task_parameters": 1000,
                    "task_file_bytes": 4096,
                    "first_task_trainable": 5000,
                    "base_parameters": 4000,
                    "epochs": 40,
                    "estimated_learn_seconds": 123.4,
                }
            ],
            "learn": {
                "preset": "offline",
                "images": 300,
                "epochs_run": 1,
                "epochs_preset": 40,
                "seconds_run": 2.0,
                "seconds_for_preset_epochs": 80.0,
                "extrapolated": True,
                "trainable_parameters": 5000,
            },
        },
        "memory": {"cpu_max_rss_bytes": 2e9},
        "section_seconds": {"ceiling": 1.0},
        "total_seconds": 3.0,
    }
    text = to_markdown(fake)
    assert "35.0%" in text and "5.20 GFLOP/s" in text
    assert "unavailable" in text and "skipped (quick mode on CPU)" in text
    assert "extrapolated" in text and "**80 s**" in text and "| 123 s (40 epochs) |" in text
    assert "| 4.0x | 1.5 | 0.2% |" in text  # routing: speed-up, tasks evaluated, share of inference
    assert "| merged LoRA | separate | merged | 3.0 | 1.5 | 2.00x | max abs diff 1e-06 |" in text
    assert "| offline | 8 | 0.210 | 40% | 60.00 GFLOP/s (60%) | 8.00 GB/s (17%) | 100% | mul 12% |" in text
    assert to_markdown({}).startswith("# moleflow bench")


def test_synthetic_router_precisions_invert_the_covariances_and_queries_route_home():
    from moleflow.perf.sections import synthetic_router

    router, sample = synthetic_router(preset("offline"), dim=12, tasks=5, device=torch.device("cpu"), rank=3)
    assert router.precisions.shape == (5, 12, 12)
    assert torch.allclose(router.precisions, router.precisions.transpose(1, 2))
    assert (torch.linalg.eigvalsh(router.precisions) > 0).all()
    # the Woodbury precision of U U^T + 0.25 I has eigenvalue 1/0.25 = 4 on the complement of U (dim - rank)
    top = torch.linalg.eigvalsh(router.precisions)[:, -(12 - 3) :]
    torch.testing.assert_close(top, torch.full_like(top, 4.0), rtol=1e-9, atol=1e-9)
    x = sample(200)
    assert x.shape == (200, 12) and x.dtype == torch.float32
    nearest = router.distances(x).argmin(dim=1)
    assert torch.equal(router.route(x), nearest)


def test_operator_traffic_counts_bytes_and_flops_of_hand_computed_cases():
    from moleflow.perf.traffic import operator_traffic, roofline

    a, b, c = (torch.rand(1000) for _ in range(3))
    elementwise = operator_traffic(lambda: a * b + c)  # mul: 2 reads + 1 write, add: the same; 4 bytes each
    assert elementwise["bytes"] == 2 * 3 * 4000 and elementwise["flops"] == 0 and elementwise["operator_calls"] == 2
    x, w = torch.rand(64, 32), torch.rand(16, 32)
    matmul = operator_traffic(lambda: x @ w.t())  # the transpose is a view: nothing moves
    assert matmul["flops"] == 2 * 64 * 32 * 16
    assert matmul["bytes"] == 4 * (64 * 32 + 32 * 16 + 64 * 16)
    assert matmul["matmul_time_share"] == pytest.approx(1.0)
    same = operator_traffic(lambda: a.to(torch.float32).view(10, 100))  # aliases of a: no pass
    assert same["bytes"] == 0
    inplace = operator_traffic(lambda: b.clone().add_(a))  # clone: read + write; add_: 2 reads + 1 write
    assert inplace["bytes"] == 2 * 4000 + 3 * 4000
    bound = roofline({"flops": 1000, "bytes": 500}, pass_rate=10.0, ceiling=100.0)  # 2 FLOP/B x 10 B/s = 20 FLOP/s
    assert bound["attainable_flops_per_s"] == 20.0 and bound["bound_efficiency"] == 0.2
    assert roofline({"flops": 1000, "bytes": 1}, pass_rate=10.0, ceiling=100.0)["bound_efficiency"] == 1.0
