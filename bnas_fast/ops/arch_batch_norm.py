"""Architecture-conditional batch norm: ``torch.ops.bnas_fast.arch_batch_norm`` and ``channel_affine``.

Networks with stochastic architectures (seed 002) run a different architecture per example and give
each architecture its own BatchNorm affine parameters, while the batch statistics are taken over the
whole batch (every architecture together, as NSA-i needs) or, optionally, over groups of examples
(the ghost batches of seed 004, section 3.2). In training mode, for group k and channel c,

    y[b, c, :] = (x[b, c, :] - mean[k(b), c]) / sqrt(var[k(b), c] + eps) * weight[arch[b], c] + bias[arch[b], c]

Two ops:

* ``arch_batch_norm(x, arch, weight, bias, group_size, eps) -> (y, mean, invstd, row_mean, row_m2)``:
  training mode, fused forward (two passes over x) and backward (two passes over grad_y and x), the
  statistics of every (example, channel) returned so that running averages (shared or per
  architecture) cost no extra pass over x;
* ``channel_affine(x, scale, shift) -> y``: y[b, c, :] = x[b, c, :] scale[b, c] + shift[b, c], the eval
  mode once the running statistics and affine parameters are folded into [B, C] tensors (autograd
  carries gradients through that folding to weight and bias).

:func:`arch_batch_norm` below is the public function, with the semantics of
``torch.nn.functional.batch_norm`` (running statistics updated in place in training mode).

Layout: a 4-D x in ``torch.channels_last`` (channels-last-contiguous and not contiguous) gives y and
grad_x in channels_last too, and the C++ kernels read it (and grad_y, whatever its layout, brought
to x's) without a copy, so that a network can keep its activations channels-last (where CPU
convolutions with few channels are about 3x faster) with no layout copies around these ops. Every
other x gives contiguous outputs (see :func:`output_memory_format`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bnas_fast import _backend, _checks, reference
from bnas_fast.ops._library import LIB, below_autograd, refuse_second_derivative, use_eager_function

__all__ = ["arch_batch_norm", "channel_affine"]

LIB.define(
    "arch_batch_norm(Tensor x, Tensor arch, Tensor weight, Tensor bias, int group_size, float eps)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
LIB.define(
    "arch_batch_norm_backward(Tensor grad_y, Tensor x, Tensor arch, Tensor weight, Tensor mean, Tensor invstd,"
    " int group_size) -> (Tensor, Tensor, Tensor)"
)
LIB.define("channel_affine(Tensor x, Tensor scale, Tensor shift) -> Tensor")
LIB.define("channel_affine_backward(Tensor grad_y, Tensor x, Tensor scale) -> (Tensor, Tensor, Tensor)")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def output_memory_format(x: Tensor) -> torch.memory_format:
    """The layout of the outputs of x's shape (y of the forwards, grad_x of the backwards).

    The layout contract of the four ops, the same for every backend (C++, Triton, reference) and
    for the fake kernels: a 4-D x that is channels-last-contiguous and not contiguous gives
    channels-last outputs, and every other x contiguous ones. (The ambiguous x that is both, such as
    C = 1 or H = W = 1, stays contiguous.) The C++ kernels read such an x (and grad_y, brought to
    x's layout) in place, without a copy; the [G, C], [B, C] and [S, C] outputs do not change.
    """
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


@torch.library.register_fake("bnas_fast::arch_batch_norm")
def _arch_batch_norm_fake(x, arch, weight, bias, group_size, eps):
    B, C = x.shape[0], x.shape[1]
    acc = _acc_dtype(x.dtype)
    G = B // group_size
    return (
        torch.empty_like(x, memory_format=output_memory_format(x)),
        x.new_empty((G, C), dtype=acc),
        x.new_empty((G, C), dtype=acc),
        x.new_empty((B, C), dtype=acc),
        x.new_empty((B, C), dtype=acc),
    )


@torch.library.register_fake("bnas_fast::arch_batch_norm_backward")
def _arch_batch_norm_backward_fake(grad_y, x, arch, weight, mean, invstd, group_size):
    return torch.empty_like(x, memory_format=output_memory_format(x)), torch.empty_like(weight), torch.empty_like(weight)


@torch.library.register_fake("bnas_fast::channel_affine")
def _channel_affine_fake(x, scale, shift):
    return torch.empty_like(x, memory_format=output_memory_format(x))


@torch.library.register_fake("bnas_fast::channel_affine_backward")
def _channel_affine_backward_fake(grad_y, x, scale):
    return torch.empty_like(x, memory_format=output_memory_format(x)), torch.empty_like(scale), torch.empty_like(scale)


def _bn_setup_context(ctx, inputs, output):
    x, arch, weight, bias, group_size, eps = inputs
    y, mean, invstd, row_mean, row_m2 = output
    ctx.mark_non_differentiable(mean, invstd, row_mean, row_m2)
    ctx.save_for_backward(x, arch, weight, mean, invstd)
    ctx.group_size = group_size


def _bn_gradients(ctx, grad_y):
    x, arch, weight, mean, invstd = ctx.saved_tensors
    return torch.ops.bnas_fast.arch_batch_norm_backward(grad_y, x, arch, weight, mean, invstd, ctx.group_size)


def _bn_finish(ctx, grad_y, gradients):
    """The backward formula's outputs from the kernel's (grad_x, grad_weight, grad_bias). The
    backward op has no derivative of its own: differentiating these gradients again raises."""
    if torch.is_grad_enabled():  # create_graph=True (an ordinary backward pass skips the saved tensors' unpacking)
        x, _, weight, _, _ = ctx.saved_tensors
        gradients = refuse_second_derivative("arch_batch_norm", tuple(gradients), (grad_y, x, weight))
    grad_x, grad_weight, grad_bias = gradients
    return (
        grad_x if ctx.needs_input_grad[0] else None,
        None,
        grad_weight if ctx.needs_input_grad[2] else None,
        grad_bias if ctx.needs_input_grad[3] else None,
        None,
        None,
    )


def _bn_backward(ctx, grad_y, _grad_mean, _grad_invstd, _grad_row_mean, _grad_row_m2):
    with torch.no_grad():
        gradients = _bn_gradients(ctx, grad_y)
    return _bn_finish(ctx, grad_y, gradients)


torch.library.register_autograd("bnas_fast::arch_batch_norm", _bn_backward, setup_context=_bn_setup_context)


def _affine_setup_context(ctx, inputs, output):
    x, scale, shift = inputs
    ctx.save_for_backward(x, scale)


def _affine_gradients(ctx, grad_y):
    x, scale = ctx.saved_tensors
    return torch.ops.bnas_fast.channel_affine_backward(grad_y, x, scale)


def _affine_finish(ctx, grad_y, gradients):
    """As :func:`_bn_finish`, for channel_affine."""
    if torch.is_grad_enabled():  # create_graph=True
        x, scale = ctx.saved_tensors
        gradients = refuse_second_derivative("channel_affine", tuple(gradients), (grad_y, x, scale))
    grad_x, grad_scale, grad_shift = gradients
    return (
        grad_x if ctx.needs_input_grad[0] else None,
        grad_scale if ctx.needs_input_grad[1] else None,
        grad_shift if ctx.needs_input_grad[2] else None,
    )


def _affine_backward(ctx, grad_y):
    with torch.no_grad():
        gradients = _affine_gradients(ctx, grad_y)
    return _affine_finish(ctx, grad_y, gradients)


torch.library.register_autograd("bnas_fast::channel_affine", _affine_backward, setup_context=_affine_setup_context)


class _ArchBatchNormFunction(torch.autograd.Function):
    """``arch_batch_norm`` in eager mode without the registered autograd's wrapper
    (``_library.use_eager_function``): the same kernels, setup and backward formula."""

    @staticmethod
    def forward(ctx, x, arch, weight, bias, group_size, eps):
        with below_autograd():
            outputs = torch.ops.bnas_fast.arch_batch_norm(x, arch, weight, bias, group_size, eps)
        _bn_setup_context(ctx, (x, arch, weight, bias, group_size, eps), outputs)
        return outputs

    @staticmethod
    def backward(ctx, grad_y, *_grads_of_statistics):
        with below_autograd(), torch.no_grad():
            gradients = _bn_gradients(ctx, grad_y)
        return _bn_finish(ctx, grad_y, gradients)


class _ChannelAffineFunction(torch.autograd.Function):
    """``channel_affine`` in eager mode, as :class:`_ArchBatchNormFunction`."""

    @staticmethod
    def forward(ctx, x, scale, shift):
        _affine_setup_context(ctx, (x, scale, shift), None)
        with below_autograd():
            return torch.ops.bnas_fast.channel_affine(x, scale, shift)

    @staticmethod
    def backward(ctx, grad_y):
        with below_autograd(), torch.no_grad():
            gradients = _affine_gradients(ctx, grad_y)
        return _affine_finish(ctx, grad_y, gradients)


def _channel_affine_op(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    if use_eager_function():
        return _ChannelAffineFunction.apply(x, scale, shift)
    return torch.ops.bnas_fast.channel_affine(x, scale, shift)


def _in_layout_of(t: Tensor, x: Tensor) -> Tensor:
    """t (of x's shape) in the layout :func:`output_memory_format` gives x (a copy only if it differs)."""
    return t.contiguous(memory_format=output_memory_format(x))


def _reference_bn(x, arch, weight, bias, group_size, eps):
    _checks.check_index_range("arch", arch, weight.shape[0], "arch_batch_norm", what="S architectures")
    y, *stats = reference.arch_batch_norm(x, arch, weight, bias, group_size, eps)
    return (_in_layout_of(y, x), *stats)


def _reference_bn_backward(grad_y, x, arch, weight, mean, invstd, group_size):
    grad_x, grad_weight, grad_bias = reference.arch_batch_norm_backward(grad_y, x, arch, weight, mean, invstd, group_size)
    return _in_layout_of(grad_x, x), grad_weight, grad_bias


def _reference_affine(x, scale, shift):
    return _in_layout_of(reference.channel_affine(x, scale, shift), x)


def _reference_affine_backward(grad_y, x, scale):
    grad_x, grad_scale, grad_shift = reference.channel_affine_backward(grad_y, x, scale)
    return _in_layout_of(grad_x, x), grad_scale, grad_shift


def _triton_bn(x, arch, weight, bias, group_size, eps):
    from bnas_fast.triton import arch_batch_norm as triton_bn

    _checks.check_index_range("arch", arch, weight.shape[0], "arch_batch_norm", what="S architectures")
    return triton_bn.arch_batch_norm(x, arch, weight, bias, group_size, eps)


def _triton_bn_backward(grad_y, x, arch, weight, mean, invstd, group_size):
    from bnas_fast.triton import arch_batch_norm as triton_bn

    return triton_bn.arch_batch_norm_backward(grad_y, x, arch, weight, mean, invstd, group_size)


def _triton_affine(x, scale, shift):
    from bnas_fast.triton import arch_batch_norm as triton_bn

    return triton_bn.channel_affine(x, scale, shift)


def _triton_affine_backward(grad_y, x, scale):
    from bnas_fast.triton import arch_batch_norm as triton_bn

    return triton_bn.channel_affine_backward(grad_y, x, scale)


_KERNELS = {
    "reference": {
        "arch_batch_norm": _reference_bn,
        "arch_batch_norm_backward": _reference_bn_backward,
        "channel_affine": _reference_affine,
        "channel_affine_backward": _reference_affine_backward,
    },
    "triton": {
        "arch_batch_norm": _triton_bn,
        "arch_batch_norm_backward": _triton_bn_backward,
        "channel_affine": _triton_affine,
        "channel_affine_backward": _triton_affine_backward,
    },
}
for _device, _backend_name in _backend.backends().items():
    if _backend_name in _KERNELS:  # "cpp" registered itself from C++
        for _name, _fn in _KERNELS[_backend_name].items():
            LIB.impl(_name, _fn, _device.upper())


# ----------------------------------------------------------------------------------------------
# the public function
# ----------------------------------------------------------------------------------------------


def _check_running(name: str, value: Optional[Tensor], S: int, C: int, x: Tensor, op: str) -> None:
    if value is None:
        return
    _checks.check_tensor(name, value, op)
    _checks.check_floating(name, value, op)
    _checks.check_same_device(name, value, "x", x, op)
    if tuple(value.shape) not in ((C,), (S, C)):
        raise ValueError(
            f"{op}: {name} must be [C] = [{C}] (shared) or [S, C] = [{S}, {C}] (per architecture), "
            f"got {tuple(value.shape)}"
        )


@torch.no_grad()
def _update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    arch: Tensor,
    row_mean: Tensor,
    row_m2: Tensor,
    L: int,
    momentum: float,
    arch_momentum: Optional[Tensor],
) -> None:
    """running = (1 - momentum) running + momentum batch statistic, the variance unbiased (as
    torch.nn.BatchNorm). Shared ([C]): over the whole batch. Per architecture ([S, C]): row s from the
    examples with arch = s only, averaging the mean and the second moment var + mean^2 (so the
    variance between batches' examples is kept); architectures absent from the batch keep their
    statistics. An architecture with a single value per channel in the batch (one example of a
    [B, C] input) still moves them: its within-batch variance is 0, and the mixture below adds the
    spread between its examples across batches. ``arch_momentum`` [S] overrides the momentum per architecture
    (the cumulative average: 1 / number of batches that architecture has been seen in)."""
    B = row_mean.shape[0]
    if running_mean.dim() == 1:
        mean = row_mean.mean(0)
        m2 = row_m2.sum(0) + L * ((row_mean - mean) ** 2).sum(0)
        var = m2 / (B * L - 1)
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_(var.to(running_var.dtype), momentum)
        return
    S, C = running_mean.shape
    count = torch.bincount(arch, minlength=S).to(row_mean.dtype)  # examples per architecture
    present = count > 0  # as the module counts the batches an architecture was seen in
    safe = count.clamp(min=1).unsqueeze(1)
    mean = torch.zeros(S, C, dtype=row_mean.dtype, device=row_mean.device).index_add_(0, arch, row_mean) / safe
    spread = L * (row_mean - mean[arch]) ** 2
    m2 = torch.zeros_like(mean).index_add_(0, arch, row_m2 + spread)
    var = m2 / (safe * L - 1).clamp(min=1)
    weight = arch_momentum if arch_momentum is not None else torch.full((S,), momentum, dtype=row_mean.dtype, device=row_mean.device)
    weight = weight.to(device=row_mean.device, dtype=row_mean.dtype)
    weight = torch.where(present, weight, torch.zeros_like(weight))
    weight = weight.unsqueeze(1)
    # Average the first two moments, not the per-batch variances: an architecture meets few
    # examples per batch (one, with S = 50 and B = 64), and the variance within those misses the
    # variance between examples. Mixing the old statistics (weight 1 - w) with the batch's (w) as two
    # populations, the law of total variance gives the variance of the mixture:
    #   (1 - w) old_var + w var + w (1 - w) (mean - old_mean)^2,
    # so running_var estimates the variance over all of the architecture's examples. (Written
    # through E[x^2] - mean^2 instead, it cancels to 0 when the mean is large against the spread.)
    old_mean, old_var = running_mean.to(mean.dtype), running_var.to(var.dtype)
    delta = mean - old_mean
    new_mean = old_mean + weight * delta
    new_var = old_var + weight * (var - old_var) + weight * (1 - weight) * delta**2
    running_mean.copy_(new_mean.to(running_mean.dtype))
    running_var.copy_(new_var.to(running_var.dtype))


def _check_arch_momentum(arch_momentum, running_mean: Optional[Tensor], S: int, x: Tensor, op: str) -> None:
    """arch_momentum: an [S] floating tensor with values in [0, 1], for [S, C] running statistics only."""
    _checks.check_tensor("arch_momentum", arch_momentum, op)
    if running_mean is None or running_mean.dim() != 2:
        raise ValueError(f"{op}: arch_momentum applies to per-architecture [S, C] running statistics only")
    if not arch_momentum.is_floating_point() or tuple(arch_momentum.shape) != (S,):
        raise ValueError(
            f"{op}: arch_momentum must be a floating [S] = [{S}] tensor, got {arch_momentum.dtype} "
            f"{tuple(arch_momentum.shape)}"
        )
    _checks.check_same_device("arch_momentum", arch_momentum, "x", x, op)
    if not torch.compiler.is_compiling() and not bool(((arch_momentum >= 0) & (arch_momentum <= 1)).all()):
        raise ValueError(
            f"{op}: arch_momentum must have every value in [0, 1] (no NaN), got {arch_momentum.tolist()}"
        )


def arch_batch_norm(
    x: Tensor,
    arch: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    group_size: Optional[int] = None,
    arch_momentum: Optional[Tensor] = None,
    num_archs: Optional[int] = None,
) -> Tensor:
    """Architecture-conditional batch norm, like ``torch.nn.functional.batch_norm`` with per-example
    affine parameters ``weight[arch[b]]``, ``bias[arch[b]]``.

    Args:
        x: [B, C, *] floating (float32, float64, bfloat16, float16; low precision accumulates in float32).
        arch: [B] int64 architecture index of each example, in [0, S).
        weight, bias: [S, C] (dtype of x), or None for 1 and 0.
        running_mean, running_var: None, [C] (shared by every architecture) or [S, C] (one pair per
            architecture, updated from that architecture's examples only). Updated in place in
            training mode; used instead of the batch statistics in eval mode (then required).
        training: batch statistics (True) or running statistics (False).
        momentum: weight of the new statistic in the running average (as in torch.nn.BatchNorm).
        eps: added to the variance.
        group_size: examples per statistics group (ghost batches; consecutive examples); None or B
            for the whole batch. Must divide B. Running statistics are taken over the whole batch.
        arch_momentum: optional [S] per-architecture momentum in [0, 1] for [S, C] running
            statistics (the cumulative average of ``ArchBatchNorm2d(momentum=None)``).
        num_archs: S, when neither weight, bias nor [S, C] running statistics give it (default 1):
            the range of ``arch``.

    Returns:
        y, the shape and dtype of x; channels-last for a channels-last 4-D x (that is not also
        contiguous), else contiguous. A batch with no elements (B = 0 or an empty spatial size)
        gives an empty y and leaves the running statistics alone, as torch.nn.BatchNorm does.
    """
    op = "arch_batch_norm"
    _checks.check_tensor("x", x, op)
    _checks.check_bool("training", training, op)
    _checks.check_floating("x", x, op)
    _checks.check_tensor("arch", arch, op)
    if x.dim() < 2:
        raise ValueError(f"{op}: x must have shape [B, C, *], got {tuple(x.shape)}")
    B, C = x.shape[0], x.shape[1]
    if arch.dtype != torch.int64 or arch.dim() != 1 or arch.shape[0] != B:
        raise ValueError(f"{op}: arch must be a [B] = [{B}] int64 tensor, got {arch.dtype} {tuple(arch.shape)}")
    _checks.check_same_device("arch", arch, "x", x, op)
    S = None
    for name, value in (("weight", weight), ("bias", bias)):
        if value is None:
            continue
        _checks.check_tensor(name, value, op)
        _checks.check_same_dtype(name, value, "x", x, op)
        _checks.check_same_device(name, value, "x", x, op)
        if value.dim() != 2 or value.shape[1] != C:
            raise ValueError(f"{op}: {name} must have shape [S, C] with C = {C}, got {tuple(value.shape)}")
        if S is not None and value.shape[0] != S:
            raise ValueError(f"{op}: weight has S = {S} rows but bias has {value.shape[0]}")
        S = value.shape[0]
    for name, value in (("running_mean", running_mean), ("running_var", running_var)):
        if value is not None and S is None and value.dim() == 2:
            S = value.shape[0]
    if num_archs is not None:
        if isinstance(num_archs, bool) or not isinstance(num_archs, int) or num_archs < 1:
            raise ValueError(f"{op}: num_archs must be an int >= 1, got {num_archs!r}")
        if S is not None and S != num_archs:
            raise ValueError(f"{op}: num_archs = {num_archs} but weight, bias or the running statistics have S = {S}")
        S = num_archs
    if S is None:
        S = 1
    _check_running("running_mean", running_mean, S, C, x, op)
    _check_running("running_var", running_var, S, C, x, op)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: give both running_mean and running_var, or neither")
    if running_mean is not None and running_mean.shape != running_var.shape:
        raise ValueError(
            f"{op}: running_mean {tuple(running_mean.shape)} and running_var {tuple(running_var.shape)} differ in shape"
        )
    if not isinstance(eps, (int, float)) or not eps >= 0 or eps == float("inf"):
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")
    if arch_momentum is not None:
        _check_arch_momentum(arch_momentum, running_mean, S, x, op)
    if weight is None:
        weight = x.new_ones((S, C))
    if bias is None:
        bias = x.new_zeros((S, C))
    L = x[0, 0].numel() if B * C else 0

    if not training:
        if running_mean is None:
            raise ValueError(f"{op}: eval mode (training=False) needs running_mean and running_var")
        if not torch.compiler.is_compiling():  # reads arch; under torch.compile the gather checks instead
            _checks.check_index_range("arch", arch, S, op, what="S architectures")
        acc = _acc_dtype(x.dtype)
        rm = (running_mean[arch] if running_mean.dim() == 2 else running_mean.expand(B, C)).to(acc)
        rv = (running_var[arch] if running_var.dim() == 2 else running_var.expand(B, C)).to(acc)
        scale = torch.rsqrt(rv + eps) * weight.to(acc)[arch]
        shift = bias.to(acc)[arch] - rm * scale
        return _channel_affine_op(x, scale, shift)

    if group_size is None:
        group_size = max(B, 1)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or B % group_size:
        raise ValueError(f"{op}: group_size must be an int >= 1 that divides the batch size B = {B}, got {group_size!r}")
    if x.numel() == 0:
        # No kernel runs to check arch as it reads it: check it here (it is tiny or empty).
        _checks.check_index_range("arch", arch, S, op, what="S architectures")
        # as torch: an empty output still in the graph of x, weight and bias; no statistics to update
        return x.clone() + 0 * (weight.sum() + bias.sum())
    if group_size == 1 and B > 1:
        raise ValueError(
            f"{op}: group_size = 1 puts one example per statistics group: that is instance norm, and with "
            "no spatial extent the variance is undefined; use groups of 2 or more examples"
        )
    if group_size * L < 2:
        raise ValueError(
            f"{op}: expected more than 1 value per channel in each statistics group when training, got "
            f"{group_size * L} (x of shape {tuple(x.shape)}, group_size = {group_size}); the variance is undefined"
        )
    if not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
        raise ValueError(f"{op}: momentum must be a number in [0, 1], got {momentum!r}")
    bn = _ArchBatchNormFunction.apply if use_eager_function() else torch.ops.bnas_fast.arch_batch_norm
    y, _mean, _invstd, row_mean, row_m2 = bn(x, arch, weight, bias, group_size, float(eps))
    if running_mean is not None:
        _update_running_stats(running_mean, running_var, arch, row_mean, row_m2, L, momentum, arch_momentum)
    return y


def channel_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """y[b, c, :] = x[b, c, :] * scale[b, c] + shift[b, c].

    Args:
        x: [B, C, *] floating.
        scale, shift: [B, C] in x's accumulation dtype (float32 for bfloat16/float16, else x's dtype).
    """
    op = "channel_affine"
    _checks.check_tensor("x", x, op)
    _checks.check_floating("x", x, op)
    if x.dim() < 2:
        raise ValueError(f"{op}: x must have shape [B, C, *], got {tuple(x.shape)}")
    acc = _acc_dtype(x.dtype)
    for name, value in (("scale", scale), ("shift", shift)):
        _checks.check_tensor(name, value, op)
        _checks.check_same_device(name, value, "x", x, op)
        if tuple(value.shape) != (x.shape[0], x.shape[1]) or value.dtype != acc:
            raise ValueError(
                f"{op}: {name} must be [B, C] = [{x.shape[0]}, {x.shape[1]}] of dtype {acc}, got "
                f"{value.dtype} {tuple(value.shape)}"
            )
    return _channel_affine_op(x, scale, shift)
