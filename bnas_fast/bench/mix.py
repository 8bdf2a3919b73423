"""Benchmark cases for mix and MixedOp (issue 2's shapes).

mix: B in {64, 128}, C = 64, 32x32, K in {4, 8}, float32; dense learnable weights, or binary masks
with half the entries zero (no weight gradient); forward and forward+backward.
MixedOp: K = 4 candidates of 3x3 conv-BN-ReLU, half the paths dropped per ghost batch, against the
same candidates in plain PyTorch run on every example and multiplied by the mask.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
from torch import nn

import bnas_fast
from bnas_fast import reference
from bnas_fast.bench import Case

CHANNELS, HEIGHT, WIDTH = 64, 32, 32


def half_masks(batch: int, num_candidates: int, ghost_batch_size: int, seed: int = 0) -> torch.Tensor:
    """[B, K] 0/1 masks keeping exactly K/2 candidates per ghost batch (which half varies)."""
    gen = torch.Generator().manual_seed(seed)
    num_ghost = batch // ghost_batch_size
    order = torch.rand(num_ghost, num_candidates, generator=gen).argsort(dim=1)
    keep = (order < num_candidates // 2).float()
    return keep.repeat_interleave(ghost_batch_size, dim=0)


def _mix_inputs(batch: int, num_candidates: int, masked: bool, backward: bool):
    gen = torch.Generator().manual_seed(0)
    ys = [
        torch.randn(batch, CHANNELS, HEIGHT, WIDTH, generator=gen).requires_grad_(backward)
        for _ in range(num_candidates)
    ]
    if masked:
        weights = half_masks(batch, num_candidates, ghost_batch_size=1)
    else:
        weights = torch.softmax(torch.randn(batch, num_candidates, generator=gen), dim=1)
        weights.requires_grad_(backward)
    return ys, weights


def _mix_bytes(batch: int, num_candidates: int, masked: bool, backward: bool) -> int:
    """Minimal traffic in bytes: forward reads the rows with non-zero weight and writes out; the
    backward reads grad_out, writes every grad_y, and reads every y again when weights need a grad."""
    row = CHANNELS * HEIGHT * WIDTH * 4
    read_rows = num_candidates // 2 if masked else num_candidates
    total = batch * row * (read_rows + 1)
    if backward:
        total += batch * row * (1 + num_candidates + (0 if masked else num_candidates))
    return total


def _mix_case(batch: int, num_candidates: int, masked: bool, backward: bool) -> Case:
    def build() -> Dict[str, Callable[[], object]]:
        torch._dynamo.reset()  # each case compiles afresh (shapes and requires_grad differ)
        ys, weights = _mix_inputs(batch, num_candidates, masked, backward)
        compiled = torch.compile(reference.mix, dynamic=False)
        functions = {"eager": reference.mix, "compile": compiled, "bnas_fast": bnas_fast.mix}
        inputs = [*ys, weights] if (backward and not masked) else list(ys)
        grad_out = torch.randn_like(ys[0]) if backward else None

        def provider(fn):
            if not backward:
                return lambda: fn(ys, weights)
            return lambda: torch.autograd.grad(fn(ys, weights), inputs, grad_out)

        return {name: provider(fn) for name, fn in functions.items()}

    weights_kind = "masks 50%" if masked else "dense w"
    return Case(
        op="mix",
        shape=f"B={batch} K={num_candidates} {CHANNELS}x{HEIGHT}x{WIDTH} {weights_kind}",
        mode="fwd+bwd" if backward else "fwd",
        build=build,
        bytes_moved=_mix_bytes(batch, num_candidates, masked, backward),
        slow=batch == 128,
    )


def conv_bn_relu(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
    )


class DenseMaskedMix(nn.Module):
    """What one writes in plain PyTorch: every candidate on every example, times the mask."""

    def __init__(self, candidates: List[nn.Module]):
        super().__init__()
        self.candidates = nn.ModuleList(candidates)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return sum(weights[:, k, None, None, None] * c(x) for k, c in enumerate(self.candidates))


def _mixed_op_case(batch: int, channels: int, size: int, num_candidates: int, ghost: int) -> Case:
    def build() -> Dict[str, Callable[[], object]]:
        torch.manual_seed(0)
        candidates = [conv_bn_relu(channels) for _ in range(num_candidates)]
        plain = DenseMaskedMix(candidates)
        fused = bnas_fast.nn.MixedOp(candidates)  # the same parameters
        x = torch.randn(batch, channels, size, size, requires_grad=True)
        weights = half_masks(batch, num_candidates, ghost_batch_size=ghost)
        grad_out = torch.randn(batch, channels, size, size)
        params = [x, *plain.parameters()]

        def step(module):
            return lambda: torch.autograd.grad(module(x, weights), params, grad_out)

        return {"eager": step(plain), "bnas_fast": step(fused)}

    return Case(
        op="MixedOp conv3x3-BN-ReLU",
        shape=f"B={batch} C={channels} {size}x{size} K={num_candidates} ghost={ghost} 50% dropped",
        mode="fwd+bwd",
        build=build,
    )


def cases() -> List[Case]:
    out = []
    for batch in (64, 128):
        for num_candidates in (4, 8):
            for masked in (False, True):
                for backward in (False, True):
                    out.append(_mix_case(batch, num_candidates, masked, backward))
    out.append(_mixed_op_case(batch=64, channels=32, size=16, num_candidates=4, ghost=16))
    return out
