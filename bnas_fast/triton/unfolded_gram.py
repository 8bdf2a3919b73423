"""Triton kernels for the per-filter Gauss-Newton blocks of a convolution (the CUDA backend of
``bnas_fast::unfolded_gram``).

x is [N, C_in, H, W], the factors S are [N, K, C_out, Ho, Wo] (P = Ho * Wo), the convolution has
kernel (kh, kw), stride (sh, sw), padding (ph, pw), dilation (dh, dw) and ``groups``; Cg = C_in /
groups input and Og = C_out / groups output channels per group, D = Cg * kh * kw and D' = D + bias.
For output channel o of group gr = o // Og, with X_n[p, d] the im2col unfolding of x[n] over the
group's input channels (d = (c * kh + u) * kw + v, p = oy * Wo + ox):

    X_n[p, d]   = x[n, gr * Cg + c, oy * sh - ph + u * dh, ox * sw - pw + v * dw]   (0 outside the image)
    J[n,k,o,d]  = sum_p S[n, k, o, p] X_n[p, d]          (d < D)
    J[n,k,o,D]  = sum_p S[n, k, o, p]                    (only with the bias)
    G[o]        = sum_{n,k} J[n,k,o] J[n,k,o]^T          [C_out, D', D']
    diag G[o]   = sum_{n,k} J[n,k,o]^2                   [C_out, D']   (``diagonal``)

:func:`bnas_fast.reference.unfolded_gram` is the specification. The design follows
csrc/unfolded_gram.cpp (two GEMMs), without its scratch unfolding and without its rank-one
compression of the factors:

* Kernel 1 (``_factor_jacobian_kernel``) writes J [N, K, C_out, D'] in the accumulation dtype. A
  program owns one example n, one group, a block of BLOCK_M rows m of the group's K * Og (factor,
  output channel) pairs (k = m // Og, o = m % Og, as the C++ kernel's [N, K Og, P] GEMM operand) and a
  block of BLOCK_D coordinates d, and loops over P in steps of BLOCK_P: J_tile += S_tile @ X_tile
  with S_tile [BLOCK_M, BLOCK_P] read through the factors' strides and X_tile [BLOCK_P, BLOCK_D]
  gathered from x by the index formula above (masked loads; the unfolding is never materialised,
  not even per tile in memory). Packing k with o keeps the GEMM's M dimension full when Og is small
  (a depthwise convolution has Og = 1). The bias column is a constant 1 in X_tile.
* Kernel 2 (``_gram_kernel``) computes G[o] = J[:, o]^T J[:, o] over the R = N K rows r = (n, k): a
  program owns one o and one tile (d-block, e-block) with e-block >= d-block and loops over r in
  steps of BLOCK_R. G is symmetric, so it computes the upper triangle of tiles only and stores each
  off-diagonal tile twice (as is and transposed): half the GEMM work.
* ``diagonal``: kernel 3 (``_diagonal_kernel``) sums the squares of J over r for a block of the
  flattened (o, d) columns; no Gram product.
* No [C_out, N P, D] tensor exists; the only scratch is J (N K C_out D' numbers, as in the C++ kernel).
* Precision: every tl.dot runs on operands in the accumulation dtype (float32 for float16/bfloat16
  inputs, else the input's dtype) with ``input_precision="ieee"``. No TF32: the float32 results
  must agree with the CPU kernel and the reference to ~1e-4 relative, which TF32's 10-bit mantissa
  does not give. Upcasting the float16/bfloat16 tiles before the dot (instead of a native
  half-precision dot with float32 accumulation, which would compute the same exact products) is
  also what Triton's interpreter needs: in 3.9 it multiplies bfloat16 tiles as their raw bits.
  float64 tiles go through tl.dot as well (the frontend accepts them; the interpreter uses
  numpy's float64 matmul).
* Offsets are 64-bit: x, the factors and J may exceed 2^31 elements.
* Deterministic: every sum runs in a fixed order within one program; no atomics.

The launcher owns the layout (strides, the flat [N, K, C_out, P] view of the factors, the output
and J allocation, the block sizes); the kernels own the index arithmetic and the math. The launcher
repeats the C++ kernel's shape checks, because a direct call of the op on CUDA reaches it without
the public function's checks, and a wrong geometry would make the kernels read out of bounds.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from bnas_fast._checks import MAX_GEOMETRY

__all__ = ["MAX_BLOCK_D", "MAX_BLOCK_M", "MAX_BLOCK_P", "MAX_BLOCK_R", "MAX_DIAGONAL_TILE", "unfolded_gram"]

# Largest tile sizes; the launcher shrinks each to the (power-of-two rounded) size of its dimension,
# but never below 16, the smallest operand tl.dot accepts. 64 x 64 accumulators with 64 x 32 and
# 32 x 64 operand tiles fit the default 4 warps' registers without spills, also in float64.
MAX_BLOCK_M = 64  # (factor, output channel) rows of kernel 1
MAX_BLOCK_P = 32  # output positions per step of kernel 1's loop
MAX_BLOCK_D = 64  # coordinates d (kernel 1) and the d and e sides of a Gram tile (kernel 2)
MAX_BLOCK_R = 32  # (n, k) rows per step of kernel 2's and kernel 3's loops
MAX_DIAGONAL_TILE = 2048  # BLOCK_R * BLOCK_C of kernel 3
MIN_DOT = 16


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _factor_jacobian_kernel(
    j_ptr,  # [N, K, C_out, D'] written, contiguous, ACC
    x_ptr,  # [N, C_in, H, W], any strides
    s_ptr,  # [N, K, C_out, P], any strides
    K, C_out, H, W, Wo, P, D, DP, Cg, Og, groups,
    sh, sw, ph, pw, dh, dw,
    sxn, sxc, sxh, sxw,
    ssn, ssk, sso, ssp,
    KH: tl.constexpr,
    KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """J[n, k, gr*Og + o, d] = sum_p S[n, k, gr*Og + o, p] X_n[p, d] for one (n, gr, m-block, d-block)."""
    # One flat grid axis (no 65535 limit): d-blocks fastest, so that neighbouring programs share the
    # same factor rows and overlapping windows of x.
    pid = tl.program_id(0).to(tl.int64)
    d_blocks = tl.cdiv(DP, BLOCK_D)
    m_blocks = tl.cdiv(K * Og, BLOCK_M)
    db = pid % d_blocks
    rest = pid // d_blocks
    mb = rest % m_blocks
    rest = rest // m_blocks
    gr = rest % groups
    n = rest // groups

    # Rows m = k * Og + o of the group's K * Og (factor, output channel) pairs.
    m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = m < K * Og
    k = m // Og
    o = gr * Og + (m - k * Og)
    s_rows = s_ptr + n * ssn + k.to(tl.int64) * ssk + o.to(tl.int64) * sso  # [BLOCK_M]

    # Coordinates d = (c * KH + u) * KW + v of the block; d = D is the bias column.
    d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    c = d // (KH * KW)
    u = (d // KW) % KH
    v = d % KW
    in_d = d < D
    x_cols = x_ptr + n * sxn + (gr * Cg + c).to(tl.int64) * sxc  # [BLOCK_D]
    dy = u * dh - ph  # row offset of tap u: iy = oy * sh + dy
    dx = v * dw - pw

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        in_p = p < P
        oy = p // Wo
        ox = p - oy * Wo
        s_tile = s_rows[:, None] + p.to(tl.int64)[None, :] * ssp
        s = tl.load(s_tile, mask=in_m[:, None] & in_p[None, :], other=0.0)
        iy = oy[:, None] * sh + dy[None, :]  # [BLOCK_P, BLOCK_D]
        ix = ox[:, None] * sw + dx[None, :]
        # Taps outside the image (the zero padding) and rows past P read nothing and count 0.
        inside = in_p[:, None] & in_d[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        xt = tl.load(x_cols[None, :] + iy.to(tl.int64) * sxh + ix.to(tl.int64) * sxw, mask=inside, other=0.0)
        xt = xt.to(ACC)
        if HAS_BIAS:
            xt = tl.where(in_p[:, None] & (d == D)[None, :], 1.0, xt).to(ACC)
        acc = tl.dot(s.to(ACC), xt, acc, input_precision="ieee", out_dtype=ACC)

    j_rows = ((n * K + k) * C_out + o) * DP  # [BLOCK_M] int64 (n is int64)
    tl.store(j_ptr + j_rows[:, None] + d[None, :], acc, mask=in_m[:, None] & (d < DP)[None, :])


@triton.jit
def _gram_kernel(
    g_ptr,  # [C_out, D', D'] written, contiguous, ACC
    j_ptr,  # [R, C_out, D'] contiguous, ACC
    R, C_out, DP,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """G[o, d-block, e-block] = sum_r J[r, o, d-block]^T J[r, o, e-block], upper triangle of tiles."""
    pid = tl.program_id(0).to(tl.int64)
    blocks = tl.cdiv(DP, BLOCK_D)
    be = pid % blocks
    rest = pid // blocks
    bd = rest % blocks
    o = rest // blocks
    # The grid covers every (d-block, e-block) pair; the lower triangle is the upper one's mirror
    # and is stored by it (the loop below is the whole cost, so these programs end at once).
    if be >= bd:
        d = bd * BLOCK_D + tl.arange(0, BLOCK_D)
        e = be * BLOCK_D + tl.arange(0, BLOCK_D)
        in_d = d < DP
        in_e = e < DP
        column = j_ptr + o * DP
        row_stride = C_out * DP
        acc = tl.zeros([BLOCK_D, BLOCK_D], dtype=ACC)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            in_r = r < R
            rows = column + r.to(tl.int64)[:, None] * row_stride
            a = tl.load(rows + d[None, :], mask=in_r[:, None] & in_d[None, :], other=0.0)
            b = tl.load(rows + e[None, :], mask=in_r[:, None] & in_e[None, :], other=0.0)
            acc = tl.dot(tl.trans(a), b, acc, input_precision="ieee", out_dtype=ACC)
        block = g_ptr + o * DP * DP
        tl.store(block + d.to(tl.int64)[:, None] * DP + e[None, :], acc, mask=in_d[:, None] & in_e[None, :])
        if be > bd:
            mirror = block + e.to(tl.int64)[:, None] * DP + d[None, :]
            tl.store(mirror, tl.trans(acc), mask=in_e[:, None] & in_d[None, :])


@triton.jit
def _diagonal_kernel(
    out_ptr,  # [C_out * D'] written, ACC
    j_ptr,  # [R, C_out * D'] contiguous, ACC
    R, COLS,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[c] = sum_r J[r, c]^2 for a block of the flattened (o, d) columns c."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = cols < COLS
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        tile = j_ptr + r.to(tl.int64)[:, None] * COLS + cols[None, :]
        a = tl.load(tile, mask=(r < R)[:, None] & in_c[None, :], other=0.0)
        acc += a * a
    tl.store(out_ptr + cols, tl.sum(acc, axis=0), mask=in_c)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_accumulation_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_block(size: int, largest: int) -> int:
    """A tl.dot tile side covering ``size`` (rounded up to a power of two), within [MIN_DOT, largest]."""
    return max(MIN_DOT, min(largest, triton.next_power_of_2(max(size, 1))))


def _check(x: Tensor, factors: Tensor, kernel_size, stride, padding, dilation, groups: int) -> None:
    """The C++ kernel's checks (same messages): the kernels index x and the factors by this geometry."""
    op = "unfolded_gram"
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be [N, C_in, H, W], got {tuple(x.shape)}")
    if factors.dim() != 5:
        raise ValueError(f"{op}: factors must be [N, K, C_out, Ho, Wo], got {tuple(factors.shape)}")
    if x.dtype != factors.dtype:
        raise TypeError(f"{op}: factors has dtype {factors.dtype} but x has dtype {x.dtype}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{op}: x must be a float16, bfloat16, float32 or float64 tensor, got {x.dtype}")
    if any(len(arg) != 2 for arg in (kernel_size, stride, padding, dilation)):
        raise ValueError(f"{op}: kernel_size, stride, padding and dilation must have 2 entries")
    if min(*kernel_size, *stride, *dilation) < 1 or min(padding) < 0:
        raise ValueError(f"{op}: kernel_size, stride and dilation must be >= 1 and padding >= 0")
    if max(*kernel_size, *stride, *padding, *dilation) > MAX_GEOMETRY:
        raise ValueError(f"{op}: kernel_size, stride, padding and dilation must be below 2^31")
    N, C_in, H, W = x.shape
    C_out = factors.shape[2]
    if groups < 1 or C_in % groups or C_out % groups:
        raise ValueError(f"{op}: groups = {groups} must divide C_in = {C_in} and C_out = {C_out}")
    if factors.shape[0] != N:
        raise ValueError(f"{op}: factors has N = {factors.shape[0]} but x has N = {N}")
    Ho = (H + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"{op}: the kernel is larger than the padded input: the convolution has no output")
    if tuple(factors.shape[3:]) != (Ho, Wo):
        raise ValueError(
            f"{op}: factors' output size {factors.shape[3]}x{factors.shape[4]} does not match the "
            f"convolution's {Ho}x{Wo}"
        )


def unfolded_gram(
    x: Tensor,
    factors: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    bias: bool,
    diagonal: bool = False,
) -> Tensor:
    """Per-filter GGN blocks G[o] = sum_{n,k} J[n,k,o] J[n,k,o]^T of a Conv2d (module docstring).

    x: [N, C_in, H, W] (or [N, C_in] for a Linear layer), any strides; factors: [N, K, C_out, Ho, Wo]
    (or [N, K, C_out]), x's dtype, any strides (K-major factors, [K, N, ...] in memory, are read in
    place); kernel_size, stride, padding, dilation: (int, int); groups divides C_in and C_out.

    Returns a contiguous [C_out, D', D'] (or [C_out, D'] with ``diagonal``), D' = C_in / groups * kh
    * kw + bias, in float32 for float16/bfloat16 inputs, else in x's dtype.
    """
    if x.dim() == 2 and factors.dim() == 3:  # Linear: a 1x1 convolution of a 1x1 image
        x, factors = x[:, :, None, None], factors[:, :, :, None, None]
    kernel_size, stride = tuple(kernel_size), tuple(stride)
    padding, dilation = tuple(padding), tuple(dilation)
    _check(x, factors, kernel_size, stride, padding, dilation, groups)
    N, C_in, H, W = x.shape
    K, C_out, Ho, Wo = factors.shape[1:]
    kh, kw = kernel_size
    Cg, Og = C_in // groups, C_out // groups
    D = Cg * kh * kw
    DP = D + (1 if bias else 0)
    P = Ho * Wo
    R = N * K
    acc_dtype = _accumulation_dtype(x.dtype)
    shape = (C_out, DP) if diagonal else (C_out, DP, DP)
    if C_out * DP == 0:
        return torch.empty(shape, dtype=acc_dtype, device=x.device)
    if R == 0:  # an empty sum over examples and factors
        return torch.zeros(shape, dtype=acc_dtype, device=x.device)
    acc = _tl_accumulation_dtype(x.dtype)

    # [N, K, C_out, P]: a view for contiguous and K-major factors alike (only the last three
    # dimensions merge), a copy only for unusual layouts.
    s = factors.reshape(N, K, C_out, P)
    J = torch.empty((N, K, C_out, DP), dtype=acc_dtype, device=x.device)
    block_m = _dot_block(K * Og, MAX_BLOCK_M)
    block_p = _dot_block(P, MAX_BLOCK_P)
    block_d = _dot_block(DP, MAX_BLOCK_D)
    programs = N * groups * triton.cdiv(K * Og, block_m) * triton.cdiv(DP, block_d)
    _factor_jacobian_kernel[(programs,)](
        J,
        x,
        s,
        K, C_out, H, W, Wo, P, D, DP, Cg, Og, groups,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *x.stride(),
        *s.stride(),
        KH=kh,
        KW=kw,
        HAS_BIAS=bool(bias),
        ACC=acc,
        BLOCK_M=block_m,
        BLOCK_P=block_p,
        BLOCK_D=block_d,
    )

    out = torch.empty(shape, dtype=acc_dtype, device=x.device)
    if diagonal:
        cols = C_out * DP
        block_r = min(MAX_BLOCK_R, triton.next_power_of_2(R))
        block_c = min(max(1, MAX_DIAGONAL_TILE // block_r), triton.next_power_of_2(cols))
        _diagonal_kernel[(triton.cdiv(cols, block_c),)](
            out, J, R, cols, ACC=acc, BLOCK_R=block_r, BLOCK_C=block_c
        )
        return out
    block_r = _dot_block(R, MAX_BLOCK_R)
    block_g = _dot_block(DP, MAX_BLOCK_D)
    blocks = triton.cdiv(DP, block_g)
    _gram_kernel[(C_out * blocks * blocks,)](out, J, R, C_out, DP, ACC=acc, BLOCK_R=block_r, BLOCK_D=block_g)
    return out
