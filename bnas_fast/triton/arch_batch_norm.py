"""Triton kernels for architecture-conditional batch norm (the CUDA backend of
``bnas_fast::arch_batch_norm``, ``arch_batch_norm_backward``, ``channel_affine`` and
``channel_affine_backward``).

x is viewed as [B, C, L] contiguous (L = product of the spatial sizes, 1 for a [B, C] input); a *row*
is x[b, c, :], and rows are numbered r = b * C + c. With G = B / group_size statistics groups of
N = group_size * L values per channel, k(b) = b // group_size and s(b) = arch[b]:

    forward   y[b, c, :]   = (x[b, c, :] - mean[k, c]) * scale[b, c] + shift[b, c],
              scale[b, c]  = invstd[k, c] * weight[s, c],
              shift[b, c]  = bias[s, c] - (mean64[k, c] - mean[k, c]) * scale[b, c]
    backward  grad_x[b, c, :] = g * a[b, c] + (x - mean[k, c]) * bx[b, c] + c0[b, c]   (g = grad_y), with
              a = invstd w,  bx = -invstd^2 m2,  c0 = -invstd m1 - delta bx,
              m1[k, c] = sum_{b in k} w A / N,  m2[k, c] = invstd sum_{b in k} w (Bs - delta A) / N,
              delta[k, c] = sum_{b in k} D / N,
              A[b, c] = sum_l g,  Bs[b, c] = sum_l g (x - mean[k, c]),  D[b, c] = sum_l (x - mean[k, c])
              grad_weight[s, c] = sum_{b: arch[b] = s} invstd (Bs - delta A),  grad_bias[s, c] = sum A
    eval      y[b, c, :]   = x[b, c, :] * scale[b, c] + shift[b, c]   (channel_affine, scale and shift given)

mean and invstd are the [G, C] outputs of the forward (the accumulation dtype); mean64 is the group
mean in float64 before it is rounded to them. In the backward, delta = mean(x) - mean is the residual
of the rounded mean, so x - mean - delta is x minus the exact group mean: xhat = (x - mean - delta)
invstd, and grad_x = invstd (g w - m1 - xhat m2) expands to the coefficients above.

The design mirrors csrc/arch_batch_norm.cpp:

* Every pass over the big [B, C, L] tensors is a kernel; the small [B, C] -> [G, C] / [S, C]
  combinations are torch ops in the launchers (they touch B * C numbers, not B * C * L): Chan's
  formula for the group statistics (mean = average of the group's row means, M2 = sum row_m2 +
  L sum (row_mean - mean)^2), the forward's per-row scale and shift, the group sums of the
  backward and its per-row coefficients, and the per-architecture sums of grad_weight and grad_bias.
  They run in float64 whatever the input dtype, and are rounded once to the accumulation dtype (as
  the C++ kernel's double sums across rows): a float32 sum over a million rows at a large mean
  loses digits, and Bs - delta A cancels.
* Forward: two passes over x. The row-statistics kernel gives row_mean and row_m2 = sum (x -
  row_mean)^2 from two loops over the row (exact, unlike the sum of squares minus the squared sum);
  when a row fits in one block (``SINGLE``) it is read once and kept in registers for both. The
  normalisation subtracts the group mean before scaling, (x - mean) * scale + shift, not
  x * scale + (shift - mean * scale): with a mean large against the spread, x * scale and
  mean * scale are large and cancel, while x - mean is exact for x near the mean. The shift also takes
  out the float32 rounding of the mean (mean64 - mean), which would otherwise shift every y of the
  channel by up to half a unit in the last place of the mean times scale. The kernel is
  channel_affine's with ``CENTERED`` set; the eval mode runs it without the centre.
* Backward: two passes over (grad_y, x): per-row sums A, Bs and D in one pass, then grad_x. The sums
  within a row run in the accumulation dtype (one partial sum per tile element, then tl.sum's tree).
  x - mean is exact near a large mean, but x - mean rounded to float32 near a small one has the same
  error for every x of a binade, a bias that a large mean of g adds up over the batch; D is the sum
  of the same rounded values, so Bs - delta A = sum (g - mean g)(x - mean - delta) cancels that bias
  with the residual of the rounded mean (which, summed against sum g, would otherwise dominate
  grad_weight and grad_x at a mean of 1e4). channel_affine_backward is one pass: it writes grad_x =
  g * scale and the row sums grad_scale = sum g x, grad_shift = sum g.
* Tiling: a program owns BLOCK_R rows and walks them in steps of BLOCK_L columns, with BLOCK_R *
  BLOCK_L = MAX_TILE elements at most (see :func:`_tiling`). Long rows get one row per program
  and loop; short rows (L = 1 for a BatchNorm1d input) are packed many per program, so that a
  program never works on a handful of elements.
* float16/bfloat16 accumulate in float32 and are rounded once; float32 and float64 accumulate in
  their own type. y and grad_x have x's dtype; mean, invstd, row_mean, row_m2, grad_scale and
  grad_shift the accumulation dtype; grad_weight and grad_bias the dtype of weight.
* Offsets are 64-bit: a row index times L may exceed 2^31 elements.
* Row sums run in a fixed order within a program and no kernel uses atomics. The [S, C] sums of the
  backward are ``index_add_`` (as in the reference): exact order on CPU; on CUDA it adds with
  atomics, which ``torch.use_deterministic_algorithms(True)`` turns into a deterministic sum.

The launchers own the layout (contiguity, the [B, C, L] view, output allocation, block sizes); the
kernels own the per-element math. The kernels work on contiguous [B, C, L] rows only: the launchers
copy other layouts to contiguous ones, and return y and grad_x in the layout of the ops' contract
(:func:`bnas_fast.ops.arch_batch_norm.output_memory_format`: channels-last for a 4-D x that is
channels-last-contiguous and not contiguous, else contiguous), converting at the end. That costs
copies which the C++ kernels avoid (they read channels-last tensors in place); it keeps the GPU path
correct, not fast, for channels-last networks. The value check (arch in [0, S)) happens in
:mod:`bnas_fast.ops.arch_batch_norm` before the training forward's launcher is called; every launcher
repeats the C++ kernel's shape, dtype and count checks (metadata only), because a direct call of the
op on CUDA reaches it without the public function's checks, and a weight, scale or statistic with too
few rows or columns would be read out of bounds. There is no autograd logic here.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from bnas_fast.ops.arch_batch_norm import output_memory_format

__all__ = ["MAX_TILE", "arch_batch_norm", "arch_batch_norm_backward", "channel_affine", "channel_affine_backward"]

# Elements (BLOCK_R * BLOCK_L) a program holds per loop step. 1024 with the default 4 warps is 8
# values per thread (vectorised loads) and, with the backward's two input tiles and two
# accumulators, still no register spills.
MAX_TILE = 1024


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_stats_kernel(
    x_ptr,  # [R, L] contiguous
    mean_ptr,  # [R] written, ACC: row_mean
    m2_ptr,  # [R] written, ACC: row_m2 = sum (x - row_mean)^2
    R, L,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
    SINGLE: tl.constexpr,  # L <= BLOCK_L: the row is one tile, read once
):
    # int64 offsets: R * L may exceed 2^31 elements.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_L)
    in_rows = rows < R
    x_rows = x_ptr + rows[:, None] * L
    if SINGLE:
        inside = in_rows[:, None] & (cols < L)[None, :]
        x = tl.load(x_rows + cols[None, :], mask=inside, other=0.0).to(ACC)
        mean = tl.sum(x, axis=1) / L
        d = tl.where(inside, x - mean[:, None], 0.0)
        m2 = tl.sum(d * d, axis=1)
    else:
        # Two passes over the row: the sum, then the squared deviations from the exact row mean.
        total = tl.zeros([BLOCK_R, BLOCK_L], dtype=ACC)
        for start in range(0, L, BLOCK_L):
            idx = start + cols
            inside = in_rows[:, None] & (idx < L)[None, :]
            total += tl.load(x_rows + idx[None, :], mask=inside, other=0.0).to(ACC)
        mean = tl.sum(total, axis=1) / L
        spread = tl.zeros([BLOCK_R, BLOCK_L], dtype=ACC)
        for start in range(0, L, BLOCK_L):
            idx = start + cols
            inside = in_rows[:, None] & (idx < L)[None, :]
            x = tl.load(x_rows + idx[None, :], mask=inside, other=0.0).to(ACC)
            d = tl.where(inside, x - mean[:, None], 0.0)
            spread += d * d
        m2 = tl.sum(spread, axis=1)
    tl.store(mean_ptr + rows, mean, mask=in_rows)
    tl.store(m2_ptr + rows, m2, mask=in_rows)


@triton.jit
def _affine_kernel(
    y_ptr,  # [R, L] written, contiguous, the dtype of x
    x_ptr,  # [R, L] contiguous
    center_ptr,  # [R] ACC, read only if CENTERED
    scale_ptr,  # [R] ACC
    shift_ptr,  # [R] ACC
    R, L,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
    CENTERED: tl.constexpr,
):
    """y[r, :] = (x[r, :] - center[r]) * scale[r] + shift[r] if CENTERED (the training forward),
    else x[r, :] * scale[r] + shift[r] (channel_affine); rounded once to y's dtype."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_L)
    in_rows = rows < R
    scale = tl.load(scale_ptr + rows, mask=in_rows, other=0.0).to(ACC)[:, None]
    shift = tl.load(shift_ptr + rows, mask=in_rows, other=0.0).to(ACC)[:, None]
    if CENTERED:
        center = tl.load(center_ptr + rows, mask=in_rows, other=0.0).to(ACC)[:, None]
    offs = rows[:, None] * L
    for start in range(0, L, BLOCK_L):
        idx = offs + (start + cols)[None, :]
        inside = in_rows[:, None] & ((start + cols) < L)[None, :]
        x = tl.load(x_ptr + idx, mask=inside, other=0.0).to(ACC)
        if CENTERED:
            x = x - center
        tl.store(y_ptr + idx, (x * scale + shift).to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _grad_sums_kernel(
    g_ptr,  # [R, L] grad_y, contiguous
    x_ptr,  # [R, L] contiguous
    center_ptr,  # [R] ACC: the group mean of each row, mean[k(b), c]
    sum_g_ptr,  # [R] written, ACC: A = sum g
    sum_gx_ptr,  # [R] written, ACC: Bs = sum g (x - center)
    sum_x_ptr,  # [R] written, ACC: D = sum (x - center)
    R, L,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_L)
    in_rows = rows < R
    center = tl.load(center_ptr + rows, mask=in_rows, other=0.0).to(ACC)[:, None]
    offs = rows[:, None] * L
    acc_g = tl.zeros([BLOCK_R, BLOCK_L], dtype=ACC)
    acc_gx = tl.zeros([BLOCK_R, BLOCK_L], dtype=ACC)
    acc_x = tl.zeros([BLOCK_R, BLOCK_L], dtype=ACC)
    for start in range(0, L, BLOCK_L):
        idx = offs + (start + cols)[None, :]
        inside = in_rows[:, None] & ((start + cols) < L)[None, :]
        # g = 0 outside the tensor, so padding adds nothing to A and Bs; D masks x - center.
        g = tl.load(g_ptr + idx, mask=inside, other=0.0).to(ACC)
        x = tl.load(x_ptr + idx, mask=inside, other=0.0).to(ACC)
        d = tl.where(inside, x - center, 0.0)
        acc_g += g
        acc_gx += g * d
        acc_x += d
    tl.store(sum_g_ptr + rows, tl.sum(acc_g, axis=1), mask=in_rows)
    tl.store(sum_gx_ptr + rows, tl.sum(acc_gx, axis=1), mask=in_rows)
    tl.store(sum_x_ptr + rows, tl.sum(acc_x, axis=1), mask=in_rows)


@triton.jit
def _grad_x_kernel(
    gx_ptr,  # [R, L] written, contiguous, the dtype of x
    g_ptr,  # [R, L] grad_y, contiguous
    x_ptr,  # [R, L] contiguous
    center_ptr,  # [R] ACC: the group mean of each row, mean[k(b), c]
    a_ptr, bx_ptr, c0_ptr,  # [R] ACC: the per-row coefficients
    R, L,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """grad_x[r, :] = g[r, :] a[r] + (x[r, :] - center[r]) bx[r] + c0[r]."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_L)
    in_rows = rows < R
    a = tl.load(a_ptr + rows, mask=in_rows, other=0.0).to(ACC)[:, None]
    bx = tl.load(bx_ptr + rows, mask=in_rows, other=0.0).to(ACC)[:, None]
    c0 = tl.load(c0_ptr + rows, mask=in_rows, other=0.0).to(ACC)[:, None]
    center = tl.load(center_ptr + rows, mask=in_rows, other=0.0).to(ACC)[:, None]
    offs = rows[:, None] * L
    for start in range(0, L, BLOCK_L):
        idx = offs + (start + cols)[None, :]
        inside = in_rows[:, None] & ((start + cols) < L)[None, :]
        g = tl.load(g_ptr + idx, mask=inside, other=0.0).to(ACC)
        x = tl.load(x_ptr + idx, mask=inside, other=0.0).to(ACC)
        tl.store(gx_ptr + idx, (g * a + (x - center) * bx + c0).to(gx_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _affine_backward_kernel(
    gx_ptr,  # [R, L] written, contiguous, the dtype of x
    gscale_ptr,  # [R] written, ACC: sum g x
    gshift_ptr,  # [R] written, ACC: sum g
    g_ptr,  # [R, L] grad_y, contiguous
    x_ptr,  # [R, L] contiguous
    scale_ptr,  # [R] ACC
    R, L,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """One pass: grad_x[r, :] = g[r, :] scale[r], and the row sums of g x and of g."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_L)
    in_rows = rows < R
    scale = tl.load(scale_ptr + rows, mask=in_rows, other=0.0).to(ACC)[:, None]
    offs = rows[:, None] * L
    acc_g = tl.zeros([BLOCK_R, BLOCK_L], dtype=ACC)
    acc_gx = tl.zeros([BLOCK_R, BLOCK_L], dtype=ACC)
    for start in range(0, L, BLOCK_L):
        idx = offs + (start + cols)[None, :]
        inside = in_rows[:, None] & ((start + cols) < L)[None, :]
        g = tl.load(g_ptr + idx, mask=inside, other=0.0).to(ACC)
        x = tl.load(x_ptr + idx, mask=inside, other=0.0).to(ACC)
        tl.store(gx_ptr + idx, (g * scale).to(gx_ptr.dtype.element_ty), mask=inside)
        acc_g += g
        acc_gx += g * x
    tl.store(gscale_ptr + rows, tl.sum(acc_gx, axis=1), mask=in_rows)
    tl.store(gshift_ptr + rows, tl.sum(acc_g, axis=1), mask=in_rows)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_accumulation_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_x(op: str, x: Tensor) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{op}: x must be a float16, bfloat16, float32 or float64 tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{op}: x must be [B, C, *], got {tuple(x.shape)}")


def _check_like(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    """t must have ref's shape, dtype and device."""
    if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(
            f"{op}: {name} must match {ref_name} ({tuple(ref.shape)} {ref.dtype} on {ref.device}), got "
            f"{tuple(t.shape)} {t.dtype} on {t.device}"
        )


def _check_common(op: str, x: Tensor, arch: Tensor, weight: Tensor, group_size: int) -> None:
    """The checks the C++ training forward and backward share (csrc/arch_batch_norm.cpp, same
    messages). Metadata only: nothing is read from the device (the arch range is checked by the op)."""
    _check_x(op, x)
    B, C = x.shape[0], x.shape[1]
    if arch.dtype != torch.int64 or arch.dim() != 1 or arch.shape[0] != B or arch.device != x.device:
        raise ValueError(
            f"{op}: arch must be a [B] = [{B}] int64 tensor on {x.device}, got {arch.dtype} "
            f"{tuple(arch.shape)} on {arch.device}"
        )
    if weight.dim() != 2 or weight.shape[1] != C or weight.shape[0] < 1 or weight.device != x.device:
        raise ValueError(f"{op}: weight must be [S, C] with C = {C} on {x.device}, got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"{op}: weight has dtype {weight.dtype} but x has {x.dtype}")
    if group_size < 1 or B % group_size:
        raise ValueError(f"{op}: group_size = {group_size} must be >= 1 and divide the batch size B = {B}")


def _check_affine(op: str, x: Tensor, scale: Tensor) -> None:
    """The C++ eval-mode checks (check_affine in csrc/arch_batch_norm.cpp, same messages)."""
    _check_x(op, x)
    B, C = x.shape[0], x.shape[1]
    if scale.dim() != 2 or tuple(scale.shape) != (B, C) or scale.device != x.device:
        raise ValueError(f"{op}: scale must be [B, C] = [{B}, {C}] on {x.device}, got {tuple(scale.shape)}")
    acc = _accumulation_dtype(x.dtype)
    if scale.dtype != acc:
        raise ValueError(f"{op}: scale must have dtype {acc} for x of dtype {x.dtype}, got {scale.dtype}")


def _as_rows(t: Tensor) -> tuple[Tensor, int, int, int]:
    """(t as a contiguous [B, C, L] tensor, B, C, L); L = 0 if t is empty."""
    B, C = t.shape[0], t.shape[1]
    L = t[0, 0].numel() if B * C else 0
    return t.contiguous().reshape(B, C, L), B, C, L


def _tiling(rows: int, L: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_L, programs) for ``rows`` > 0 rows of L values.

    BLOCK_L covers the row up to MAX_TILE columns (longer rows loop); the rest of the tile is filled
    with rows, never more than the (rounded-up) number of rows there are.
    """
    block_l = min(MAX_TILE, triton.next_power_of_2(max(L, 1)))
    block_r = max(1, min(MAX_TILE // block_l, triton.next_power_of_2(rows)))
    return block_r, block_l, triton.cdiv(rows, block_r)


def _in_layout_of(t: Tensor, x: Tensor) -> Tensor:
    """A contiguous result t of x's shape in the layout of the ops' contract for x (a copy only for a
    channels-last x)."""
    return t.reshape(x.shape).contiguous(memory_format=output_memory_format(x))


def _per_row(t: Tensor, group_size: int) -> Tensor:
    """[G, C] -> [B, C]: the row of group k for each of its group_size examples."""
    return t.repeat_interleave(group_size, dim=0)


def _group_sum(t: Tensor, group_size: int) -> Tensor:
    """[B, C] -> [G, C]: the sum over each group's group_size examples."""
    return t.view(t.shape[0] // group_size, group_size, t.shape[1]).sum(dim=1)


def _launch_affine(y: Tensor, x: Tensor, scale: Tensor, shift: Tensor, center: Tensor | None = None) -> None:
    """y = (x - center) * scale + shift (x * scale + shift without a centre) row by row; x and y
    contiguous [B, C, L], center, scale and shift [B, C] in the accumulation dtype."""
    B, C, L = x.shape
    rows = B * C
    if rows * L == 0:
        return
    scale = scale.contiguous()
    block_r, block_l, programs = _tiling(rows, L)
    _affine_kernel[(programs,)](
        y,
        x,
        scale if center is None else center.contiguous(),  # not read without CENTERED
        scale,
        shift.contiguous(),
        rows,
        L,
        ACC=_tl_accumulation_dtype(x.dtype),
        BLOCK_R=block_r,
        BLOCK_L=block_l,
        CENTERED=center is not None,
    )


def channel_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """y[b, c, :] = x[b, c, :] * scale[b, c] + shift[b, c].

    x: [B, C, *] (any strides); scale, shift: [B, C] in the accumulation dtype (float32 for
    float16/bfloat16, else x's dtype). Returns a tensor of x's shape and dtype, in the contract's
    layout (channels-last for a channels-last x, else contiguous).
    """
    _check_affine("channel_affine", x, scale)
    _check_like("channel_affine", "shift", shift, "scale", scale)
    xr, _, _, _ = _as_rows(x)
    y = torch.empty_like(xr)
    _launch_affine(y, xr, scale, shift)
    return _in_layout_of(y, x)


def channel_affine_backward(grad_y: Tensor, x: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`channel_affine`, in one pass over (grad_y, x):

        grad_x = grad_y * scale[b, c];  grad_scale[b, c] = sum_l grad_y x;  grad_shift[b, c] = sum_l grad_y

    Returns a tensor of x's shape and dtype (in the contract's layout), and two [B, C] in the
    accumulation dtype.
    """
    _check_affine("channel_affine_backward", x, scale)
    _check_like("channel_affine_backward", "grad_y", grad_y, "x", x)
    xr, B, C, L = _as_rows(x)
    gr = grad_y.contiguous().reshape(B, C, L)
    acc_dtype = _accumulation_dtype(x.dtype)
    grad_x = torch.empty_like(xr)
    rows = B * C
    if rows == 0 or L == 0:  # empty sums
        zeros = torch.zeros((B, C), dtype=acc_dtype, device=x.device)
        return _in_layout_of(grad_x, x), zeros, zeros.clone()
    grad_scale = torch.empty((B, C), dtype=acc_dtype, device=x.device)
    grad_shift = torch.empty((B, C), dtype=acc_dtype, device=x.device)
    block_r, block_l, programs = _tiling(rows, L)
    _affine_backward_kernel[(programs,)](
        grad_x,
        grad_scale,
        grad_shift,
        gr,
        xr,
        scale.contiguous(),
        rows,
        L,
        ACC=_tl_accumulation_dtype(x.dtype),
        BLOCK_R=block_r,
        BLOCK_L=block_l,
    )
    return _in_layout_of(grad_x, x), grad_scale, grad_shift


def arch_batch_norm(
    x: Tensor, arch: Tensor, weight: Tensor, bias: Tensor, group_size: int, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training-mode architecture-conditional batch norm with statistics groups of group_size
    consecutive examples; see :func:`bnas_fast.reference.arch_batch_norm`.

    x: [B, C, *] (any strides); arch: [B] int64 in [0, S); weight, bias: [S, C], x's dtype;
    group_size divides B. Returns y (x's shape and dtype, in the contract's layout), mean and invstd
    [G, C], and row_mean and row_m2 [B, C], all four in the accumulation dtype.
    """
    op = "arch_batch_norm"
    _check_common(op, x, arch, weight, group_size)
    if bias.shape != weight.shape or bias.device != x.device:
        raise ValueError(
            f"{op}: bias must be [S, C] = {tuple(weight.shape)} like weight, got {tuple(bias.shape)}"
        )
    if bias.dtype != x.dtype:
        raise ValueError(f"{op}: bias has dtype {bias.dtype} but x has {x.dtype}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: eps must be finite and >= 0, got {eps}")
    L = math.prod(x.shape[2:]) if x.shape[0] * x.shape[1] else 0
    if group_size * L < 2:
        raise ValueError(
            f"{op}: each statistics group has {group_size * L} value per channel (group_size = {group_size}, "
            f"L = {L}); the batch variance needs at least 2"
        )
    xr, B, C, L = _as_rows(x)
    acc_dtype = _accumulation_dtype(x.dtype)
    G = B // group_size
    rows = B * C
    row_mean = torch.empty((B, C), dtype=acc_dtype, device=x.device)
    row_m2 = torch.empty((B, C), dtype=acc_dtype, device=x.device)
    if rows:
        # L = 0 (an empty spatial size) is launched too: the kernel then gives 0 / 0 = NaN for the
        # mean and 0 for M2, as the reference does.
        block_r, block_l, programs = _tiling(rows, L)
        _row_stats_kernel[(programs,)](
            xr,
            row_mean,
            row_m2,
            rows,
            L,
            ACC=_tl_accumulation_dtype(x.dtype),
            BLOCK_R=block_r,
            BLOCK_L=block_l,
            SINGLE=L <= block_l,
        )
    # Chan's combination of each group's rows (all with L values), in float64: the mean of the row
    # means, and M2 = sum row_m2 + L sum (row_mean - mean)^2; the variance is biased (divided by N).
    group_means = row_mean.double().view(G, group_size, C)
    mean64 = group_means.mean(dim=1)
    m2 = _group_sum(row_m2.double(), group_size) + L * ((group_means - mean64.unsqueeze(1)) ** 2).sum(dim=1)
    invstd64 = torch.rsqrt(m2 / (group_size * L) + eps)
    mean, invstd = mean64.to(acc_dtype), invstd64.to(acc_dtype)
    # y = (x - mean) * scale + shift per row, with mean the rounded group mean that is returned
    # (x - mean is exact for x near it) and its rounding error taken out in the shift:
    # x - mean64 = (x - mean) - (mean64 - mean).
    scale64 = _per_row(invstd64, group_size) * weight.double()[arch]
    shift64 = bias.double()[arch] - _per_row(mean64 - mean.double(), group_size) * scale64
    y = torch.empty_like(xr)
    _launch_affine(y, xr, scale64.to(acc_dtype), shift64.to(acc_dtype), center=_per_row(mean, group_size))
    return _in_layout_of(y, x), mean, invstd, row_mean, row_m2


def arch_batch_norm_backward(
    grad_y: Tensor, x: Tensor, arch: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, group_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`arch_batch_norm`'s y to x, weight and bias; see
    :func:`bnas_fast.reference.arch_batch_norm_backward`.

    grad_y, x: [B, C, *] (any strides); mean, invstd: [G, C] from the forward. Returns grad_x (x's
    shape and dtype, in the contract's layout) and grad_weight, grad_bias [S, C] in weight's dtype.
    """
    op = "arch_batch_norm_backward"
    _check_common(op, x, arch, weight, group_size)
    _check_like(op, "grad_y", grad_y, "x", x)
    G, C, acc = x.shape[0] // group_size, x.shape[1], _accumulation_dtype(x.dtype)
    for name, t in (("mean", mean), ("invstd", invstd)):
        if t.dtype != acc or t.dim() != 2 or tuple(t.shape) != (G, C) or t.device != x.device:
            raise ValueError(
                f"{op}: {name} must be [G, C] = [{G}, {C}] of dtype {acc}, got {t.dtype} {tuple(t.shape)}"
            )
    xr, B, C, L = _as_rows(x)
    gr = grad_y.contiguous().reshape(B, C, L)
    acc_dtype = _accumulation_dtype(x.dtype)
    S = weight.shape[0]
    N = group_size * L
    rows = B * C
    mean_rows = _per_row(mean.to(acc_dtype), group_size).contiguous()  # [B, C], what the kernels subtract
    grad_x = torch.empty_like(xr)

    # 1. per row, one pass: A = sum g, Bs = sum g (x - mean), D = sum (x - mean)
    sum_g = torch.zeros((B, C), dtype=acc_dtype, device=x.device)
    sum_gx = torch.zeros((B, C), dtype=acc_dtype, device=x.device)
    sum_x = torch.zeros((B, C), dtype=acc_dtype, device=x.device)
    if rows * L:
        block_r, block_l, programs = _tiling(rows, L)
        _grad_sums_kernel[(programs,)](
            gr,
            xr,
            mean_rows,
            sum_g,
            sum_gx,
            sum_x,
            rows,
            L,
            ACC=_tl_accumulation_dtype(x.dtype),
            BLOCK_R=block_r,
            BLOCK_L=block_l,
        )

    # 2. per (group, channel), in float64: delta = mean(x) - mean, the residual of the rounded mean
    #    (an empty group, L = 0, has none), so that x - mean(x) = (x - mean) - delta and
    #    sum_l g (x - mean(x)) = Bs - delta A (= sum (g - mean g)(x - mean - delta) over the group).
    #    m1 = mean of dxhat = g w, m2 = mean of dxhat xhat (with w constant over a row, sum_l dxhat =
    #    w A and sum_l dxhat xhat = invstd w (Bs - delta A)); per architecture, the parameter
    #    gradients sum_l g xhat = invstd (Bs - delta A) and sum_l g = A.
    A, Bs = sum_g.double(), sum_gx.double()
    r = invstd.double()
    r_rows = _per_row(r, group_size)
    delta = _group_sum(sum_x.double(), group_size) / max(N, 1)
    delta_rows = _per_row(delta, group_size)
    centred = Bs - delta_rows * A
    w = weight.double()[arch]  # [B, C]
    m1 = _group_sum(w * A, group_size) / N
    m2 = r * _group_sum(w * centred, group_size) / N
    grad_weight = torch.zeros((S, C), dtype=torch.float64, device=x.device)
    grad_weight.index_add_(0, arch, r_rows * centred)
    grad_bias = torch.zeros((S, C), dtype=torch.float64, device=x.device).index_add_(0, arch, A)

    # 3. grad_x = invstd (dxhat - m1 - xhat m2) with xhat = (x - mean - delta) invstd
    #           = g (invstd w) + (x - mean) (-invstd^2 m2) + (-invstd m1 + delta invstd^2 m2)
    if rows * L:
        a = r_rows * w
        bx = -r_rows * r_rows * _per_row(m2, group_size)
        c0 = -r_rows * _per_row(m1, group_size) - delta_rows * bx
        block_r, block_l, programs = _tiling(rows, L)
        _grad_x_kernel[(programs,)](
            grad_x,
            gr,
            xr,
            mean_rows,
            a.to(acc_dtype).contiguous(),
            bx.to(acc_dtype).contiguous(),
            c0.to(acc_dtype).contiguous(),
            rows,
            L,
            ACC=_tl_accumulation_dtype(x.dtype),
            BLOCK_R=block_r,
            BLOCK_L=block_l,
        )
    return _in_layout_of(grad_x, x), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)
