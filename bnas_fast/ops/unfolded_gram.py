"""Per-filter Gauss-Newton blocks of a convolution or linear layer: ``torch.ops.bnas_fast.unfolded_gram``.

For a Conv2d with weight W [C_out, C_in / groups, kh, kw] on input x [N, C_in, H, W], and factors
S [N, K, C_out, Ho, Wo] (the K square-root factors of each example's loss Hessian, back-propagated
to the layer's output; :func:`bnas_fast.reference.softmax_ce_hessian_factors` gives them at the
logits), the block of filter o is

    G[o] = sum_n sum_k j[n,k,o] j[n,k,o]^T,   j[n,k,o][d] = sum_p S[n,k,o,p] X_n[p,d]

with X_n the im2col unfolding of x[n] over the input channels of o's group, in W[o].flatten()'s
order, plus a last coordinate sum_p S[n,k,o,p] for the bias. G[o] is the GGN J^T H J of the loss
restricted to (W[o], b[o]). A Linear layer is the 1x1 case (x [N, C_in], S [N, K, C_out]).

The op computes curvature, not a differentiable quantity: it has no autograd formula, and the
public function detaches its inputs. The C++ kernel unfolds one group's input channels for the
batch and runs two batched GEMMs (J = S X^T, then G = J^T J per output channel). Factors that are
rank one per (example, output channel), S[n, k, o] = c[n, k, o] w[n, o] (a layer followed only by
elementwise operations and a global average pool; every Linear layer), are first compressed to the
single factor w sqrt(sum_k c^2), which gives the same blocks with 1/K of the GEMM work. The
Triton kernel (:mod:`bnas_fast.triton.unfolded_gram`, CUDA) does the same two contractions with
tl.dot, gathering the unfolding tile by tile from x instead of materialising it, and computes only
the upper triangle of each symmetric block (without the rank-one compression).
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
from torch import Tensor

from bnas_fast import _backend, _checks, reference
from bnas_fast.ops._library import LIB

__all__ = ["unfolded_gram"]

LIB.define(
    "unfolded_gram(Tensor x, Tensor factors, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
    "int groups, bool bias, bool diagonal=False) -> Tensor"
)


@torch.library.register_fake("bnas_fast::unfolded_gram")
def _fake(x, factors, kernel_size, stride, padding, dilation, groups, bias, diagonal=False):
    d = x.shape[1] // groups * kernel_size[0] * kernel_size[1] + (1 if bias else 0)
    shape = (factors.shape[2], d) if diagonal else (factors.shape[2], d, d)
    return x.new_empty(shape, dtype=reference._accumulation_dtype(x.dtype))


def _triton_kernel(x, factors, kernel_size, stride, padding, dilation, groups, bias, diagonal=False):
    from bnas_fast.triton import unfolded_gram as triton_unfolded_gram

    return triton_unfolded_gram.unfolded_gram(
        x, factors, kernel_size, stride, padding, dilation, groups, bias, diagonal
    )


_KERNELS = {
    "reference": {"unfolded_gram": reference.unfolded_gram},
    "triton": {"unfolded_gram": _triton_kernel},
}
for _device, _backend_name in _backend.backends().items():
    if _backend_name in _KERNELS:  # "cpp" registered itself from C++
        for _name, _fn in _KERNELS[_backend_name].items():
            LIB.impl(_name, _fn, _device.upper())


def _pair(name: str, value: Union[int, Sequence[int]], minimum: int, op: str) -> Tuple[int, int]:
    """(a, b) from an int or a pair of ints in [minimum, MAX_GEOMETRY]; ValueError naming ``name``."""
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, (tuple, list)):
        pair = tuple(value)
    else:
        raise ValueError(f"{op}: {name} must be an int >= {minimum} or a pair of them, got {value!r}")
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in pair):
        raise ValueError(f"{op}: {name} must be an int >= {minimum} or a pair of them, got {value!r}")
    if any(v > _checks.MAX_GEOMETRY for v in pair):
        raise ValueError(f"{op}: {name} must be below 2^31, got {value!r}")
    return pair


def unfolded_gram(
    x: Tensor,
    factors: Tensor,
    kernel_size: Union[int, Sequence[int]] = 1,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[int, Sequence[int]] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
    bias: bool = False,
    diagonal: bool = False,
) -> Tensor:
    """The per-filter GGN blocks of a Conv2d (or Linear) layer (module docstring).

    Args:
        x: the layer's input, [N, C_in, H, W] (Conv2d) or [N, C_in] (Linear).
        factors: [N, K, C_out, Ho, Wo] (Conv2d) or [N, K, C_out] (Linear), same dtype as x.
        kernel_size, stride, padding, dilation, groups: the convolution's (a Linear: the defaults).
        bias: whether the layer has a bias (adds the last coordinate).
        diagonal: only the blocks' diagonals (the exact diagonal GGN; skips the Gram products).

    Returns:
        [C_out, D', D'] (or [C_out, D'] with ``diagonal``), D' = C_in / groups * kh * kw (+ 1 with
        bias), in float32 for float16/bfloat16 inputs, else in x's dtype.
    """
    op = "unfolded_gram"
    _checks.check_tensor("x", x, op)
    _checks.check_bool("bias", bias, op)
    _checks.check_bool("diagonal", diagonal, op)
    _checks.check_tensor("factors", factors, op)
    _checks.check_floating("x", x, op)
    _checks.check_same_dtype("factors", factors, "x", x, op)
    _checks.check_same_device("factors", factors, "x", x, op)
    if x.dim() == 2 and factors.dim() == 3:  # Linear: a 1x1 convolution of a 1x1 image
        x, factors = x[:, :, None, None], factors[:, :, :, None, None]
    if x.dim() != 4 or factors.dim() != 5:
        raise ValueError(
            f"{op}: need x [N, C_in, H, W] with factors [N, K, C_out, Ho, Wo] (or x [N, C_in] with factors "
            f"[N, K, C_out]), got x {tuple(x.shape)} and factors {tuple(factors.shape)}"
        )
    kernel_size = _pair("kernel_size", kernel_size, 1, op)
    stride, dilation = _pair("stride", stride, 1, op), _pair("dilation", dilation, 1, op)
    padding = _pair("padding", padding, 0, op)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    N, C_in, H, W = x.shape
    if factors.shape[0] != N:
        raise ValueError(f"{op}: factors has N = {factors.shape[0]} but x has N = {N}")
    C_out = factors.shape[2]
    if C_in % groups or C_out % groups:
        raise ValueError(f"{op}: groups = {groups} must divide C_in = {C_in} and C_out = {C_out}")
    Ho = (H + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(
            f"{op}: the kernel ({kernel_size[0]}x{kernel_size[1]}, dilation {dilation}) is larger than the "
            f"padded input ({H + 2 * padding[0]}x{W + 2 * padding[1]}): the convolution has no output"
        )
    if tuple(factors.shape[3:]) != (Ho, Wo):
        raise ValueError(f"{op}: factors' output size {tuple(factors.shape[3:])} does not match the convolution's ({Ho}, {Wo})")
    return torch.ops.bnas_fast.unfolded_gram(
        x.detach(), factors.detach(), list(kernel_size), list(stride), list(padding), list(dilation), groups, bool(bias),
        bool(diagonal),
    )
