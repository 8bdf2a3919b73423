"""Registered ops: schema, fake kernel, autograd and backend registration, one file per op."""

from bnas_fast.ops.mix import mix, mix_sparse

__all__ = ["mix", "mix_sparse"]
