"""What the methods' config dataclasses share."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any


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
