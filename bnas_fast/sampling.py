"""Architecture samplers: path-dropout masks for one-shot training and per-example architectures.

Path dropout (Bender et al. 2018, §3.2). Each of the k incoming paths of a node is dropped
independently with probability r^(1/k) at the end of training, so the chance of dropping *all* of
them is r whatever the fan-in (r = 0.05: k = 2 drops each with 0.22, k = 7 with 0.65). The rate
rises linearly from 0 over training. Masks are drawn per ghost batch: the examples of one ghost
batch drop the same paths, different ghost batches drop different ones.

Per-example architectures (Deng et al. 2020, NSA-i): an int64 architecture index per example picks
a row of a [S, K] table of adjacency or aggregation coefficients.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from bnas_fast import _checks

__all__ = [
    "path_dropout_rate",
    "linear_schedule",
    "PathDropoutSchedule",
    "path_dropout_mask",
    "arch_weights",
]


def path_dropout_rate(r: float, fan_in: int) -> float:
    """Per-path drop probability r^(1/fan_in): the probability of dropping all fan_in paths is r."""
    if not isinstance(fan_in, int) or fan_in < 1:
        raise ValueError(f"path_dropout_rate: fan_in must be a positive int, got {fan_in!r}")
    if not (isinstance(r, (int, float)) and 0.0 < r < 1.0):
        raise ValueError(f"path_dropout_rate: r must lie in (0, 1), got {r!r}")
    return float(r) ** (1.0 / fan_in)


def linear_schedule(step: int, total_steps: int, final_rate: float) -> float:
    """final_rate * min(step / total_steps, 1): dropout off at step 0, full at total_steps and after."""
    if not isinstance(total_steps, (int, float)) or not 0 < total_steps < math.inf:  # also false for NaN
        raise ValueError(f"linear_schedule: total_steps must be positive and finite, got {total_steps!r}")
    if not isinstance(step, (int, float)) or not 0 <= step < math.inf:
        raise ValueError(f"linear_schedule: step must be non-negative and finite, got {step!r}")
    if not isinstance(final_rate, (int, float)) or not (0.0 <= final_rate <= 1.0):
        raise ValueError(f"linear_schedule: final_rate must lie in [0, 1], got {final_rate}")
    return final_rate * min(step / total_steps, 1.0)


class PathDropoutSchedule:
    """rate(step, fan_in) = min(step / total_steps, 1) * r^(1/fan_in).

    Example::

        schedule = PathDropoutSchedule(r=0.1, total_steps=10_000)
        p = schedule.rate(step, fan_in=3)
        mask = path_dropout_mask(batch_size=64, num_paths=3, drop_rate=p, ghost_batch_size=32)
    """

    def __init__(self, r: float, total_steps: int):
        path_dropout_rate(r, 1)  # validates r
        if not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"PathDropoutSchedule: total_steps must be a positive int, got {total_steps!r}")
        self.r = float(r)
        self.total_steps = total_steps

    def rate(self, step: int, fan_in: int) -> float:
        return linear_schedule(step, self.total_steps, path_dropout_rate(self.r, fan_in))

    def __repr__(self) -> str:
        return f"PathDropoutSchedule(r={self.r}, total_steps={self.total_steps})"


def path_dropout_mask(
    batch_size: int,
    num_paths: int,
    drop_rate: float,
    ghost_batch_size: Optional[int] = None,
    keep_at_least_one: bool = False,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """A [batch_size, num_paths] 0/1 keep-mask, constant within each ghost batch.

    Each path of each ghost batch is dropped independently with probability ``drop_rate``. With
    ``keep_at_least_one`` a ghost batch that dropped every path keeps one, chosen uniformly (this
    changes the marginal keep rate to ``1 - p + p^K / K``). The mask is not rescaled.

    Args:
        batch_size: B.
        num_paths: K, the node's fan-in (or the number of candidate operations).
        drop_rate: per-path drop probability in [0, 1], e.g. ``PathDropoutSchedule.rate(step, K)``.
        ghost_batch_size: examples per ghost batch; must divide ``batch_size``. None: one mask
            for the whole batch; 1: one mask per example.
        generator: torch.Generator for reproducible masks (default: the global generator, so
            ``torch.manual_seed`` controls it).

    Returns:
        [B, K] tensor of ``dtype`` on ``device``; ready as the ``weights`` of :func:`bnas_fast.mix`.
    """
    op = "path_dropout_mask"
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{op}: batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(num_paths, int) or num_paths < 1:
        raise ValueError(f"{op}: num_paths must be a positive int, got {num_paths!r}")
    if not isinstance(drop_rate, (int, float)) or not (0.0 <= drop_rate <= 1.0):
        raise ValueError(f"{op}: drop_rate must lie in [0, 1], got {drop_rate!r}")
    ghost = batch_size if ghost_batch_size is None else ghost_batch_size
    if not isinstance(ghost, int) or ghost < 1 or batch_size % ghost != 0:
        raise ValueError(
            f"{op}: ghost_batch_size must be a positive int that divides batch_size = {batch_size}, "
            f"got {ghost_batch_size!r}"
        )
    num_ghost = batch_size // ghost
    gen_device = generator.device if generator is not None else torch.device("cpu")
    keep = torch.rand(num_ghost, num_paths, generator=generator, device=gen_device) >= drop_rate
    if keep_at_least_one:
        none_kept = ~keep.any(dim=1)
        rescue = torch.randint(num_paths, (num_ghost,), generator=generator, device=gen_device)
        keep[none_kept, rescue[none_kept]] = True
    mask = keep.to(dtype).repeat_interleave(ghost, dim=0)
    return mask.to(device) if device is not None else mask


def arch_weights(arch: Tensor, table: Tensor) -> Tensor:
    """Per-example mixing weights from per-example architectures: ``weights[b] = table[arch[b]]``.

    Args:
        arch: [B] int64 architecture index per example, in [0, S).
        table: [S, K] adjacency or aggregation coefficients (learnable: gradients reach the rows
            that were used).

    Returns:
        [B, K], one gather, no Python loop.
    """
    op = "arch_weights"
    _checks.check_tensor("arch", arch, op)
    _checks.check_tensor("table", table, op)
    if arch.dtype != torch.int64 or arch.dim() != 1:
        raise TypeError(f"{op}: arch must be a 1-D int64 tensor, got {arch.dtype} {tuple(arch.shape)}")
    if table.dim() != 2:
        raise ValueError(f"{op}: table must have shape [S, K], got {tuple(table.shape)}")
    _checks.check_same_device("arch", arch, "table", table, op)
    if not torch.compiler.is_compiling():  # a range check reads arch; index_select checks it too
        _checks.check_index_range("arch", arch, table.shape[0], op, what="a table of S")
    return table.index_select(0, arch)
