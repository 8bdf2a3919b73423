"""Triton kernels for the expected log-likelihood over a depth posterior (the CUDA backend of
``bnas_fast::depth_loglik``).

With x = logits [D+1, B, C], y = targets [B], q_i = exp(log_q[i]), g = grad_out [B] and
lse_{i,b} = logsumexp(x[i, b, :]):

    out[b]              = sum_i q_i * (x[i, b, y_b] - lse_{i,b})
    grad_x[i, b, c]     = g_b * q_i * (1[c = y_b] - exp(x[i, b, c] - lse_{i,b}))
    grad_log_q[i]       = q_i * sum_b g_b * (x[i, b, y_b] - lse_{i,b})

The design mirrors csrc/depth_loglik.cpp:

* One program per block of BLOCK_B examples; it loops over the D+1 depths itself, so the forward
  accumulates out[b] in registers and writes it once, and no cross-program reduction over depths is
  needed (a 2-D grid over (depth, block) would need one).
* A row of C logits is one masked load: BLOCK_C = next_pow2(C), padding columns read as -inf so
  they vanish from the max and the sum of exponentials. The logit of the target is picked out of
  the loaded tile (no second, gathered load), and no softmax is ever written in the forward.
* A depth with q_i = 0 (log_q = -inf) is skipped by a scalar branch: its logits are not read, it
  adds nothing to out, and the backward writes zeros for its gradient.
* float16/bfloat16 accumulate in float32; float32 and float64 in their own type.
* grad_log_q: each program writes its partial sums sum_{b in block} g_b * log p_i(y_b) to a
  [programs, D+1] buffer, which torch reduces over programs in a fixed order and multiplies by q.
  No atomics, so the backward is deterministic.

The launchers own the layout (strides, output allocation, block sizes); the kernels own the math.
Logits are read through their strides, so a non-contiguous view costs no copy. The value checks
(targets in range, log_q and logits finite) happen in :mod:`bnas_fast.ops.depth_loglik` before the
forward launcher is called; both launchers repeat the C++ kernel's shape and dtype checks (metadata
only), because a direct call of the op on CUDA reaches them without the public function's checks, and
targets or log_q shorter than the logits' B or D+1 would be read out of bounds. There is no autograd
logic here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["MAX_TILE", "depth_loglik", "depth_loglik_backward"]

# Elements (BLOCK_B * BLOCK_C) of logits held by one program per depth. 1024 with the default 4
# warps is 8 values per thread: enough per load to be efficient, few enough registers that the
# backward's several live tiles do not spill, and for the common small C (e.g. C = 10 -> 64
# examples per program, the chunk size of the C++ kernel) a large batch still spreads over many
# programs. A wider row (next_pow2(C) > MAX_TILE) gets one example per program and a BLOCK_C beyond
# it; a very wide C (a vocabulary of tens of thousands) would spill registers, which this op, for
# class counts of classifiers, does not try to handle.
MAX_TILE = 1024


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(ptrs, in_batch, in_class, ACC: tl.constexpr):
    """The [BLOCK_B, BLOCK_C] tile of logits at ``ptrs`` in ACC, padding columns at -inf.

    Rows beyond the batch read as 0 (finite, so their max, sum and log stay finite and produce no
    NaN); they are never stored and their g is 0, so they add nothing anywhere.
    """
    x = tl.load(ptrs, mask=in_batch[:, None] & in_class[None, :], other=0.0).to(ACC)
    return tl.where(in_class[None, :], x, float("-inf"))


@triton.jit
def _row_stats(x, is_target):
    """(e, s, log p(y)) of a tile: e = exp(x - max) per element, s = its row sums, and the target's
    log-probability (x_y - max) - log s, formed from the shifted values for accuracy."""
    m = tl.max(x, axis=1)
    shifted = x - m[:, None]
    e = tl.exp(shifted)  # exp(-inf) = 0 at the padding columns
    s = tl.sum(e, axis=1)  # >= 1: the max element contributes exp(0)
    log_p_target = tl.sum(tl.where(is_target, shifted, 0.0), axis=1) - tl.log(s)
    return e, s, log_p_target


@triton.jit
def _depth_loglik_forward_kernel(
    out_ptr,  # [B] written, the dtype of logits
    x_ptr,  # [D+1, B, C] logits, any strides
    y_ptr,  # [B] int64 targets, contiguous
    log_q_ptr,  # [D+1], contiguous
    D1, B, C,
    stride_d, stride_b, stride_c,
    ACC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # int64 offsets: (D+1) * B * C may exceed 2^31 elements.
    b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_C)
    in_batch = b < B
    in_class = cols < C
    y = tl.load(y_ptr + b, mask=in_batch, other=0)
    is_target = cols[None, :] == y[:, None]

    # The tile's pointers at depth 0, advanced by stride_d per depth: pointer arithmetic stays
    # 64-bit, where i * stride_d could overflow the 32-bit loop index.
    x_rows = x_ptr + b[:, None] * stride_b + cols[None, :].to(tl.int64) * stride_c
    acc = tl.zeros([BLOCK_B], dtype=ACC)
    for i in range(D1):
        q = tl.exp(tl.load(log_q_ptr + i).to(ACC))
        # The skipped read: a depth without mass contributes q * (finite) = 0 exactly, so its logits
        # need not be read. The condition is uniform over the program, so nothing diverges.
        if q != 0:
            x = _load_rows(x_rows, in_batch, in_class, ACC)
            _, _, log_p_target = _row_stats(x, is_target)
            acc += q * log_p_target
        x_rows += stride_d
    tl.store(out_ptr + b, acc.to(out_ptr.dtype.element_ty), mask=in_batch)


@triton.jit
def _depth_loglik_backward_kernel(
    gx_ptr,  # [D+1, B, C] written, contiguous, the dtype of logits
    partial_ptr,  # [programs, D+1] in ACC, zero-initialised: sum_{b in block} g_b * log p_i(y_b)
    g_ptr,  # [B] grad_out, contiguous
    x_ptr,  # [D+1, B, C] logits, any strides
    y_ptr,  # [B] int64 targets, contiguous
    log_q_ptr,  # [D+1], contiguous
    D1, B, C,
    slab,  # B * C: elements of grad_logits per depth (passed as int64 by Triton when it needs to be)
    stride_d, stride_b, stride_c,
    ACC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_C)
    in_batch = b < B
    in_class = cols < C
    in_tile = in_batch[:, None] & in_class[None, :]
    y = tl.load(y_ptr + b, mask=in_batch, other=0)
    is_target = cols[None, :] == y[:, None]
    # g = 0 beyond the batch zeroes those rows' share of the partial sums.
    g = tl.load(g_ptr + b, mask=in_batch, other=0.0).to(ACC)
    # Pointers at depth 0, advanced per depth (64-bit, as in the forward).
    x_rows = x_ptr + b[:, None] * stride_b + cols[None, :].to(tl.int64) * stride_c
    gx_rows = gx_ptr + b[:, None] * C + cols[None, :]

    for i in range(D1):
        q = tl.exp(tl.load(log_q_ptr + i).to(ACC))
        if q != 0:
            x = _load_rows(x_rows, in_batch, in_class, ACC)
            e, s, log_p_target = _row_stats(x, is_target)
            gq = g * q
            # g q (1[c = y] - e / s): one per-row coefficient times the tile, plus g q at the
            # target; the softmax itself is never formed.
            grad = (-gq / s)[:, None] * e + tl.where(is_target, gq[:, None], 0.0)
            tl.store(gx_rows, grad.to(gx_ptr.dtype.element_ty), mask=in_tile)
            tl.store(partial_ptr + pid * D1 + i, tl.sum(g * log_p_target, axis=0))
        else:
            # No mass, no gradient; the partial sum keeps its zero from the launcher.
            tl.store(gx_rows, tl.zeros([BLOCK_B, BLOCK_C], dtype=gx_ptr.dtype.element_ty), mask=in_tile)
        x_rows += stride_d
        gx_rows += slab


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_accumulation_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(batch: int, classes: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_C, programs) for a batch of ``batch`` > 0 rows of ``classes`` >= 1 logits."""
    block_c = triton.next_power_of_2(classes)
    # Never more rows per program than the (rounded-up) batch: padding rows are wasted work.
    block_b = max(1, min(MAX_TILE // block_c, triton.next_power_of_2(batch)))
    return block_b, block_c, triton.cdiv(batch, block_b)


def _check(op: str, logits: Tensor, targets: Tensor, log_q: Tensor, grad_out: Tensor | None = None) -> None:
    """The C++ kernel's checks (csrc/depth_loglik.cpp, same messages); with ``grad_out`` also the
    backward's. Metadata only: nothing is read from the device."""
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(
            f"{op}: logits must be a float16, bfloat16, float32 or float64 tensor, got {logits.dtype}"
        )
    if logits.dim() != 3:
        raise ValueError(f"{op}: logits must be [D+1, B, C], got {tuple(logits.shape)}")
    depths, batch, classes = logits.shape
    if classes < 1:
        raise ValueError(f"{op}: logits must have at least one class")
    if targets.dtype != torch.int64 or targets.dim() != 1 or targets.device != logits.device:
        raise ValueError(
            f"{op}: targets must be a 1-D int64 tensor on {logits.device}, got {targets.dtype} "
            f"{tuple(targets.shape)} on {targets.device}"
        )
    if targets.shape[0] != batch:
        raise ValueError(f"{op}: targets has {targets.shape[0]} entries but logits has B = {batch}")
    # log_q is [D+1], grad_out [B]: both 1-D, on logits' device, in logits' dtype
    for name, value, size, what in (("log_q", log_q, depths, "D+1"), ("grad_out", grad_out, batch, "B")):
        if value is None:
            continue
        if value.dim() != 1 or value.shape[0] != size or value.device != logits.device:
            raise ValueError(
                f"{op}: {name} must be [{what}] = [{size}] on {logits.device}, got {tuple(value.shape)} "
                f"on {value.device}"
            )
        if value.dtype != logits.dtype:
            raise ValueError(f"{op}: {name} has dtype {value.dtype} but logits has {logits.dtype}")


def depth_loglik(logits: Tensor, targets: Tensor, log_q: Tensor) -> Tensor:
    """out[b] = sum_i q_i * log_softmax(logits[i, b])[targets[b]],  q_i = exp(log_q[i]).

    logits: [D+1, B, C] (any strides); targets: [B] int64 in [0, C); log_q: [D+1], the dtype of
    logits. Returns a contiguous [B] in the dtype of logits (float32 accumulation for float16 and
    bfloat16). Depths with log_q = -inf are not read.
    """
    _check("depth_loglik", logits, targets, log_q)
    depths, batch, classes = logits.shape
    out = torch.empty((batch,), dtype=logits.dtype, device=logits.device)
    if batch == 0:
        return out
    targets = targets.contiguous()
    log_q = log_q.contiguous()
    block_b, block_c, programs = _blocks(batch, classes)
    _depth_loglik_forward_kernel[(programs,)](
        out,
        logits,
        targets,
        log_q,
        depths,
        batch,
        classes,
        *logits.stride(),
        ACC=_tl_accumulation_dtype(logits.dtype),
        BLOCK_B=block_b,
        BLOCK_C=block_c,
    )
    return out


def depth_loglik_backward(
    grad_out: Tensor, logits: Tensor, targets: Tensor, log_q: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`depth_loglik`.

    With p = softmax(logits[i, b]), l[i, b] = log p[targets[b]] and q_i = exp(log_q[i]):
        grad_logits[i, b, c] = grad_out[b] * q_i * (1[c = targets[b]] - p[c])
        grad_log_q[i]        = q_i * sum_b grad_out[b] * l[i, b]

    grad_out: [B]. Returns a contiguous [D+1, B, C] in the dtype of logits (zeros, logits unread, at
    depths with q_i = 0) and [D+1] in the dtype of log_q. Deterministic: grad_log_q is reduced from
    per-program partial sums in a fixed order.
    """
    _check("depth_loglik_backward", logits, targets, log_q, grad_out)
    depths, batch, classes = logits.shape
    grad_logits = torch.empty((depths, batch, classes), dtype=logits.dtype, device=logits.device)
    acc_dtype = _accumulation_dtype(logits.dtype)
    if batch == 0:  # an empty sum over examples
        return grad_logits, torch.zeros_like(log_q)
    grad_out = grad_out.contiguous()
    targets = targets.contiguous()
    log_q = log_q.contiguous()
    block_b, block_c, programs = _blocks(batch, classes)
    # Zeros: a program does not write the partial sum of a depth it skips (q_i = 0).
    partial = torch.zeros((programs, depths), dtype=acc_dtype, device=logits.device)
    _depth_loglik_backward_kernel[(programs,)](
        grad_logits,
        partial,
        grad_out,
        logits,
        targets,
        log_q,
        depths,
        batch,
        classes,
        batch * classes,
        *logits.stride(),
        ACC=_tl_accumulation_dtype(logits.dtype),
        BLOCK_B=block_b,
        BLOCK_C=block_c,
    )
    # A fixed-order reduction over programs (no atomics), then the factor q_i, all in ACC.
    q = log_q.to(acc_dtype).exp()
    grad_log_q = (q * partial.sum(dim=0)).to(log_q.dtype)
    return grad_logits, grad_log_q
