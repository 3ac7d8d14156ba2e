import pytest
import torch


@pytest.fixture
def one_thread():
    """Toy tensors run several times faster on one thread than on two contended cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
