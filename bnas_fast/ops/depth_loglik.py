"""Expected log-likelihood over a categorical depth posterior: ``torch.ops.bnas_fast.depth_loglik``.

Learnt-depth networks (seed 000) apply one output block to every depth's activation, giving logits
[D+1, B, C]. The ELBO's data term is, per example,

    out[b] = sum_i q_i * log_softmax(logits[i, b])[y_b],   q = softmax(variational logits)

The fused kernels compute it, and its gradients to the logits and to log q, in one pass over the
logits per (depth, example): no [D+1, B, C] softmax is ever materialised in the forward pass, and
the backward writes the logits' gradient directly.

Schema, fake kernels, autograd and backend registration live here, as for every op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnas_fast import _backend, _checks, reference
from bnas_fast.ops._library import LIB, refuse_second_derivative

__all__ = ["depth_loglik"]

LIB.define("depth_loglik(Tensor logits, Tensor targets, Tensor log_q) -> Tensor")
LIB.define(
    "depth_loglik_backward(Tensor grad_out, Tensor logits, Tensor targets, Tensor log_q) -> (Tensor, Tensor)"
)


@torch.library.register_fake("bnas_fast::depth_loglik")
def _depth_loglik_fake(logits, targets, log_q):
    return logits.new_empty((logits.shape[1],))


@torch.library.register_fake("bnas_fast::depth_loglik_backward")
def _depth_loglik_backward_fake(grad_out, logits, targets, log_q):
    return logits.new_empty(logits.shape), log_q.new_empty(log_q.shape)


def _setup_context(ctx, inputs, output):
    logits, targets, log_q = inputs
    ctx.save_for_backward(logits, targets, log_q)


def _backward_formula(ctx, grad_out):
    logits, targets, log_q = ctx.saved_tensors
    with torch.no_grad():
        grad_logits, grad_log_q = torch.ops.bnas_fast.depth_loglik_backward(grad_out, logits, targets, log_q)
    # No second derivative: the backward op has no autograd formula of its own, and gradients taken
    # with create_graph=True silently differentiated to zero (a review of 2026-12-02 found it).
    grad_logits, grad_log_q = refuse_second_derivative("depth_loglik", (grad_logits, grad_log_q), (grad_out, logits, log_q))
    return (
        grad_logits if ctx.needs_input_grad[0] else None,
        None,
        grad_log_q if ctx.needs_input_grad[2] else None,
    )


torch.library.register_autograd("bnas_fast::depth_loglik", _backward_formula, setup_context=_setup_context)


def _check_values(logits: Tensor, targets: Tensor, log_q: Tensor) -> None:
    op = "depth_loglik"
    if logits.dim() != 3:  # (a direct op call: the kernels check the rest of the shapes)
        raise ValueError(f"{op}: logits must be [D+1, B, C], got {tuple(logits.shape)}")
    _checks.check_index_range("targets", targets, logits.shape[2], op, what="C classes")
    if bool(torch.isnan(log_q).any()) or bool((log_q == float("inf")).any()):
        raise ValueError(f"{op}: log_q contains NaN or +infinity")
    # Only the depths with mass: the C++ and Triton kernels never read the logits of a depth with
    # q = 0 (that is their speed-up for one-hot posteriors), so a NaN there cannot be seen by them,
    # and the public function checks metadata only (a full isfinite pass would read the logits a
    # second time). The reference agrees with them rather than being stricter than the kernels.
    finite = torch.isfinite(logits).flatten(1).all(1)  # [D+1]
    if not bool((finite | ~reference._depth_mass(log_q, logits.dtype)).all()):
        raise ValueError(f"{op}: logits contains NaN or infinity")


def _reference_kernel(logits, targets, log_q):
    _check_values(logits, targets, log_q)
    return reference.depth_loglik(logits, targets, log_q)


def _reference_backward_kernel(grad_out, logits, targets, log_q):
    return reference.depth_loglik_backward(grad_out, logits, targets, log_q)


def _triton_kernel(logits, targets, log_q):
    from bnas_fast.triton import depth_loglik as triton_depth_loglik

    _check_values(logits, targets, log_q)
    return triton_depth_loglik.depth_loglik(logits, targets, log_q)


def _triton_backward_kernel(grad_out, logits, targets, log_q):
    from bnas_fast.triton import depth_loglik as triton_depth_loglik

    return triton_depth_loglik.depth_loglik_backward(grad_out, logits, targets, log_q)


_KERNELS = {
    "reference": {"depth_loglik": _reference_kernel, "depth_loglik_backward": _reference_backward_kernel},
    "triton": {"depth_loglik": _triton_kernel, "depth_loglik_backward": _triton_backward_kernel},
}
for _device, _backend_name in _backend.backends().items():
    if _backend_name in _KERNELS:  # "cpp" registered itself from C++
        for _name, _fn in _KERNELS[_backend_name].items():
            LIB.impl(_name, _fn, _device.upper())


def depth_loglik(logits: Tensor, targets: Tensor, log_q: Tensor) -> Tensor:
    """Per-example expected log-likelihood over depths:
    ``out[b] = sum_i exp(log_q[i]) * log_softmax(logits[i, b])[targets[b]]``.

    Args:
        logits: [D+1, B, C] floating (float32, float64, bfloat16, float16; low precision
            accumulates in float32), the output block applied at every depth 0..D.
        targets: [B] int64 class indices in [0, C).
        log_q: [D+1] log-probabilities of the depth posterior, same dtype and device as logits
            (``torch.log_softmax(q_logits, 0)``). A depth with q = 0 (log_q = -inf) contributes 0.

    Returns:
        [B]. Gradients flow to ``logits`` and ``log_q``.
    """
    op = "depth_loglik"
    _checks.check_tensor("logits", logits, op)
    _checks.check_tensor("targets", targets, op)
    _checks.check_tensor("log_q", log_q, op)
    _checks.check_floating("logits", logits, op)
    if logits.dim() != 3:
        raise ValueError(f"{op}: logits must have shape [D+1, B, C], got {tuple(logits.shape)}")
    if logits.shape[2] < 1:
        raise ValueError(f"{op}: logits must have at least one class (C >= 1), got shape {tuple(logits.shape)}")
    if targets.dtype != torch.int64 or targets.dim() != 1:
        raise TypeError(f"{op}: targets must be a 1-D int64 tensor, got {targets.dtype} {tuple(targets.shape)}")
    if targets.shape[0] != logits.shape[1]:
        raise ValueError(f"{op}: targets has {targets.shape[0]} entries but logits has B = {logits.shape[1]}")
    if log_q.dim() != 1 or log_q.shape[0] != logits.shape[0]:
        raise ValueError(
            f"{op}: log_q must have shape [D+1] = [{logits.shape[0]}] to match logits, got {tuple(log_q.shape)}"
        )
    _checks.check_same_dtype("log_q", log_q, "logits", logits, op)
    _checks.check_same_device("targets", targets, "logits", logits, op)
    _checks.check_same_device("log_q", log_q, "logits", logits, op)
    return torch.ops.bnas_fast.depth_loglik(logits, targets, log_q)
