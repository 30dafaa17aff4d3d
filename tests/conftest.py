"""Shared pytest fixtures."""

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests on one torch thread: the test machine's 2 cores are shared with
    subprocesses, and oversubscribed OpenMP threads stall on every small op."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def restore_torch_threads():
    """Restore the torch thread count after a test that trains in-process (``runtime.threads``)."""
    import torch

    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)
