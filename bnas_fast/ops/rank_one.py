"""Factors of rank one per (example, output channel), back-propagated through a convolution:
``torch.ops.bnas_fast.rank_one_split`` and ``torch.ops.bnas_fast.rank_one_conv_input_grad``.

GGNBlocks back-propagates K square-root factors of the loss Hessian per example through the
network. At the last convolution of most classifiers (followed only by elementwise operations, a
global average pool and Linear layers) the K factors of example n at output channel o are K
scalings of one map: S[k, n, o] = coeffs[k, n, o] maps[n, o]. The transposed convolution that
carries them to the convolution's input is linear, so

    E[k, n] = sum_o coeffs[k, n, o] (maps[n, o] transposed-convolved with W[o])

convolves each map once instead of K times. ``rank_one_split`` finds the split (or reports that
there is none), ``rank_one_conv_input_grad`` computes E from it. Both take and give factor-major
tensors ([K, N, ...]), as ``torch.autograd.grad(..., is_grads_batched=True)`` does.

The ops compute curvature, not differentiable quantities: they have no autograd formula, and the
public functions detach their inputs. The C++ kernels (csrc/rank_one.cpp) run on CPU; the Triton
kernels (:mod:`bnas_fast.triton.rank_one`) are the CUDA backend; :mod:`bnas_fast.reference` is the
specification.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from bnas_fast import _backend, _checks, reference
from bnas_fast.ops._library import LIB
from bnas_fast.ops.unfolded_gram import _pair

__all__ = ["rank_one_split", "rank_one_conv_input_grad"]

LIB.define("rank_one_split(Tensor factors) -> (Tensor, Tensor, Tensor)")
LIB.define(
    "rank_one_conv_input_grad(Tensor coeffs, Tensor maps, Tensor weight, int[2] input_size, int[2] stride, "
    "int[2] padding, int[2] dilation, int groups) -> Tensor"
)


@torch.library.register_fake("bnas_fast::rank_one_split")
def _split_fake(factors):
    K, N, O, Ho, Wo = factors.shape
    return factors.new_empty((K, N, O)), factors.new_empty((N, O, Ho, Wo)), factors.new_empty((), dtype=torch.bool)


@torch.library.register_fake("bnas_fast::rank_one_conv_input_grad")
def _input_grad_fake(coeffs, maps, weight, input_size, stride, padding, dilation, groups):
    K, N = coeffs.shape[:2]
    return coeffs.new_empty((K, N, weight.shape[1] * groups, input_size[0], input_size[1]))


def _triton_split(factors):
    from bnas_fast.triton import rank_one as triton_rank_one

    return triton_rank_one.rank_one_split(factors)


def _triton_input_grad(coeffs, maps, weight, input_size, stride, padding, dilation, groups):
    from bnas_fast.triton import rank_one as triton_rank_one

    return triton_rank_one.rank_one_conv_input_grad(coeffs, maps, weight, input_size, stride, padding, dilation, groups)


_KERNELS = {
    "reference": {"rank_one_split": reference.rank_one_split, "rank_one_conv_input_grad": reference.rank_one_conv_input_grad},
    "triton": {"rank_one_split": _triton_split, "rank_one_conv_input_grad": _triton_input_grad},
}
for _device, _backend_name in _backend.backends().items():
    if _backend_name in _KERNELS:  # "cpp" registered itself from C++
        for _name, _fn in _KERNELS[_backend_name].items():
            LIB.impl(_name, _fn, _device.upper())

_DTYPES = (torch.float32, torch.float64)


def _check_dtype(name: str, t: Tensor, op: str) -> None:
    if t.dtype not in _DTYPES:
        raise TypeError(f"{op}: {name} must be float32 or float64, got {t.dtype}")


def rank_one_split(factors: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """(coeffs [K, N, C_out], maps [N, C_out, Ho, Wo]) with factors[k, n, o] = coeffs[k, n, o]
    maps[n, o] up to rounding, or None when the factors are not of rank one per (n, o) (or hold
    NaN or infinity anywhere, even among zeros). maps[n, o] is the factor of largest norm (module docstring;
    :func:`bnas_fast.reference.rank_one_split` states the test).

    Args:
        factors: [K, N, C_out, Ho, Wo], float32 or float64 (K factors of N examples at a
            convolution's output, as one batched backward pass gives them).
    """
    op = "rank_one_split"
    _checks.check_tensor("factors", factors, op)
    _check_dtype("factors", factors, op)
    if factors.dim() != 5:
        raise ValueError(f"{op}: factors must be [K, N, C_out, Ho, Wo], got {tuple(factors.shape)}")
    coeffs, maps, ok = torch.ops.bnas_fast.rank_one_split(factors.detach())
    return (coeffs, maps) if bool(ok) else None


def rank_one_conv_input_grad(
    coeffs: Tensor,
    maps: Tensor,
    weight: Tensor,
    input_size: Union[int, Sequence[int]],
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[int, Sequence[int]] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
) -> Tensor:
    """The gradients [K, N, C_in, H, W] at a Conv2d's input for the output gradients
    coeffs[k, n, o] maps[n, o] (module docstring; :func:`bnas_fast.reference.rank_one_conv_input_grad`).

    Args:
        coeffs: [K, N, C_out]; maps: [N, C_out, Ho, Wo] (from :func:`rank_one_split`).
        weight: the convolution's [C_out, C_in / groups, kh, kw]; coeffs, maps and weight share a
            dtype (float32 or float64) and a device.
        input_size: the convolution's input (H, W); stride, padding, dilation, groups: its own
            (zero padding as ints; Ho x Wo must be the output size they give). Stride 1 runs the
            fast kernel; other strides are correct but run ATen's transposed convolution.
    """
    op = "rank_one_conv_input_grad"
    for name, t in (("coeffs", coeffs), ("maps", maps), ("weight", weight)):
        _checks.check_tensor(name, t, op)
        _check_dtype(name, t, op)
    _checks.check_same_dtype("maps", maps, "coeffs", coeffs, op)
    _checks.check_same_dtype("weight", weight, "coeffs", coeffs, op)
    _checks.check_same_device("maps", maps, "coeffs", coeffs, op)
    _checks.check_same_device("weight", weight, "coeffs", coeffs, op)
    if coeffs.dim() != 3 or maps.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"{op}: need coeffs [K, N, C_out], maps [N, C_out, Ho, Wo] and weight [C_out, C_in / groups, "
                         f"kh, kw], got {tuple(coeffs.shape)}, {tuple(maps.shape)} and {tuple(weight.shape)}")
    K, N, O = coeffs.shape
    if tuple(maps.shape[:2]) != (N, O):
        raise ValueError(f"{op}: maps {tuple(maps.shape)} does not match coeffs {tuple(coeffs.shape)} (N and C_out)")
    if weight.shape[0] != O:
        raise ValueError(f"{op}: weight has C_out = {weight.shape[0]} but coeffs has C_out = {O}")
    if 0 in weight.shape[2:]:
        raise ValueError(f"{op}: weight has an empty kernel, {tuple(weight.shape[2:])}")
    input_size = _pair("input_size", input_size, 1, op)
    stride, dilation = _pair("stride", stride, 1, op), _pair("dilation", dilation, 1, op)
    padding = _pair("padding", padding, 0, op)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or O % groups:
        raise ValueError(f"{op}: groups must be a positive int that divides C_out = {O}, got {groups!r}")
    kh, kw = weight.shape[2:]
    out = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in zip(input_size, padding, dilation, (kh, kw), stride)]
    if any(size + 2 * p < d * (k - 1) + 1 for size, p, d, k in zip(input_size, padding, dilation, (kh, kw))) or (
            tuple(maps.shape[2:]) != tuple(out)):
        raise ValueError(f"{op}: maps' size {tuple(maps.shape[2:])} is not the convolution's output size for "
                         f"input_size {input_size} (kernel {kh}x{kw}, stride {stride}, padding {padding}, dilation {dilation})")
    return torch.ops.bnas_fast.rank_one_conv_input_grad(
        coeffs.detach(), maps.detach(), weight.detach(), list(input_size), list(stride), list(padding), list(dilation),
        groups,
    )
