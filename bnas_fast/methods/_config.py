"""What the methods share: building their config dataclasses, and running with a set thread count."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, Iterator

import torch


def config_from_any(cls: type, config: Any, method: str) -> Any:
    """``config`` as an instance of the dataclass ``cls``: None gives the defaults, an instance is
    copied, a dict is checked for unknown keys (named in the error) and expanded."""
    if config is None:
        return cls()
    if isinstance(config, cls):
        return copy.deepcopy(config)
    if isinstance(config, dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(f"{method}: unknown config key(s) {unknown}; known: {sorted(names)}")
        return cls(**config)
    raise TypeError(f"{method}: config must be an {cls.__name__} or a dict, got {type(config).__name__}")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
