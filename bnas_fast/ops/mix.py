"""Masked per-example operation mixing: ``torch.ops.bnas_fast.mix`` and ``mix_sparse``.

In one-shot NAS each example of a batch may run its own architecture (NSA-i, eq. 3 of Deng et al.;
path dropout with ghost batches, Bender et al. §3.2). A mixed edge computes

    out[b] = sum_k w[b, k] * y_k[b]

for K candidate outputs y_k and per-example weights w of shape [B, K]. The fused kernels read each
candidate once, skip the rows whose weight is zero, and never stack the candidates.

This file holds the op's schema (defined once, here), its fake kernels (shapes only, for
torch.compile), its autograd formula, the backend registration (C++ on CPU, Triton on CUDA,
the reference where those are missing), and the public functions.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from bnas_fast import _backend, _checks, reference
from bnas_fast.ops._library import LIB, below_autograd, refuse_second_derivative, use_eager_function

__all__ = ["mix", "mix_sparse"]

# ---------------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------------
LIB.define("mix(Tensor[] ys, Tensor weights) -> Tensor")
# relu(mix(ys, weights)) in one pass; its backward is mix_backward with relu_out = its output.
# (A separate op rather than a defaulted flag of mix: the registered autograd's backward must
# return one gradient per argument as called, which setup_context cannot tell for a default.)
LIB.define("mix_relu(Tensor[] ys, Tensor weights) -> Tensor")
LIB.define(
    "mix_backward(Tensor grad_out, Tensor[] ys, Tensor weights, bool weights_requires_grad,"
    " Tensor? relu_out=None) -> (Tensor[], Tensor)"
)
LIB.define("mix_sparse(Tensor[] ys, Tensor[] indices, Tensor weights) -> Tensor")
LIB.define(
    "mix_sparse_backward(Tensor grad_out, Tensor[] ys, Tensor[] indices, Tensor weights,"
    " bool weights_requires_grad) -> (Tensor[], Tensor)"
)


# ---------------------------------------------------------------------------------------------
# Fake kernels: output metadata only (the real kernels return contiguous tensors).
# ---------------------------------------------------------------------------------------------
@torch.library.register_fake("bnas_fast::mix")
def _mix_fake(ys: List[Tensor], weights: Tensor) -> Tensor:
    return ys[0].new_empty(ys[0].shape)


@torch.library.register_fake("bnas_fast::mix_relu")
def _mix_relu_fake(ys: List[Tensor], weights: Tensor) -> Tensor:
    return ys[0].new_empty(ys[0].shape)


@torch.library.register_fake("bnas_fast::mix_backward")
def _mix_backward_fake(grad_out, ys, weights, weights_requires_grad, relu_out=None):
    return [y.new_empty(y.shape) for y in ys], weights.new_empty(weights.shape)


@torch.library.register_fake("bnas_fast::mix_sparse")
def _mix_sparse_fake(ys, indices, weights):
    return ys[0].new_empty((weights.shape[0],) + tuple(ys[0].shape[1:]))


@torch.library.register_fake("bnas_fast::mix_sparse_backward")
def _mix_sparse_backward_fake(grad_out, ys, indices, weights, weights_requires_grad):
    return [y.new_empty(y.shape) for y in ys], weights.new_empty(weights.shape)


# ---------------------------------------------------------------------------------------------
# Autograd: the backward is itself a registered op, so torch.compile traces it too.
# ---------------------------------------------------------------------------------------------
def _mix_setup_context(ctx, inputs, output):
    ys, weights = inputs
    ctx.num_candidates, ctx.relu = len(ys), False
    ctx.save_for_backward(*ys, weights)


def _mix_relu_setup_context(ctx, inputs, output):
    ys, weights = inputs
    ctx.num_candidates, ctx.relu = len(ys), True
    # the output masks the gradient (it is the tensor that the next op keeps anyway)
    ctx.save_for_backward(*ys, weights, output)


def _mix_gradients(ctx, grad_out, weights_requires_grad):
    """(grad_ys, grad_weights) from what the setup saved: (*ys, weights[, relu output])."""
    saved = ctx.saved_tensors
    k = ctx.num_candidates
    ys, weights = list(saved[:k]), saved[k]
    relu_out = saved[k + 1] if ctx.relu else None
    return torch.ops.bnas_fast.mix_backward(grad_out, ys, weights, weights_requires_grad, relu_out)


def _mix_backward_formula(ctx, grad_out):
    weights_requires_grad = ctx.needs_input_grad[1]
    with torch.no_grad():
        grad_ys, grad_weights = _mix_gradients(ctx, grad_out, weights_requires_grad)
    grad_ys, grad_weights = _no_second_derivative(ctx, grad_out, grad_ys, grad_weights)
    return grad_ys, grad_weights if weights_requires_grad else None


def _no_second_derivative(ctx, grad_out, grad_ys, grad_weights):
    """The gradients, made to raise if differentiated again (refuse_second_derivative): the
    backward ops have no derivative of their own."""
    if not torch.is_grad_enabled():  # an ordinary backward pass: skip the saved tensors' unpacking
        return grad_ys, grad_weights
    *grad_ys, grad_weights = refuse_second_derivative("mix", (*grad_ys, grad_weights), (grad_out, *ctx.saved_tensors))
    return list(grad_ys), grad_weights


def _mix_sparse_setup_context(ctx, inputs, output):
    ys, indices, weights = inputs
    ctx.num_candidates = len(ys)
    ctx.save_for_backward(*ys, *indices, weights)


def _mix_sparse_backward_formula(ctx, grad_out):
    saved = ctx.saved_tensors
    k = ctx.num_candidates
    ys, indices, weights = list(saved[:k]), list(saved[k : 2 * k]), saved[2 * k]
    weights_requires_grad = ctx.needs_input_grad[2]
    with torch.no_grad():
        grad_ys, grad_weights = torch.ops.bnas_fast.mix_sparse_backward(
            grad_out, ys, indices, weights, weights_requires_grad
        )
    grad_ys, grad_weights = _no_second_derivative(ctx, grad_out, grad_ys, grad_weights)
    return grad_ys, [None] * k, grad_weights if weights_requires_grad else None


class _MixFunction(torch.autograd.Function):
    """``mix`` in eager mode without the registered autograd's wrapper (``_library.use_eager_function``):
    the same kernels and the formula of :func:`_mix_backward_formula`. Inputs are (weights, relu,
    *ys), as autograd tracks only tensors passed directly."""

    @staticmethod
    def forward(ctx, weights, relu, *ys):
        with below_autograd():
            out = (torch.ops.bnas_fast.mix_relu if relu else torch.ops.bnas_fast.mix)(list(ys), weights)
        ctx.num_candidates, ctx.relu = len(ys), relu
        ctx.save_for_backward(*ys, weights, *([out] if relu else []))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weights_requires_grad = ctx.needs_input_grad[0]
        with below_autograd(), torch.no_grad():
            grad_ys, grad_weights = _mix_gradients(ctx, grad_out, weights_requires_grad)
        grad_ys, grad_weights = _no_second_derivative(ctx, grad_out, grad_ys, grad_weights)
        return (grad_weights if weights_requires_grad else None, None, *grad_ys)


class _MixSparseFunction(torch.autograd.Function):
    """``mix_sparse`` in eager mode, as :class:`_MixFunction`; inputs are (weights, K, *ys, *indices)."""

    @staticmethod
    def forward(ctx, weights, num_candidates, *ys_and_indices):
        ys, indices = list(ys_and_indices[:num_candidates]), list(ys_and_indices[num_candidates:])
        ctx.num_candidates = num_candidates
        ctx.save_for_backward(*ys, *indices, weights)
        with below_autograd():
            return torch.ops.bnas_fast.mix_sparse(ys, indices, weights)

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        k = ctx.num_candidates
        ys, indices, weights = list(saved[:k]), list(saved[k : 2 * k]), saved[2 * k]
        weights_requires_grad = ctx.needs_input_grad[0]
        with below_autograd(), torch.no_grad():
            grad_ys, grad_weights = torch.ops.bnas_fast.mix_sparse_backward(
                grad_out, ys, indices, weights, weights_requires_grad
            )
        grad_ys, grad_weights = _no_second_derivative(ctx, grad_out, grad_ys, grad_weights)
        return (grad_weights if weights_requires_grad else None, None, *grad_ys, *([None] * k))


torch.library.register_autograd("bnas_fast::mix", _mix_backward_formula, setup_context=_mix_setup_context)
torch.library.register_autograd("bnas_fast::mix_relu", _mix_backward_formula, setup_context=_mix_relu_setup_context)
torch.library.register_autograd(
    "bnas_fast::mix_sparse", _mix_sparse_backward_formula, setup_context=_mix_sparse_setup_context
)


# ---------------------------------------------------------------------------------------------
# Backends. The C++ kernels register themselves for CPU when bnas_fast._C is imported; the
# reference (with the value checks the kernels do) fills in where a compiled backend is missing.
# ---------------------------------------------------------------------------------------------
def _check_values(op: str, weights: Tensor, indices: Sequence[Tensor] = ()) -> None:
    _checks.check_finite_values("weights", weights, op)
    for k, idx in enumerate(indices):
        _checks.check_index_range(f"indices[{k}]", idx, weights.shape[0], op)
        if idx.numel() != torch.unique(idx).numel():
            raise ValueError(f"{op}: indices[{k}] lists an example twice")


def _mix_reference_kernel(ys, weights):
    _check_values("mix", weights)
    return reference.mix(ys, weights)


def _mix_relu_reference_kernel(ys, weights):
    _check_values("mix_relu", weights)
    return reference.mix(ys, weights, relu=True)


def _mix_backward_reference_kernel(grad_out, ys, weights, weights_requires_grad, relu_out=None):
    return reference.mix_backward(grad_out, ys, weights, weights_requires_grad, relu_out)


def _mix_sparse_reference_kernel(ys, indices, weights):
    _check_values("mix_sparse", weights, indices)
    return reference.mix_sparse(ys, indices, weights)


def _mix_sparse_backward_reference_kernel(grad_out, ys, indices, weights, weights_requires_grad):
    return reference.mix_sparse_backward(grad_out, ys, indices, weights, weights_requires_grad)


def _mix_triton_kernel(ys, weights):
    from bnas_fast.triton import mix as triton_mix  # imports triton: only on the first CUDA call

    _check_values("mix", weights)
    return triton_mix.mix(ys, weights)


def _mix_relu_triton_kernel(ys, weights):
    from bnas_fast.triton import mix as triton_mix

    _check_values("mix_relu", weights)
    return triton_mix.mix(ys, weights, relu=True)


def _mix_backward_triton_kernel(grad_out, ys, weights, weights_requires_grad, relu_out=None):
    from bnas_fast.triton import mix as triton_mix

    return triton_mix.mix_backward(grad_out, ys, weights, weights_requires_grad, relu_out)


def _mix_sparse_triton_kernel(ys, indices, weights):
    from bnas_fast.triton import mix as triton_mix

    _check_values("mix_sparse", weights, indices)
    return triton_mix.mix_sparse(ys, indices, weights)


def _mix_sparse_backward_triton_kernel(grad_out, ys, indices, weights, weights_requires_grad):
    from bnas_fast.triton import mix as triton_mix

    return triton_mix.mix_sparse_backward(grad_out, ys, indices, weights, weights_requires_grad)


_KERNELS = {
    "reference": {
        "mix": _mix_reference_kernel,
        "mix_relu": _mix_relu_reference_kernel,
        "mix_backward": _mix_backward_reference_kernel,
        "mix_sparse": _mix_sparse_reference_kernel,
        "mix_sparse_backward": _mix_sparse_backward_reference_kernel,
    },
    "triton": {
        "mix": _mix_triton_kernel,
        "mix_relu": _mix_relu_triton_kernel,
        "mix_backward": _mix_backward_triton_kernel,
        "mix_sparse": _mix_sparse_triton_kernel,
        "mix_sparse_backward": _mix_sparse_backward_triton_kernel,
    },
}
for _device, _backend_name in _backend.backends().items():
    if _backend_name in _KERNELS:  # "cpp" registered itself from C++
        for _name, _fn in _KERNELS[_backend_name].items():
            LIB.impl(_name, _fn, _device.upper())


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------
def _check_candidates(op: str, ys: Sequence[Tensor], weights: Tensor, sparse: bool) -> None:
    _checks.check_tensor_list("ys", ys, op)
    _checks.check_tensor("weights", weights, op)
    if len(ys) == 0:
        raise ValueError(f"{op}: ys must hold at least one candidate tensor")
    _checks.check_floating("weights", weights, op)
    if weights.dim() != 2:
        raise ValueError(f"{op}: weights must have shape [B, K], got {tuple(weights.shape)}")
    batch, num_candidates = weights.shape
    if len(ys) != num_candidates:
        raise ValueError(f"{op}: weights has K = {num_candidates} columns but ys holds {len(ys)} candidates")
    first = ys[0]
    if first.dim() < 1:
        raise ValueError(f"{op}: ys[0] must have a batch dimension, got a 0-d tensor")
    for k, y in enumerate(ys):
        _checks.check_same_dtype(f"ys[{k}]", y, "weights", weights, op)
        _checks.check_same_device(f"ys[{k}]", y, "weights", weights, op)
        if y.shape[1:] != first.shape[1:]:
            raise ValueError(
                f"{op}: ys[{k}] has shape {tuple(y.shape)}, which disagrees with ys[0] {tuple(first.shape)} "
                "beyond the batch dimension"
            )
        if not sparse and y.shape[0] != batch:
            raise ValueError(f"{op}: ys[{k}] has batch {y.shape[0]} but weights has B = {batch}")


def _memory_order(ys: Sequence[Tensor]) -> Optional[List[int]]:
    """The permutation of the dimensions after the batch one that puts every candidate in memory
    order, when that is not the identity: for example [0, 2, 3, 1] for channels-last [B, C, H, W]
    tensors, whose permuted views [B, H, W, C] are contiguous. The op is elementwise within an
    example, so it runs on those views (no copy) and its output is permuted back to the candidates'
    layout. None when the candidates are contiguous already, or do not share one dense layout (the
    kernels then read contiguous copies)."""
    first = ys[0]
    if first.dim() < 3 or first.is_contiguous():
        return None
    strides = first.stride()
    rest = sorted(range(1, first.dim()), key=lambda d: -strides[d])
    order = [0] + rest
    for y in ys:
        if y.stride()[1:] != strides[1:] or not y.permute(order).is_contiguous():
            return None
    return order


def _inverse(order: List[int]) -> List[int]:
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim] = position
    return inverse


def mix(ys: Sequence[Tensor], weights: Tensor, *, relu: bool = False) -> Tensor:
    """Per-example weighted sum of K candidate outputs: ``out[b] = sum_k weights[b, k] * ys[k][b]``.

    Args:
        ys: list of K tensors of identical shape [B, *rest] and dtype (float32, float64, bfloat16,
            float16; low precision accumulates in float32). Never stacked.
        weights: [B, K], same dtype and device. Binary masks, softmax weights or aggregation
            coefficients; a zero weight skips the read of that candidate's row (and, when
            ``weights`` needs no gradient, its read in the backward pass too).
        relu: return ``relu(out)``, fused: the ReLU that follows a node's sum in NSA costs no pass of
            its own, forward or backward (the backward masks the gradient by the saved output).

    Returns:
        [B, *rest]: in the candidates' memory layout when they share a dense one (channels-last,
        say; the kernels then work on permuted views, without copies), else contiguous.

    Gradients flow to every ``ys[k]`` (``weights[b, k] * grad[b]``) and to ``weights``
    (``<grad[b], ys[k][b]>``).
    """
    _check_candidates("mix", ys, weights, sparse=False)
    if not isinstance(relu, bool):
        raise TypeError(f"mix: relu must be a bool, got {relu!r}")
    order = _memory_order(ys)
    if order is not None:
        return mix([y.permute(order) for y in ys], weights, relu=relu).permute(_inverse(order))
    if use_eager_function():
        return _MixFunction.apply(weights, relu, *ys)
    return (torch.ops.bnas_fast.mix_relu if relu else torch.ops.bnas_fast.mix)(list(ys), weights)


def mix_sparse(ys: Sequence[Tensor], indices: Sequence[Tensor], weights: Tensor) -> Tensor:
    """Mix candidates that were computed only on the examples that use them.

    ``out[b] = sum_k weights[b, k] * ys[k][i]`` where ``indices[k][i] = b``; an example that a
    candidate did not compute contributes nothing from it. With ``indices[k] = arange(B)`` this is
    :func:`mix`.

    Args:
        ys: list of K tensors [n_k, *rest] (n_k may differ and may be 0).
        indices: list of K int64 tensors [n_k] of distinct example indices in [0, B).
        weights: [B, K].

    Returns:
        [B, *rest]; examples that no candidate covers are zero. The layout follows the candidates'
        as in :func:`mix`.
    """
    op = "mix_sparse"
    _check_candidates(op, ys, weights, sparse=True)
    _checks.check_tensor_list("indices", indices, op)
    if len(indices) != len(ys):
        raise ValueError(f"{op}: indices holds {len(indices)} tensors but ys holds {len(ys)} candidates")
    for k, (y, idx) in enumerate(zip(ys, indices)):
        if idx.dtype != torch.int64 or idx.dim() != 1:
            raise TypeError(f"{op}: indices[{k}] must be a 1-D int64 tensor, got {idx.dtype} {tuple(idx.shape)}")
        _checks.check_same_device(f"indices[{k}]", idx, "weights", weights, op)
        if idx.shape[0] != y.shape[0]:
            raise ValueError(f"{op}: indices[{k}] has {idx.shape[0]} entries but ys[{k}] has {y.shape[0]} rows")
    order = _memory_order(ys)
    if order is not None:
        return mix_sparse([y.permute(order) for y in ys], indices, weights).permute(_inverse(order))
    if use_eager_function():
        return _MixSparseFunction.apply(weights, len(ys), *ys, *indices)
    return torch.ops.bnas_fast.mix_sparse(list(ys), list(indices), weights)
