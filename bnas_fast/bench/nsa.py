"""Benchmark case: one NSA-i training step (seed 002), the fused model against its plain-PyTorch twin.

An :class:`~bnas_fast.nn.nsa.NSANet` (width 8, 3 stages of 4 nodes, S = 50 architectures, one per
example) on a batch of 128 images of 1x28x28 (Fashion-MNIST-sized): forward, cross-entropy, backward
and an SGD step. Providers:

* ``eager``: the same network built from plain PyTorch (``NSANet(fused=False)``: stacked weighted
  sums for the per-example aggregation, nn.BatchNorm2d-style batch norm plus gathered affine);
* ``compile``: ``torch.compile`` of that plain network's forward;
* ``bnas_fast``: ``NSANet(fused=True)``: ``bnas_fast.mix`` and ``ArchBatchNorm2d``.

All three start from the same weights and see the same batch and architectures.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from bnas_fast.bench import Case
from bnas_fast.nn.nsa import NSANet

BATCH, IMAGE, WIDTH, NUM_ARCHS = 128, (1, 28, 28), 8, 50


def _case(variant: str) -> Case:
    def build() -> Dict[str, Callable[[], object]]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        fused = NSANet(IMAGE[0], 10, width=WIDTH, num_archs=NUM_ARCHS, variant=variant)
        plain = NSANet(IMAGE[0], 10, width=WIDTH, num_archs=NUM_ARCHS, variant=variant, fused=False)
        plain.load_state_dict(fused.state_dict())
        plain_for_compile = NSANet(IMAGE[0], 10, width=WIDTH, num_archs=NUM_ARCHS, variant=variant, fused=False)
        plain_for_compile.load_state_dict(fused.state_dict())
        compiled = torch.compile(plain_for_compile, dynamic=False)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(BATCH, *IMAGE, generator=gen)
        y = torch.randint(0, 10, (BATCH,), generator=gen)
        arch = torch.randint(0, NUM_ARCHS, (BATCH,), generator=gen)

        def step_of(model, params):
            optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)

            def step():
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(x, arch), y).backward()
                optimizer.step()

            return step

        return {
            "eager": step_of(plain, plain.parameters()),
            "compile": step_of(compiled, plain_for_compile.parameters()),
            "bnas_fast": step_of(fused, fused.parameters()),
        }

    return Case(op="nsa_train_step", shape=f"{variant} B={BATCH} 1x28x28 w={WIDTH} S={NUM_ARCHS}", mode="fwd+bwd", build=build)


def cases() -> List[Case]:
    return [_case("nsa_i"), _case("nsa_id")]
