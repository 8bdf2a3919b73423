"""Drop-in modules built on the fused ops."""

from bnas_fast.nn.depth import (
    ConvBlocks,
    DepthPosterior,
    FCBlocks,
    LearntDepthNet,
    ResNet,
    learnt_depth_net,
    resnet,
)
from bnas_fast.nn.mix import MixedOp

__all__ = [
    "MixedOp",
    "LearntDepthNet",
    "DepthPosterior",
    "ResNet",
    "FCBlocks",
    "ConvBlocks",
    "learnt_depth_net",
    "resnet",
]
