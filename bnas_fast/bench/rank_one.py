"""Benchmark cases for the rank-one route of GGNBlocks (issue 6): the factors of issue 6's last
convolution carried to its input.

The last layer of issue 6's network, a 32 -> 32 3x3 convolution (padding 1) on 16x16 inputs at
batch 32, behind a ReLU, a global average pool and a Linear head: its K = 10 factors (the 9 exact
ones and the probe) are rank one per (example, output channel), S[k, n, o] = c[k, n, o]
relu'(z[n, o]) / 256. Two cases, float32:

* ``rank_one_conv_input_grad``: the input gradient of the K N factors. ``eager`` is the reference
  (the factors expanded, then ``torch.nn.grad.conv2d_input``: ATen's transposed convolution of
  batch K N, what autograd runs), ``compile`` is ``torch.compile`` of it, ``bnas_fast`` the op on
  the split (the C++ kernel: each map convolved once, then the K scalings mixed in).
* ``rank_one_split``: the split itself, against its reference and ``torch.compile`` of it. It has
  no counterpart in autograd's route: it is the price of the route.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch

import bnas_fast
from bnas_fast import reference
from bnas_fast.bench import Case

BATCH, FACTORS, CHANNELS, SIZE = 32, 10, 32, 16
GEOMETRY = ((SIZE, SIZE), (1, 1), (1, 1), (1, 1), 1)  # input size, stride, padding, dilation, groups


def _inputs():
    gen = torch.Generator().manual_seed(0)
    coeffs = torch.randn(FACTORS, BATCH, CHANNELS, generator=gen)
    maps = (torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=gen) > 0).float() / SIZE**2
    weight = torch.randn(CHANNELS, CHANNELS, 3, 3, generator=gen)
    return coeffs, maps, weight


def _input_grad_case() -> Case:
    def build() -> Dict[str, Callable[[], object]]:
        torch._dynamo.reset()
        coeffs, maps, weight = _inputs()
        compiled = torch.compile(reference.rank_one_conv_input_grad, dynamic=False)
        return {
            "eager": lambda: reference.rank_one_conv_input_grad(coeffs, maps, weight, *GEOMETRY),
            "compile": lambda: compiled(coeffs, maps, weight, *GEOMETRY),
            "bnas_fast": lambda: bnas_fast.rank_one_conv_input_grad(coeffs, maps, weight, *GEOMETRY),
        }

    shape = f"K={FACTORS} N={BATCH} {CHANNELS}->{CHANNELS} 3x3 16x16"
    return Case(op="rank_one_conv_input_grad", shape=shape, mode="fwd", build=build)


def _split_case() -> Case:
    def build() -> Dict[str, Callable[[], object]]:
        torch._dynamo.reset()
        coeffs, maps, _ = _inputs()
        factors = coeffs[..., None, None] * maps
        compiled = torch.compile(reference.rank_one_split, dynamic=False)
        return {
            "eager": lambda: reference.rank_one_split(factors),
            "compile": lambda: compiled(factors),
            "bnas_fast": lambda: bnas_fast.rank_one_split(factors),
        }

    shape = f"K={FACTORS} N={BATCH} C_out={CHANNELS} 16x16"
    return Case(op="rank_one_split", shape=shape, mode="fwd", build=build)


def cases() -> List[Case]:
    return [_input_grad_case(), _split_case()]
