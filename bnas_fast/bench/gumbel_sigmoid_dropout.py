"""Benchmark cases for gumbel_sigmoid_dropout (concrete dropout with a learnable drop rate, seed 001).

Shape: x [B, C, H, W] = [128, 64, 32, 32] float32, one drop logit per channel, temperature 0.2,
rescaling by 1 / (1 - p); noise per element or per (example, channel). fwd+bwd takes gradients to
x and to the logits. Providers:

* ``eager``: what users of concrete dropout write in plain PyTorch (Gal et al.'s formulation, as
  in the implementations listed in ../shared/notes/peers.md): uniform noise from ``torch.rand``,
  then ``sigmoid((log p - log(1 - p) + log u - log(1 - u)) / tau)`` and the product; autograd
  keeps the noise and every intermediate for the backward;
* ``compile``: ``torch.compile`` of that same function (inductor generates the noise inside its
  fused kernel);
* ``bnas_fast``: :func:`bnas_fast.gumbel_sigmoid_dropout`, the noise regenerated in the backward.

The baselines draw their noise from torch's generator, so their masks differ from bnas_fast's
(which follow :func:`bnas_fast.reference.philox_bits`); the distributions are the same.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch

import bnas_fast
from bnas_fast.bench import Case

SHAPE = (128, 64, 32, 32)
TEMPERATURE = 0.2


def eager_concrete_dropout(x, drop_logit, temperature: float, per_channel: bool):
    """Plain PyTorch concrete dropout, one uniform per unit (eq. 16 with the logistic noise written
    as log u - log(1 - u)); the 1e-7 keeps the logs finite, as Gal et al.'s code does."""
    eps = 1e-7
    p = torch.sigmoid(drop_logit)[None, :, None, None]
    u = torch.rand(x.shape[:2] + (1, 1) if per_channel else x.shape, dtype=x.dtype, device=x.device)
    drop = torch.sigmoid((torch.log(p + eps) - torch.log(1 - p + eps) + torch.log(u + eps) - torch.log(1 - u + eps)) / temperature)
    return x * (1 - drop) / (1 - p)


def _bytes(backward: bool) -> int:
    """Minimal traffic: the forward reads x and writes y; the backward reads grad_y and x (for the
    gradient to the logits) and writes grad_x."""
    n = 1
    for s in SHAPE:
        n *= s
    return (2 + (3 if backward else 0)) * n * 4


def _case(granularity: str, backward: bool) -> Case:
    per_channel = granularity == "channel"

    def build() -> Dict[str, Callable[[], object]]:
        torch._dynamo.reset()
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(*SHAPE, generator=gen).requires_grad_(backward)
        drop_logit = torch.full((SHAPE[1],), -1.0).requires_grad_(backward)
        grad_y = torch.randn(*SHAPE, generator=gen)
        compiled = torch.compile(eager_concrete_dropout, dynamic=False)

        def ours(x, drop_logit, temperature, per_channel):
            return bnas_fast.gumbel_sigmoid_dropout(x, drop_logit, temperature, granularity=granularity)

        functions = {"eager": eager_concrete_dropout, "compile": compiled, "bnas_fast": ours}

        def provider(fn):
            if not backward:
                return lambda: fn(x, drop_logit, TEMPERATURE, per_channel)
            return lambda: torch.autograd.grad(fn(x, drop_logit, TEMPERATURE, per_channel), [x, drop_logit], grad_y)

        return {name: provider(fn) for name, fn in functions.items()}

    return Case(
        op="gumbel_sigmoid_dropout",
        shape=f"B=128 C=64 32x32 per {granularity}",
        mode="fwd+bwd" if backward else "fwd",
        build=build,
        bytes_moved=_bytes(backward),
    )


def cases() -> List[Case]:
    return [_case(g, backward) for g in ("element", "channel") for backward in (False, True)]
