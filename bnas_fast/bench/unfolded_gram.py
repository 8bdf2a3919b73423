"""Benchmark cases for unfolded_gram (per-filter Gauss-Newton blocks, issue 6, work in progress).

The layers of issue 6's small network: 3x3 convolutions (padding 1, bias) on 16x16 inputs, batch
32, K = 10 exact factors (10 classes), float32: 3 -> 16, 16 -> 32 and 32 -> 32 channels. Providers:

* ``eager``: :func:`bnas_fast.reference.unfolded_gram` (unfold the whole input, then two einsums);
* ``compile``: ``torch.compile`` of that reference;
* ``bnas_fast``: the op (C++: one example's unfolding at a time, GEMMs).
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch

import bnas_fast
from bnas_fast import reference
from bnas_fast.bench import Case

BATCH, CLASSES, SIZE = 32, 10, 16
LAYERS = ((3, 16), (16, 32), (32, 32))


def _case(c_in: int, c_out: int) -> Case:
    def build() -> Dict[str, Callable[[], object]]:
        torch._dynamo.reset()
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(BATCH, c_in, SIZE, SIZE, generator=gen)
        factors = torch.randn(BATCH, CLASSES, c_out, SIZE, SIZE, generator=gen)
        geometry = ((3, 3), (1, 1), (1, 1), (1, 1), 1, True)
        compiled = torch.compile(reference.unfolded_gram, dynamic=False)
        return {
            "eager": lambda: reference.unfolded_gram(x, factors, *geometry),
            "compile": lambda: compiled(x, factors, *geometry),
            "bnas_fast": lambda: bnas_fast.unfolded_gram(x, factors, 3, 1, 1, 1, 1, True),
        }

    return Case(op="unfolded_gram", shape=f"N={BATCH} K={CLASSES} {c_in}->{c_out} 3x3 16x16", mode="fwd", build=build)


def cases() -> List[Case]:
    return [_case(c_in, c_out) for c_in, c_out in LAYERS]
