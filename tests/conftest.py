import pytest
import torch


@pytest.fixture
def single_thread():
    """Tiny float64 depthwise convolutions are ~100x slower with intra-op threads on CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
