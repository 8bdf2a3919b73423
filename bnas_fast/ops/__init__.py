"""Registered ops: schema, fake kernel, autograd and backend registration, one file per op."""

from bnas_fast.ops.arch_batch_norm import arch_batch_norm, channel_affine
from bnas_fast.ops.depth_loglik import depth_loglik
from bnas_fast.ops.gumbel_sigmoid_dropout import gumbel_sigmoid_dropout
from bnas_fast.ops.mix import mix, mix_sparse
from bnas_fast.ops.rank_one import rank_one_conv_input_grad, rank_one_split
from bnas_fast.ops.unfolded_gram import unfolded_gram

__all__ = ["mix", "mix_sparse", "depth_loglik", "arch_batch_norm", "channel_affine", "gumbel_sigmoid_dropout", "unfolded_gram", "rank_one_split", "rank_one_conv_input_grad"]
