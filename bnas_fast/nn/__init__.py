"""Drop-in modules built on the fused ops."""

from bnas_fast.nn.mix import MixedOp

__all__ = ["MixedOp"]
