"""Drop-in modules built on the fused ops."""

from bnas_fast.nn.arch_batch_norm import ArchBatchNorm1d, ArchBatchNorm2d, recalibrate_batch_norm
from bnas_fast.nn.depth import (
    ConvBlocks,
    DepthPosterior,
    FCBlocks,
    LearntDepthNet,
    ResNet,
    learnt_depth_net,
    resnet,
)
from bnas_fast.nn.gumbel_sigmoid_dropout import GumbelSigmoidDropout, InputDropoutConv2d, concrete_dropout_regularizer
from bnas_fast.nn.mix import MixedOp, mix_modules
from bnas_fast.nn.oneshot import GhostBatchNorm2d

__all__ = [
    "MixedOp",
    "mix_modules",
    "GhostBatchNorm2d",
    "ArchBatchNorm1d",
    "ArchBatchNorm2d",
    "recalibrate_batch_norm",
    "LearntDepthNet",
    "DepthPosterior",
    "ResNet",
    "FCBlocks",
    "ConvBlocks",
    "learnt_depth_net",
    "resnet",
    "GumbelSigmoidDropout",
    "InputDropoutConv2d",
    "concrete_dropout_regularizer",
]
