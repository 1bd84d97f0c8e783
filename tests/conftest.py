"""Fixtures shared by several test modules."""
import contextlib

import pytest
import torch


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to `n` for the body, restored afterwards.

    Small models gain nothing from threads on a busy machine, and float sums depend on
    how work is split over threads, so runs compared bit for bit use one.
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield
