"""Benchmark cases for arch_batch_norm (architecture-conditional batch norm, NSA-id of seed 002).

Shape: x [B, C, H, W] = [128, 64, 32, 32] float32, arch [B] drawn from S = 5 or S = 500
architectures, weight and bias [S, C], shared running statistics updated in place (training mode).
Providers:

* ``eager``: what a user writes in plain PyTorch, ``F.batch_norm`` (no affine, running statistics
  updated) followed by the gathered affine ``y * weight[arch] + bias[arch]``;
* ``compile``: ``torch.compile`` of that same function;
* ``bnas_fast``: :func:`bnas_fast.arch_batch_norm`.

The ``channels_last`` cases give every provider x and grad_y in torch.channels_last (S = 5).
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import bnas_fast
from bnas_fast.bench import Case

SHAPE = (128, 64, 32, 32)
NUM_ARCHS = (5, 500)


def eager_arch_batch_norm(x, arch, weight, bias, running_mean, running_var, momentum: float = 0.1, eps: float = 1e-5):
    """Plain PyTorch: batch norm over the whole batch, then each example's architecture's affine map."""
    y = F.batch_norm(x, running_mean, running_var, None, None, True, momentum, eps)
    return y * weight[arch][:, :, None, None] + bias[arch][:, :, None, None]


def _inputs(num_archs: int, backward: bool, memory_format=torch.contiguous_format):
    gen = torch.Generator().manual_seed(0)
    B, C, H, W = SHAPE
    x = torch.randn(B, C, H, W, generator=gen).contiguous(memory_format=memory_format).requires_grad_(backward)
    arch = torch.randint(0, num_archs, (B,), generator=gen)
    weight = (1 + 0.1 * torch.randn(num_archs, C, generator=gen)).requires_grad_(backward)
    bias = (0.1 * torch.randn(num_archs, C, generator=gen)).requires_grad_(backward)
    grad_y = torch.randn(B, C, H, W, generator=gen).contiguous(memory_format=memory_format)
    return x, arch, weight, bias, grad_y


def _bytes(backward: bool) -> int:
    """Minimal traffic: the forward reads x twice (statistics, then normalisation: x does not fit
    in cache) and writes y; the backward reads grad_y and x twice and writes grad_x."""
    n = 1
    for s in SHAPE:
        n *= s
    total = 3 * n * 4
    if backward:
        total += 5 * n * 4
    return total


def _case(num_archs: int, backward: bool, channels_last: bool = False) -> Case:
    def build() -> Dict[str, Callable[[], object]]:
        torch._dynamo.reset()
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        x, arch, weight, bias, grad_y = _inputs(num_archs, backward, memory_format)
        C = SHAPE[1]
        running = {name: (torch.zeros(C), torch.ones(C)) for name in ("eager", "compile", "bnas_fast")}
        compiled = torch.compile(eager_arch_batch_norm, dynamic=False)
        functions = {"eager": eager_arch_batch_norm, "compile": compiled, "bnas_fast": bnas_fast.arch_batch_norm}

        def provider(name):
            fn, (rm, rv) = functions[name], running[name]
            if not backward:
                return lambda: fn(x, arch, weight, bias, rm, rv)
            return lambda: torch.autograd.grad(fn(x, arch, weight, bias, rm, rv), [x, weight, bias], grad_y)

        return {name: provider(name) for name in functions}

    return Case(
        op="arch_batch_norm",
        shape=f"B=128 C=64 32x32 S={num_archs}" + (" channels_last" if channels_last else ""),
        mode="fwd+bwd" if backward else "fwd",
        build=build,
        bytes_moved=_bytes(backward),
    )


def cases() -> List[Case]:
    return [_case(s, backward) for s in NUM_ARCHS for backward in (False, True)] + [
        _case(NUM_ARCHS[0], backward, channels_last=True) for backward in (False, True)
    ]
