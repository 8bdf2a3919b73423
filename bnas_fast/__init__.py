"""bnas_fast: fused kernels for Bayesian and one-shot neural architecture search.

    import bnas_fast
    out = bnas_fast.mix([y0, y1, y2], weights)      # out[b] = sum_k weights[b, k] * y_k[b]
    op = bnas_fast.nn.MixedOp([conv3x3, conv5x5, pool])

Submodules: ``functional`` (every op as a function), ``nn`` (modules), ``sampling`` (path-dropout
masks, per-example architectures), ``curvature`` (Gauss-Newton blocks of a model's layers),
``reference`` (the pure-PyTorch specification of every op).
"""

from bnas_fast import curvature, functional, nn, reference, sampling
from bnas_fast._backend import backends
from bnas_fast.functional import (
    arch_batch_norm,
    arch_weights,
    channel_affine,
    depth_loglik,
    gumbel_sigmoid_dropout,
    mix,
    mix_sparse,
    unfolded_gram,
    rank_one_split,
    rank_one_conv_input_grad,
)

__version__ = "0.1.0"

__all__ = ["curvature", "functional", "nn", "reference", "sampling", "backends", "mix", "mix_sparse", "arch_weights", "depth_loglik", "arch_batch_norm", "channel_affine", "gumbel_sigmoid_dropout", "unfolded_gram", "rank_one_split", "rank_one_conv_input_grad"]
