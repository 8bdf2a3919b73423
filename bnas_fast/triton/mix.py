"""Triton kernels for masked per-example operation mixing (the CUDA backend of ``bnas_fast::mix``).

    dense:  out[b] = sum_k w[b, k] * y_k[b]                  y_k: [B, *rest]
    sparse: out[b] = sum_k w[b, k] * y_k[rows[k, b]]          y_k: [n_k, *rest]
            where rows[k, b] = i if indices[k][i] = b, else -1 (candidate k did not compute b)

    grad_y_k[rows[k, b]] = w[b, k] * grad_out[b]
    grad_w[b, k]         = <grad_out[b], y_k[rows[k, b]]>     (0 where rows[k, b] = -1)

The design mirrors csrc/mix.cpp:

* Both forms run the same two kernels; the dense form is the identity row table, compiled in as
  ``SPARSE=False`` so it costs no loads. The launchers build the sparse table with torch ops.
* One program per (example b, tile of BLOCK elements of its row of M = prod(rest) elements), so any
  batch size, B = 1 included, fills the GPU.
* The K candidates are never stacked. A kernel takes up to ``MAX_CANDIDATES_PER_LAUNCH`` candidate
  pointers (the count is a constexpr, unused slots are None); a larger K is served by consecutive
  launches over chunks of candidates, each adding to the partial sum of the one before.
* A row whose weight is zero (or that the candidate did not compute) is never read: a scalar
  branch skips its load. Memory traffic is the whole cost of this op.
* float16/bfloat16 accumulate in float32 (also across chained launches) and are rounded once;
  float32 and float64 accumulate in their own type.
* grad_w: each program writes the dot product of its tile to a [B, tiles, K] buffer, which torch
  sums over the tiles afterwards. No atomics, so results are deterministic.

The launchers own the layout (contiguity, the flat [rows, M] view, output allocation, block size);
the kernels own the math. The value checks (finite weights, indices in range and distinct) happen in
:mod:`bnas_fast.ops.mix` before the forward launchers are called (the backwards receive what the
forward was given). The entry points repeat the C++ kernel's shape, dtype and count checks (metadata
only), because a direct call of the op on CUDA reaches them without the public function's checks,
and a candidate with too few rows would be read out of bounds. There is no autograd logic here.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["mix", "mix_backward", "mix_sparse", "mix_sparse_backward", "MAX_CANDIDATES_PER_LAUNCH"]

# Candidate pointers per launch. 8 covers the usual search spaces (e.g. the 8 DARTS operations) in a
# single pass over the output; a larger K costs one extra read and write of the output per chunk.
MAX_CANDIDATES_PER_LAUNCH = 8

# Largest tile of a row handled by one program. 1024 elements with the default 4 warps gives each
# thread 8 contiguous elements (vectorised loads), and a long row still spreads over many programs.
MAX_BLOCK = 1024


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_of(rows_ptr, k, b, B, SPARSE: tl.constexpr):
    """Row of candidate k that holds example b: b itself (dense), or rows[k, b] (-1 if none)."""
    row = b
    if SPARSE:
        row = tl.load(rows_ptr + k * B + b)
    return row


@triton.jit
def _accumulate(acc, y_ptr, w_ptr, rows_ptr, b, k, B, K, M, offs, in_row, SPARSE: tl.constexpr):
    """acc + w[b, k] * y_k[row, offs] in the accumulation dtype of ``acc``."""
    w = tl.load(w_ptr + b * K + k).to(acc.dtype)
    row = _row_of(rows_ptr, k, b, B, SPARSE)
    # The skipped read: a zero weight, or an example the candidate did not compute, branches over
    # the load (the condition is the same for the whole program, so nothing diverges). A branch
    # rather than `mask=in_row & (w != 0)` because Triton's interpreter (3.9) splats a scalar
    # comparison with the operands' dtype, and `bool_block & float_block` then fails.
    if (w != 0) & (row >= 0):
        y = tl.load(y_ptr + row * M + offs, mask=in_row, other=0.0)
        acc += w * y.to(acc.dtype)
    return acc


@triton.jit
def _mix_forward_kernel(
    out_ptr,  # [B, M] written: the partial sum so far plus this chunk of candidates
    prev_ptr,  # [B, M] partial sum of the earlier chunks (read if HAS_PREV; may alias out_ptr)
    w_ptr,  # [B, K]
    rows_ptr,  # [K, B] int64 row table (SPARSE only)
    y0, y1, y2, y3, y4, y5, y6, y7,  # this chunk's candidates, each [rows_k, M]; unused slots None
    k0,  # column of weights (and row of the row table) of the chunk's first candidate
    B, K, M, tiles_per_row,
    NUM_Y: tl.constexpr,
    HAS_PREV: tl.constexpr,
    SPARSE: tl.constexpr,
    RELU: tl.constexpr,  # max(., 0) of the finished sum (set on the last chunk only)
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # int64 offsets: B * M may exceed 2^31 elements.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // tiles_per_row
    offs = (pid % tiles_per_row) * BLOCK + tl.arange(0, BLOCK)
    in_row = offs < M

    if HAS_PREV:
        acc = tl.load(prev_ptr + b * M + offs, mask=in_row, other=0.0).to(ACC)
    else:
        acc = tl.zeros([BLOCK], dtype=ACC)

    # Unrolled at compile time: the slots beyond NUM_Y do not exist in the compiled kernel.
    acc = _accumulate(acc, y0, w_ptr, rows_ptr, b, k0 + 0, B, K, M, offs, in_row, SPARSE)
    if NUM_Y > 1:
        acc = _accumulate(acc, y1, w_ptr, rows_ptr, b, k0 + 1, B, K, M, offs, in_row, SPARSE)
    if NUM_Y > 2:
        acc = _accumulate(acc, y2, w_ptr, rows_ptr, b, k0 + 2, B, K, M, offs, in_row, SPARSE)
    if NUM_Y > 3:
        acc = _accumulate(acc, y3, w_ptr, rows_ptr, b, k0 + 3, B, K, M, offs, in_row, SPARSE)
    if NUM_Y > 4:
        acc = _accumulate(acc, y4, w_ptr, rows_ptr, b, k0 + 4, B, K, M, offs, in_row, SPARSE)
    if NUM_Y > 5:
        acc = _accumulate(acc, y5, w_ptr, rows_ptr, b, k0 + 5, B, K, M, offs, in_row, SPARSE)
    if NUM_Y > 6:
        acc = _accumulate(acc, y6, w_ptr, rows_ptr, b, k0 + 6, B, K, M, offs, in_row, SPARSE)
    if NUM_Y > 7:
        acc = _accumulate(acc, y7, w_ptr, rows_ptr, b, k0 + 7, B, K, M, offs, in_row, SPARSE)

    if RELU:
        acc = tl.where(acc < 0, 0.0, acc)  # a NaN sum stays NaN, as torch.relu keeps it
    tl.store(out_ptr + b * M + offs, acc.to(out_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _backward_one(
    g, gy_ptr, y_ptr, w_ptr, rows_ptr, partial_ptr, pid, b, k, B, K, M, offs, in_row,
    SPARSE: tl.constexpr, NEED_GW: tl.constexpr,
):
    """grad_y_k[row, offs] = w[b, k] * g; and the tile's share of grad_w[b, k] if wanted."""
    row = _row_of(rows_ptr, k, b, B, SPARSE)
    if row >= 0:  # else candidate k has no row for example b: nothing to write, grad_w stays 0
        w = tl.load(w_ptr + b * K + k).to(g.dtype)
        tl.store(gy_ptr + row * M + offs, (w * g).to(gy_ptr.dtype.element_ty), mask=in_row)
        if NEED_GW:
            # grad_w needs y_k even where w[b, k] = 0; without grad_w, y_k is not read at all.
            y = tl.load(y_ptr + row * M + offs, mask=in_row, other=0.0)
            # partial[b, tile, k], with pid = b * tiles_per_row + tile.
            tl.store(partial_ptr + pid * K + k, tl.sum(g * y.to(g.dtype), axis=0))


@triton.jit
def _mix_backward_kernel(
    g_ptr,  # [B, M] grad_out
    relu_out_ptr,  # [B, M] the output of a relu forward (read if RELU: masks grad_out)
    w_ptr,  # [B, K]
    rows_ptr,  # [K, B] int64 row table (SPARSE only)
    partial_ptr,  # [B, tiles_per_row, K] per-tile dot products (NEED_GW only)
    y0, y1, y2, y3, y4, y5, y6, y7,  # this chunk's candidates, each [rows_k, M]
    gy0, gy1, gy2, gy3, gy4, gy5, gy6, gy7,  # their gradients, same shapes
    k0, B, K, M, tiles_per_row,
    NUM_Y: tl.constexpr,
    SPARSE: tl.constexpr,
    NEED_GW: tl.constexpr,
    RELU: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // tiles_per_row
    offs = (pid % tiles_per_row) * BLOCK + tl.arange(0, BLOCK)
    in_row = offs < M
    # grad_out is read once per chunk and shared by the chunk's candidates.
    g = tl.load(g_ptr + b * M + offs, mask=in_row, other=0.0).to(ACC)
    if RELU:
        kept = tl.load(relu_out_ptr + b * M + offs, mask=in_row, other=0.0).to(ACC) > 0
        g = tl.where(kept, g, 0.0)

    _backward_one(
        g, gy0, y0, w_ptr, rows_ptr, partial_ptr, pid, b, k0 + 0, B, K, M, offs, in_row, SPARSE, NEED_GW
    )
    if NUM_Y > 1:
        _backward_one(
            g, gy1, y1, w_ptr, rows_ptr, partial_ptr, pid, b, k0 + 1, B, K, M, offs, in_row, SPARSE, NEED_GW
        )
    if NUM_Y > 2:
        _backward_one(
            g, gy2, y2, w_ptr, rows_ptr, partial_ptr, pid, b, k0 + 2, B, K, M, offs, in_row, SPARSE, NEED_GW
        )
    if NUM_Y > 3:
        _backward_one(
            g, gy3, y3, w_ptr, rows_ptr, partial_ptr, pid, b, k0 + 3, B, K, M, offs, in_row, SPARSE, NEED_GW
        )
    if NUM_Y > 4:
        _backward_one(
            g, gy4, y4, w_ptr, rows_ptr, partial_ptr, pid, b, k0 + 4, B, K, M, offs, in_row, SPARSE, NEED_GW
        )
    if NUM_Y > 5:
        _backward_one(
            g, gy5, y5, w_ptr, rows_ptr, partial_ptr, pid, b, k0 + 5, B, K, M, offs, in_row, SPARSE, NEED_GW
        )
    if NUM_Y > 6:
        _backward_one(
            g, gy6, y6, w_ptr, rows_ptr, partial_ptr, pid, b, k0 + 6, B, K, M, offs, in_row, SPARSE, NEED_GW
        )
    if NUM_Y > 7:
        _backward_one(
            g, gy7, y7, w_ptr, rows_ptr, partial_ptr, pid, b, k0 + 7, B, K, M, offs, in_row, SPARSE, NEED_GW
        )


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_accumulation_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _tiling(row_size: int) -> Tuple[int, int]:
    """(BLOCK, tiles per row) for rows of ``row_size`` elements (> 0)."""
    block = min(MAX_BLOCK, max(16, triton.next_power_of_2(row_size)))
    return block, triton.cdiv(row_size, block)


def _chunk_starts(num_candidates: int) -> range:
    return range(0, num_candidates, MAX_CANDIDATES_PER_LAUNCH)


def _slots(tensors: Sequence[Tensor]) -> List[Optional[Tensor]]:
    """A chunk of candidates padded with None to the kernel's fixed number of pointer arguments."""
    return list(tensors) + [None] * (MAX_CANDIDATES_PER_LAUNCH - len(tensors))


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(
    op: str,
    ys: Sequence[Tensor],
    weights: Tensor,
    indices: Optional[Sequence[Tensor]] = None,
    grad_out: Optional[Tensor] = None,
    relu_out: Optional[Tensor] = None,
) -> None:
    """The C++ kernel's checks (csrc/mix.cpp, same messages): dense when ``indices`` is None (every
    y_k is [B, *rest]), else sparse (y_k is [n_k, *rest] and indices[k] is [n_k]); with ``grad_out``
    (and ``relu_out``) those of the backward. Metadata only: nothing is read from the device."""
    if len(ys) == 0:
        raise ValueError(f"{op}: ys must hold at least one candidate tensor")
    if weights.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{op}: weights must be a float16, bfloat16, float32 or float64 tensor, got {weights.dtype}"
        )
    if weights.dim() != 2:
        raise ValueError(f"{op}: weights must be [B, K], got shape {tuple(weights.shape)}")
    B, K = weights.shape
    if len(ys) != K:
        raise ValueError(f"{op}: weights has K = {K} columns but ys holds {len(ys)} candidates")
    if ys[0].dim() < 1:
        raise ValueError(f"{op}: ys[0] must have a batch dimension")
    rest = tuple(ys[0].shape[1:])
    for k, y in enumerate(ys):
        if y.dtype != weights.dtype:
            raise ValueError(f"{op}: ys[{k}] has dtype {y.dtype} but weights has dtype {weights.dtype}")
        if y.device != weights.device:
            raise ValueError(f"{op}: ys[{k}] is on {y.device} but weights is on {weights.device}")
        if y.dim() != len(rest) + 1 or tuple(y.shape[1:]) != rest:
            raise ValueError(
                f"{op}: ys[{k}] has shape {tuple(y.shape)}, which disagrees with ys[0] {tuple(ys[0].shape)} "
                "beyond the batch dimension"
            )
        if indices is None and y.shape[0] != B:
            raise ValueError(f"{op}: ys[{k}] has batch {y.shape[0]} but weights has B = {B}")
    if indices is not None:
        if len(indices) != K:
            raise ValueError(f"{op}: indices holds {len(indices)} tensors but there are K = {K} candidates")
        for k, idx in enumerate(indices):
            if idx.dtype != torch.int64 or idx.dim() != 1 or idx.device != weights.device:
                raise ValueError(
                    f"{op}: indices[{k}] must be a 1-D int64 tensor on {weights.device}, got {idx.dtype} "
                    f"{tuple(idx.shape)} on {idx.device}"
                )
            if idx.shape[0] != ys[k].shape[0]:
                raise ValueError(
                    f"{op}: indices[{k}] has {idx.shape[0]} entries but ys[{k}] has {ys[k].shape[0]} rows"
                )
    if grad_out is not None:
        if grad_out.dtype != weights.dtype:
            raise ValueError(f"{op}: grad_out has dtype {grad_out.dtype} but weights has {weights.dtype}")
        if tuple(grad_out.shape) != (B,) + rest or grad_out.device != weights.device:
            raise ValueError(
                f"{op}: grad_out has shape {tuple(grad_out.shape)} on {grad_out.device}, expected the output "
                f"shape {(B,) + rest} on {weights.device}"
            )
    if relu_out is not None and (relu_out.dtype, relu_out.shape, relu_out.device) != (
        grad_out.dtype, grad_out.shape, grad_out.device
    ):
        raise ValueError(
            f"{op}: relu_out must have grad_out's shape {tuple(grad_out.shape)} and dtype {grad_out.dtype}, "
            f"got {tuple(relu_out.shape)} {relu_out.dtype}"
        )


def _inverse_rows(indices: Sequence[Tensor], batch: int, device: torch.device) -> Tensor:
    """rows[k, b] = i where indices[k][i] = b, else -1; [K, B] int64.

    The indices are distinct (checked by the caller), so the scatter has no conflicts.
    """
    rows = torch.full((len(indices), batch), -1, dtype=torch.int64, device=device)
    for k, idx in enumerate(indices):
        rows[k, idx] = torch.arange(idx.numel(), dtype=torch.int64, device=device)
    return rows


def _forward(ys: Sequence[Tensor], weights: Tensor, rows: Optional[Tensor], relu: bool = False) -> Tensor:
    """out [B, *rest] (relu of it with ``relu``) from candidates [rows_k, *rest], weights [B, K],
    row table [K, B] or None."""
    ys = [y.contiguous() for y in ys]  # the kernels index each y_k as a flat [rows_k, M] array
    weights = weights.contiguous()
    batch, num_candidates = weights.shape
    rest = tuple(ys[0].shape[1:])
    row_size = math.prod(rest)
    out = torch.empty((batch,) + rest, dtype=ys[0].dtype, device=ys[0].device)
    if out.numel() == 0:
        return out

    block, tiles_per_row = _tiling(row_size)
    grid = (batch * tiles_per_row,)
    acc_dtype = _accumulation_dtype(out.dtype)
    starts = _chunk_starts(num_candidates)
    # Chained launches carry the partial sum in the accumulation dtype (the output itself unless
    # it is float16/bfloat16), so low precision is still rounded once, by the last launch.
    if len(starts) == 1 or out.dtype == acc_dtype:
        partial = out
    else:
        partial = torch.empty(out.shape, dtype=acc_dtype, device=out.device)
    for k0 in starts:
        chunk = ys[k0 : k0 + MAX_CANDIDATES_PER_LAUNCH]
        is_last = k0 + len(chunk) == num_candidates
        _mix_forward_kernel[grid](
            out if is_last else partial,
            partial if k0 > 0 else None,
            weights,
            rows,
            *_slots(chunk),
            k0,
            batch,
            num_candidates,
            row_size,
            tiles_per_row,
            NUM_Y=len(chunk),
            HAS_PREV=k0 > 0,
            SPARSE=rows is not None,
            RELU=relu and is_last,
            ACC=_tl_accumulation_dtype(out.dtype),
            BLOCK=block,
        )
    return out


def _backward(
    grad_out: Tensor,
    ys: Sequence[Tensor],
    weights: Tensor,
    rows: Optional[Tensor],
    weights_requires_grad: bool,
    relu_out: Optional[Tensor] = None,
) -> Tuple[List[Tensor], Tensor]:
    """(grad_ys like ys, grad_weights [B, K]) for either form; see the module docstring. With
    ``relu_out`` (the output of a relu forward) grad_out is masked by relu_out > 0."""
    ys = [y.contiguous() for y in ys]
    weights = weights.contiguous()
    grad_out = grad_out.contiguous()
    if relu_out is not None:
        relu_out = relu_out.contiguous()
    batch, num_candidates = weights.shape
    row_size = math.prod(grad_out.shape[1:])
    # Every row of every grad_y is written below: in the dense form row b by example b, in the
    # sparse form row i by example indices[k][i].
    grad_ys = [torch.empty(y.shape, dtype=y.dtype, device=y.device) for y in ys]
    if batch == 0 or row_size == 0:  # then every grad_y is empty too
        return grad_ys, torch.zeros_like(weights)

    block, tiles_per_row = _tiling(row_size)
    grid = (batch * tiles_per_row,)
    acc_dtype = _accumulation_dtype(grad_out.dtype)
    partial = None
    if weights_requires_grad:
        # Zeros: (b, k) pairs without a row (sparse form) are never written.
        partial = torch.zeros((batch, tiles_per_row, num_candidates), dtype=acc_dtype, device=weights.device)
    for k0 in _chunk_starts(num_candidates):
        chunk = slice(k0, k0 + MAX_CANDIDATES_PER_LAUNCH)
        _mix_backward_kernel[grid](
            grad_out,
            relu_out,
            weights,
            rows,
            partial,
            *_slots(ys[chunk]),
            *_slots(grad_ys[chunk]),
            k0,
            batch,
            num_candidates,
            row_size,
            tiles_per_row,
            NUM_Y=len(ys[chunk]),
            SPARSE=rows is not None,
            NEED_GW=weights_requires_grad,
            RELU=relu_out is not None,
            ACC=_tl_accumulation_dtype(grad_out.dtype),
            BLOCK=block,
        )
    if weights_requires_grad:
        # Tile partials summed in a fixed order: deterministic, unlike atomics.
        grad_weights = partial.sum(dim=1).to(weights.dtype)
    else:
        grad_weights = torch.zeros_like(weights)
    return grad_ys, grad_weights


# ----------------------------------------------------------------------------------------------
# The four entry points, with the signatures of bnas_fast.reference
# ----------------------------------------------------------------------------------------------


def mix(ys: Sequence[Tensor], weights: Tensor, relu: bool = False) -> Tensor:
    """out[b] = sum_k weights[b, k] * ys[k][b] (relu of it with ``relu``).

    ys: K tensors [B, *rest]; weights: [B, K]. Returns a contiguous [B, *rest] in the dtype of ys.
    """
    _check("mix_relu" if relu else "mix", ys, weights)
    return _forward(ys, weights, rows=None, relu=relu)


def mix_backward(
    grad_out: Tensor,
    ys: Sequence[Tensor],
    weights: Tensor,
    weights_requires_grad: bool,
    relu_out: Optional[Tensor] = None,
) -> Tuple[List[Tensor], Tensor]:
    """grad_ys[k][b] = weights[b, k] * g[b]; grad_weights[b, k] = <g[b], ys[k][b]>, with g = grad_out,
    masked by relu_out > 0 when ``relu_out`` (the output of a relu forward) is given.

    grad_out: [B, *rest]. Returns K tensors [B, *rest] and [B, K] (zeros, with ys never read, when
    ``weights_requires_grad`` is False).
    """
    _check("mix_backward", ys, weights, grad_out=grad_out, relu_out=relu_out)
    return _backward(grad_out, ys, weights, None, weights_requires_grad, relu_out)


def mix_sparse(ys: Sequence[Tensor], indices: Sequence[Tensor], weights: Tensor) -> Tensor:
    """out[b] = sum_k weights[b, k] * ys[k][i] where indices[k][i] = b; zero where no candidate covers b.

    ys: K tensors [n_k, *rest] (n_k may be 0); indices: K int64 tensors [n_k] of distinct examples in
    [0, B); weights: [B, K]. Returns a contiguous [B, *rest].
    """
    _check("mix_sparse", ys, weights, indices=indices)
    rows = _inverse_rows(indices, weights.shape[0], weights.device)
    return _forward(ys, weights, rows)


def mix_sparse_backward(
    grad_out: Tensor,
    ys: Sequence[Tensor],
    indices: Sequence[Tensor],
    weights: Tensor,
    weights_requires_grad: bool,
) -> Tuple[List[Tensor], Tensor]:
    """grad_ys[k][i] = weights[b, k] * grad_out[b] and grad_weights[b, k] = <grad_out[b], ys[k][i]>
    for b = indices[k][i]; grad_weights[b, k] = 0 where candidate k did not compute b.

    grad_out: [B, *rest]. Returns K tensors [n_k, *rest] and [B, K] (zeros when
    ``weights_requires_grad`` is False).
    """
    _check("mix_sparse_backward", ys, weights, indices=indices, grad_out=grad_out)
    rows = _inverse_rows(indices, weights.shape[0], weights.device)
    return _backward(grad_out, ys, weights, rows, weights_requires_grad)
