"""Benchmark cases: the one-shot model of seed 004, fused against the plain-PyTorch model.

``oneshot_train_step``: one training step of the one-shot model that ``bnas-fast run oneshot``
trains by default (width 16, 4 choice blocks, 2 stages of 1 cell, 1x28x28 inputs), batch 128 in 4
ghost batches of 32, each ghost batch with its own path-dropout masks: forward, cross-entropy plus
the L2 term on the used parts, backward and an SGD step. The masks are drawn once per case at the
end of the schedule (the full rate, r = 0.1: each operation kept with 0.28, each input of block i
with 1 - 0.1^(1/(2+i))) and half way (half the rate). Providers:

* ``eager``: ``OneShotNet(fused=False)``: every operation and input path runs on every example and
  is multiplied by its mask; ghost batch norm by reshape-mean-var;
* ``compile``: ``torch.compile`` of that plain model's forward;
* ``bnas_fast``: ``OneShotNet(fused=True)``: each path runs only on the ghost batches that keep it
  (``mix_sparse``), fused ghost batch norm (``arch_batch_norm`` with ``group_size``).

``oneshot_scoring``: scoring 16 sampled architectures on 256 validation images. ``eager``: build a
separate plain-PyTorch stand-alone model with the one-shot weights for each and evaluate it;
``bnas_fast``: the one-shot model, 8 architectures per forward pass (one per run of ghost batches).
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from bnas_fast.bench import Case
from bnas_fast.nn.oneshot import Architecture, OneShotNet, sample_path_dropout_masks
from bnas_fast.sampling import PathDropoutSchedule

BATCH, GHOST, IMAGE = 128, 32, (1, 28, 28)
NET = dict(in_channels=1, num_classes=10, channels=16, num_blocks=4, cells_per_stage=1, num_stages=2, ghost_batch_size=GHOST)
WEIGHT_DECAY = 3e-4


def _train_case(progress: float) -> Case:
    def build() -> Dict[str, Callable[[], object]]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        fused = OneShotNet(**NET, fused=True)
        plain = OneShotNet(**NET, fused=False)
        plain.load_state_dict(fused.state_dict())
        plain_for_compile = OneShotNet(**NET, fused=False)
        plain_for_compile.load_state_dict(fused.state_dict())
        compiled = torch.compile(plain_for_compile, dynamic=False)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(BATCH, *IMAGE, generator=gen)
        y = torch.randint(0, 10, (BATCH,), generator=gen)
        masks = sample_path_dropout_masks(BATCH, NET["num_blocks"], PathDropoutSchedule(0.1, 100), int(100 * progress), GHOST, generator=gen)

        def step_of(model, owner):
            optimizer = torch.optim.SGD(owner.parameters(), lr=0.01, momentum=0.9, nesterov=True)

            def step():
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x, masks), y) + 0.5 * WEIGHT_DECAY * owner.l2_penalty(masks)
                loss.backward()
                optimizer.step()

            return step

        return {
            "eager": step_of(plain, plain),
            "compile": step_of(compiled, plain_for_compile),
            "bnas_fast": step_of(fused, fused),
        }

    label = "full rate" if progress >= 1 else f"{progress:.0%} of the rate"
    return Case(op="oneshot_train_step", shape=f"B={BATCH} ghost={GHOST} 1x28x28 w=16, dropout at {label}", mode="fwd+bwd",
                build=build, slow=True)


def _scoring_case() -> Case:
    def build() -> Dict[str, Callable[[], object]]:
        from bnas_fast.methods.oneshot import one_shot_log_probs, separate_models_log_probs

        torch.manual_seed(0)
        model = OneShotNet(**NET, fused=True).eval()
        gen = torch.Generator().manual_seed(2)
        archs = [Architecture.sample(NET["num_blocks"], gen) for _ in range(16)]
        x = torch.randn(256, *IMAGE, generator=gen)
        return {
            "eager": lambda: separate_models_log_probs(model, archs, x),
            "bnas_fast": lambda: one_shot_log_probs(model, archs, x, archs_per_pass=8),
        }

    return Case(op="oneshot_scoring", shape="16 archs x 256 images 1x28x28 w=16", mode="fwd", build=build, slow=True)


def cases() -> List[Case]:
    return [_train_case(1.0), _train_case(0.5), _scoring_case()]
