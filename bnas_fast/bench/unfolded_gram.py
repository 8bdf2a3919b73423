"""Benchmark cases for unfolded_gram (per-filter Gauss-Newton blocks, issue 6).

The layers of issue 6's small network: 3x3 convolutions (padding 1, bias) on 16x16 inputs, batch
32, K = 10 exact factors (10 classes), float32: 3 -> 16, 16 -> 32 and 32 -> 32 channels, with
random (full-rank) factors. A fourth case gives the 32 -> 32 layer the factors it has as the last
convolution of a classifier (ReLU, global average pool, Linear): rank one per (example, output
channel), S[n, k, o] = c[n, k, o] relu'(z[n, o]), which the C++ kernel compresses to one factor.
Providers:

* ``eager``: :func:`bnas_fast.reference.unfolded_gram` (unfold the whole input, then two einsums);
* ``compile``: ``torch.compile`` of that reference;
* ``bnas_fast``: the op (C++: the batch's unfolding, two batched GEMMs, rank-one factors compressed).
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch

import bnas_fast
from bnas_fast import reference
from bnas_fast.bench import Case

BATCH, CLASSES, SIZE = 32, 10, 16
LAYERS = ((3, 16), (16, 32), (32, 32))


def _case(c_in: int, c_out: int, rank_one: bool = False) -> Case:
    def build() -> Dict[str, Callable[[], object]]:
        torch._dynamo.reset()
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(BATCH, c_in, SIZE, SIZE, generator=gen)
        if rank_one:  # c[n, k, o] times a ReLU mask over positions, as behind a global average pool
            mask = (torch.randn(BATCH, 1, c_out, SIZE, SIZE, generator=gen) > 0).float()
            factors = torch.randn(BATCH, CLASSES, c_out, 1, 1, generator=gen) * mask / SIZE**2
        else:
            factors = torch.randn(BATCH, CLASSES, c_out, SIZE, SIZE, generator=gen)
        geometry = ((3, 3), (1, 1), (1, 1), (1, 1), 1, True)
        compiled = torch.compile(reference.unfolded_gram, dynamic=False)
        return {
            "eager": lambda: reference.unfolded_gram(x, factors, *geometry),
            "compile": lambda: compiled(x, factors, *geometry),
            "bnas_fast": lambda: bnas_fast.unfolded_gram(x, factors, 3, 1, 1, 1, 1, True),
        }

    shape = f"N={BATCH} K={CLASSES} {c_in}->{c_out} 3x3 16x16" + (" rank-one factors" if rank_one else "")
    return Case(op="unfolded_gram", shape=shape, mode="fwd", build=build)


def cases() -> List[Case]:
    return [_case(c_in, c_out) for c_in, c_out in LAYERS] + [_case(32, 32, rank_one=True)]
