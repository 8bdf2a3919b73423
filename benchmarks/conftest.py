"""Shared set-up of the pytest-benchmark files: every benchmark runs with 2 torch threads."""

import pytest
import torch


@pytest.fixture(autouse=True)
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)
