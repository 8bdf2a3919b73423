"""What the methods share: building their config dataclasses, running with a set thread count,
splitting off a validation set, measuring a model's accuracy, and writing a run's results and
figures."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import statistics
import time
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple

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


def check_int_fields(method: str, config: Any, minimums: Iterable[Tuple[str, int]]) -> None:
    """Raise ValueError naming the field unless each ``getattr(config, key)`` is an int (not a bool)
    of at least its minimum."""
    for key, minimum in minimums:
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{method}: {key} must be an int >= {minimum}, got {value!r}")


def median_ms(fn: Callable[[], Any], repeats: int, warmup: bool = True) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls (after one untimed call
    when ``warmup``)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def keeps_global_rng(run: Callable) -> Callable:
    """``run`` with torch's global CPU generator saved and restored around it. A method seeds its
    own generators, so its results never depend on the global one; building throw-away modules
    (to count parameters, say) draws from it, and the caller's later draws must not depend on that."""

    @functools.wraps(run)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return run(*args, **kwargs)

    return wrapper


def _json_safe(value: Any) -> Any:
    """value with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: str, data: Any) -> None:
    """``data`` as strict JSON: NaN and infinities (a Spearman correlation of tied accuracies, say)
    become null, which every JSON parser reads (a bare NaN is not JSON)."""
    with open(path, "w") as fh:
        json.dump(_json_safe(data), fh, indent=2, allow_nan=False)


def save_run(out_dir: Optional[str], results: Dict[str, Any], plots: Optional[Callable[[], Dict[str, str]]]) -> None:
    """When ``out_dir`` is set: draw the figures (``plots()`` returns {name: path}, recorded in
    results["files"]) and write ``results.json`` there."""
    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    if plots is not None:
        results["files"] = plots()
    write_json(os.path.join(out_dir, "results.json"), results)


@torch.no_grad()
def eval_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy of ``model`` in eval mode on (x, y), in batches of ``batch``."""
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(-1) == y[i : i + batch]).sum()) for i in range(0, x.shape[0], batch))
    return correct / x.shape[0]


def images_with_validation_split(method: str, c: Any, min_train: int = 2):
    """The method's images (``load_images`` with ``c``'s dataset, data_root, n_train, n_test and
    seed), with ``c.n_val`` training images held out at random as a validation split (drawn from
    ``c.seed``). Returns (data, (x_train, y_train), (x_val, y_val), (x_test, y_test))."""
    from bnas_fast.data.images import load_images

    n_train = None if c.n_train is None else c.n_train + c.n_val
    data = load_images(c.dataset, c.data_root, n_train=n_train, n_test=c.n_test, seed=c.seed)
    x, y = data.train.tensors
    if x.shape[0] < c.n_val + min_train:
        raise ValueError(f"{method}: n_val = {c.n_val} leaves fewer than {min_train} of {x.shape[0]} training images")
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(c.seed + 17))
    val, train = order[: c.n_val], order[c.n_val :]
    return data, (x[train], y[train]), (x[val], y[val]), data.test.tensors
