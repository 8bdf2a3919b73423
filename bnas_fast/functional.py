"""Public functional API: every op of bnas_fast as a plain function (also importable from bnas_fast)."""

from bnas_fast.ops.arch_batch_norm import arch_batch_norm, channel_affine
from bnas_fast.ops.depth_loglik import depth_loglik
from bnas_fast.ops.gumbel_sigmoid_dropout import draw_seed_offset, gumbel_sigmoid_dropout
from bnas_fast.ops.mix import mix, mix_sparse
from bnas_fast.ops.rank_one import rank_one_conv_input_grad, rank_one_split
from bnas_fast.ops.unfolded_gram import unfolded_gram
from bnas_fast.sampling import arch_weights

__all__ = ["mix", "mix_sparse", "arch_weights", "depth_loglik", "arch_batch_norm", "channel_affine", "gumbel_sigmoid_dropout", "draw_seed_offset", "unfolded_gram", "rank_one_split", "rank_one_conv_input_grad"]
