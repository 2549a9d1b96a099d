import pytest
import torch


@pytest.fixture
def single_thread():
    """Tiny float64 depthwise convolutions are ~100x slower with intra-op threads on CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- one tiny trained run, shared


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run holding two synthetic products, learned by the CLI (tests copy it before changing it)."""
    from moleflow.cli import main
    from tests.helpers import learn_args

    run = tmp_path_factory.mktemp("tiny") / "run"
    assert main(learn_args(run, "stripes=synthetic:stripes", "disc=synthetic:disc")) == 0
    return run


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy
