"""Benchmark cases for depth_loglik (the learnt-depth ELBO's expected log-likelihood).

Shapes (D+1, B, C) = (51, 512, 10) and (21, 256, 10), float32; forward, and forward+backward with
gradients to both the logits and log q. The baselines are the reference (``eager``) and
``torch.compile`` of it; ``bnas_fast`` is the fused op. Peak memory of each provider can be
measured with :func:`bnas_fast.bench.peak_memory_bytes` (the issue asks for it to be below eager's).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch

import bnas_fast
from bnas_fast import reference
from bnas_fast.bench import Case

SHAPES: Tuple[Tuple[int, int, int], ...] = ((51, 512, 10), (21, 256, 10))


def _inputs(depths: int, batch: int, classes: int, backward: bool):
    """logits [D+1, B, C] ~ N(0, 3^2) (non-trivial softmaxes), targets [B], log_q = log_softmax of a
    random [D+1] vector (every depth has mass, as in training), grad_out [B]."""
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(depths, batch, classes, generator=gen)).requires_grad_(backward)
    targets = torch.randint(0, classes, (batch,), generator=gen)
    log_q = torch.log_softmax(torch.randn(depths, generator=gen), 0).requires_grad_(backward)
    grad_out = torch.randn(batch, generator=gen)
    return logits, targets, log_q, grad_out


def _bytes(depths: int, batch: int, classes: int, backward: bool) -> int:
    """Minimal traffic in bytes (float32): the forward reads the logits once and writes [B]; the
    backward reads the logits again and writes their gradient. The reads of targets, log_q and
    grad_out and the write of grad_log_q (O(B + D) bytes, under 1% here) are left out."""
    logits = depths * batch * classes * 4
    total = logits + batch * 4
    if backward:
        total += logits + logits
    return total


def _case(depths: int, batch: int, classes: int, backward: bool) -> Case:
    def build() -> Dict[str, Callable[[], object]]:
        torch._dynamo.reset()  # each case compiles afresh (shapes and requires_grad differ)
        logits, targets, log_q, grad_out = _inputs(depths, batch, classes, backward)
        compiled = torch.compile(reference.depth_loglik, dynamic=False)
        functions = {
            "eager": reference.depth_loglik,
            "compile": compiled,
            "bnas_fast": bnas_fast.depth_loglik,
        }

        def provider(fn):
            if not backward:
                return lambda: fn(logits, targets, log_q)
            return lambda: torch.autograd.grad(fn(logits, targets, log_q), [logits, log_q], grad_out)

        return {name: provider(fn) for name, fn in functions.items()}

    return Case(
        op="depth_loglik",
        shape=f"D+1={depths} B={batch} C={classes}",
        mode="fwd+bwd" if backward else "fwd",
        build=build,
        bytes_moved=_bytes(depths, batch, classes, backward),
    )


def cases() -> List[Case]:
    return [_case(*shape, backward) for shape in SHAPES for backward in (False, True)]
