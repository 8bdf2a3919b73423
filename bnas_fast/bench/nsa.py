"""Benchmark case: one NSA-i training step (seed 002), the fused model against its plain-PyTorch twin.

An :class:`~bnas_fast.nn.nsa.NSANet` (width 8, 3 stages of 4 nodes, S = 50 architectures, one per
example) on a batch of 128 images of 1x28x28 (Fashion-MNIST-sized): forward, cross-entropy, backward
and an SGD step. Providers:

* ``eager``: the same network built from plain PyTorch (``NSANet(fused=False)``: stacked weighted
  sums for the per-example aggregation, nn.BatchNorm2d-style batch norm plus gathered affine);
* ``compile``: ``torch.compile`` of that plain network's forward;
* ``bnas_fast``: ``NSANet(fused=True)``: ``bnas_fast.mix`` and ``ArchBatchNorm2d``.

All three start from the same weights and see the same batch and architectures.

Layouts. PyTorch's CPU convolutions with few channels run about 3x faster in channels-last
(NHWC) than in the default contiguous (NCHW) layout, in the backward above all; plain PyTorch's
stacked sums and batch norm, on the other hand, are slower in channels-last, so the plain network is
fastest in NCHW. bnas_fast's mix and batch norm work on channels-last tensors without copies. Three
cases per variant, so that no comparison hides a layout change:

* ``layout=contiguous``: every provider in NCHW;
* ``layout=channels_last``: every provider in channels-last (model and input);
* ``layout=best``: each eager model in the layout where it is fastest here (plain: NCHW;
  bnas_fast: channels-last); ``compile`` is torch.compile of the NCHW plain network (inductor
  chooses its own convolution layouts).
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from bnas_fast.bench import Case
from bnas_fast.nn.nsa import NSANet

BATCH, IMAGE, WIDTH, NUM_ARCHS = 128, (1, 28, 28), 8, 50


LAYOUTS = ("contiguous", "channels_last", "best")


def _case(variant: str, layout: str) -> Case:
    def build() -> Dict[str, Callable[[], object]]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        fused = NSANet(IMAGE[0], 10, width=WIDTH, num_archs=NUM_ARCHS, variant=variant)
        plain = NSANet(IMAGE[0], 10, width=WIDTH, num_archs=NUM_ARCHS, variant=variant, fused=False)
        plain.load_state_dict(fused.state_dict())
        plain_for_compile = NSANet(IMAGE[0], 10, width=WIDTH, num_archs=NUM_ARCHS, variant=variant, fused=False)
        plain_for_compile.load_state_dict(fused.state_dict())
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(BATCH, *IMAGE, generator=gen)
        y = torch.randint(0, 10, (BATCH,), generator=gen)
        arch = torch.randint(0, NUM_ARCHS, (BATCH,), generator=gen)
        x_last = x.contiguous(memory_format=torch.channels_last)
        inputs = {"plain": x, "compile": x, "fused": x}
        if layout in ("channels_last", "best"):
            fused.to(memory_format=torch.channels_last)
            inputs["fused"] = x_last
        if layout == "channels_last":
            plain.to(memory_format=torch.channels_last)
            plain_for_compile.to(memory_format=torch.channels_last)
            inputs["plain"] = inputs["compile"] = x_last
        compiled = torch.compile(plain_for_compile, dynamic=False)

        def step_of(model, params, images):
            optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)

            def step():
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(images, arch), y).backward()
                optimizer.step()

            return step

        return {
            "eager": step_of(plain, plain.parameters(), inputs["plain"]),
            "compile": step_of(compiled, plain_for_compile.parameters(), inputs["compile"]),
            "bnas_fast": step_of(fused, fused.parameters(), inputs["fused"]),
        }

    shape = f"{variant} B={BATCH} 1x28x28 w={WIDTH} S={NUM_ARCHS} layout={layout}"
    return Case(op="nsa_train_step", shape=shape, mode="fwd+bwd", build=build)


def cases() -> List[Case]:
    return [_case(variant, layout) for variant in ("nsa_i", "nsa_id") for layout in LAYOUTS]
