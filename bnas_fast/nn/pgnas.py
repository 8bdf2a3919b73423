"""The PGNAS super-network (seed 001, section 3): a narrow multi-branch residual network whose every
convolution drops its input channels with a learnable rate.

A block is x + sum_k branch_k(x), branch_k = ReLU -> drop -> Conv(k x k) -> BN -> ReLU -> drop ->
Conv(k x k) -> BN, one branch per kernel size (the multi-branch ResNet of Gastaldi 2017 that
SupNet-M builds on; branches of different kernel sizes are the paper's "kernel size groups" s).
"drop" is :class:`~bnas_fast.nn.InputDropoutConv2d`'s Gumbel-sigmoid dropout: one mask per
(example, input channel) in training, i.e. the kernel sliced per input channel is switched on or
off; the drop rate is one per convolution (p^s_l of eq. 13, shared by the slices of that
convolution) or one per input channel (``per_channel_rates``).

An *architecture* is one hard keep mask per convolution ([C_in] of 0 / 1): which kernel slices the
candidate keeps. :meth:`PGNASNet.sample_architecture` draws one from the learned rates (each slice
kept with probability 1 - p), :meth:`PGNASNet.set_architecture` fixes it for every example, and
:meth:`PGNASNet.count_parameters` counts what the candidate keeps.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from bnas_fast.nn.gumbel_sigmoid_dropout import InputDropoutConv2d

__all__ = ["MultiBranchBlock", "PGNASNet"]


class MultiBranchBlock(nn.Module):
    """x + sum over kernel sizes k of (ReLU -> drop -> Conv k -> BN -> ReLU -> drop -> Conv k -> BN)(x)."""

    def __init__(self, channels: int, kernel_sizes: Sequence[int], dropout: dict):
        super().__init__()

        def conv(k: int) -> InputDropoutConv2d:
            return InputDropoutConv2d(nn.Conv2d(channels, channels, k, padding=k // 2, bias=False), **dropout)

        self.branches = nn.ModuleList(
            nn.Sequential(nn.ReLU(), conv(k), nn.BatchNorm2d(channels), nn.ReLU(), conv(k), nn.BatchNorm2d(channels))
            for k in kernel_sizes
        )

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for branch in self.branches:
            out = out + branch(x)
        return out


class PGNASNet(nn.Module):
    """stem (Conv3x3 -> BN) -> [blocks -> ReLU -> Conv3x3 stride 2 -> BN] x (stages - 1) -> blocks ->
    ReLU -> global average pool -> linear. Stage s has ``width * 2**s`` channels.

    Args:
        in_channels, num_classes: data.
        width: channels of the first stage.
        num_stages, blocks_per_stage: depth.
        kernel_sizes: one branch per kernel size in every block.
        init_drop: initial drop rate of every slice.
        temperature: of the Gumbel-sigmoid relaxation.
        per_channel_rates: one drop rate per input channel instead of one per convolution.
        mode: "soft" (PGNAS training), "hard" (fixed-rate path dropout, the random baseline).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int = 8,
        num_stages: int = 3,
        blocks_per_stage: int = 1,
        kernel_sizes: Sequence[int] = (3, 5),
        init_drop: float = 0.1,
        temperature: float = 0.2,
        per_channel_rates: bool = False,
        mode: str = "soft",
    ):
        super().__init__()
        for name, value in (("width", width), ("num_stages", num_stages), ("blocks_per_stage", blocks_per_stage)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PGNASNet: {name} must be an int >= 1, got {value!r}")
        if not kernel_sizes or any(not isinstance(k, int) or k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"PGNASNet: kernel_sizes must be odd positive ints, got {kernel_sizes!r}")
        dropout = dict(init_drop=init_drop, temperature=temperature, rescale=False, mode=mode, shared=not per_channel_rates)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        layers: List[nn.Module] = []
        for s in range(num_stages):
            channels = width * 2**s
            layers += [MultiBranchBlock(channels, kernel_sizes, dropout) for _ in range(blocks_per_stage)]
            if s + 1 < num_stages:
                layers += [nn.ReLU(), nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * channels)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width * 2 ** (num_stages - 1), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.body(self.stem(x))).mean((2, 3)))

    def searched_convs(self) -> Dict[str, InputDropoutConv2d]:
        """The convolutions whose input channels are searched, by module name, in network order."""
        return {name: m for name, m in self.named_modules() if isinstance(m, InputDropoutConv2d)}

    def drop_rates(self) -> Dict[str, List[float]]:
        return {name: m.dropout.drop_rate.detach().tolist() for name, m in self.searched_convs().items()}

    def regularizer(self, length_scale: float, num_data: int) -> Tensor:
        """Eq. 15 summed over the searched convolutions."""
        return sum(m.regularizer(length_scale, num_data) for m in self.searched_convs().values())

    def sample_architecture(self, generator: Optional[torch.Generator] = None, drop_rate: Optional[float] = None) -> Dict[str, Tensor]:
        """One hard keep mask [C_in] per searched convolution: slice c kept with probability 1 - p,
        p the learned rate (or ``drop_rate`` for all, the fixed-rate baseline)."""
        return {
            name: m.dropout.sample_keep(m.conv.in_channels, generator, drop_rate) for name, m in self.searched_convs().items()
        }

    def set_architecture(self, masks: Optional[Dict[str, Tensor]]) -> None:
        """Run every example with the architecture ``masks`` (None: back to random masks)."""
        for name, m in self.searched_convs().items():
            m.dropout.fixed_keep = None if masks is None else masks[name]

    def count_parameters(self, masks: Optional[Dict[str, Tensor]] = None) -> int:
        """Parameters of the network, or of the candidate ``masks``: a searched convolution keeps
        C_out * k * k weights per kept input channel (drop rates and masks are not counted)."""
        searched = self.searched_convs()
        skip = {id(m.conv.weight) for m in searched.values()} | {id(m.dropout.drop_logit) for m in searched.values()}
        total = sum(p.numel() for p in self.parameters() if id(p) not in skip)
        for name, m in searched.items():
            w = m.conv.weight
            kept = w.shape[1] if masks is None else int(masks[name].sum())
            total += w.shape[0] * kept * w.shape[2] * w.shape[3]
        return total
