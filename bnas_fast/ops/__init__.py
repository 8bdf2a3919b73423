"""Registered ops: schema, fake kernel, autograd and backend registration, one file per op."""

from bnas_fast.ops.depth_loglik import depth_loglik
from bnas_fast.ops.mix import mix, mix_sparse

__all__ = ["mix", "mix_sparse", "depth_loglik"]
