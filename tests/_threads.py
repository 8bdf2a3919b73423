"""The thread-count context shared by the determinism tests."""

import contextlib

import torch


@contextlib.contextmanager
def num_threads(n: int):
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
