"""Triton kernels for architecture-conditional batch norm (the CUDA backend of
``bnas_fast::arch_batch_norm`` and ``bnas_fast::channel_affine``).

x is viewed as [B, C, L] contiguous (L = product of the spatial sizes); a *row* is x[b, c, :]. The
design mirrors csrc/arch_batch_norm.cpp:

* every pass over the big tensors is a kernel with one program per row, looping over the row in
  blocks of BLOCK elements (so any L works with bounded registers);
* the small [B, C] -> [G, C] / [S, C] combinations (Chan's formula for the group statistics, the
  group means of the backward, the per-architecture sums of grad_weight and grad_bias) are torch
  ops in the launchers: they touch B * C numbers, not B * C * L;
* the forward's normalisation and the eval mode are the same kernel, y = x * scale[b, c] + shift[b, c];
* float16/bfloat16 accumulate in float32; float32 and float64 in their own type;
* offsets are 64-bit (a row index times L may exceed 2^31).

Argument checks happen in :mod:`bnas_fast.ops.arch_batch_norm` before these launchers are called.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["arch_batch_norm", "arch_batch_norm_backward", "channel_affine", "channel_affine_backward"]

BLOCK = 1024  # elements of a row per loop step


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_stats_kernel(x_ptr, mean_ptr, m2_ptr, L, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """row_mean[r] = mean of x[r, :], row_m2[r] = sum (x[r, :] - row_mean[r])^2 (two passes)."""
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * L
    offsets = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, L, BLOCK):
        idx = start + offsets
        total += tl.load(base + idx, mask=idx < L, other=0.0).to(ACC)
    mean = tl.sum(total, axis=0) / L
    spread = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, L, BLOCK):
        idx = start + offsets
        inside = idx < L
        d = tl.where(inside, tl.load(base + idx, mask=inside, other=0.0).to(ACC) - mean, 0.0)
        spread += d * d
    tl.store(mean_ptr + row, mean)
    tl.store(m2_ptr + row, tl.sum(spread, axis=0))


@triton.jit
def _affine_rows_kernel(x_ptr, scale_ptr, shift_ptr, y_ptr, L, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """y[r, :] = x[r, :] * scale[r] + shift[r]."""
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr + row).to(ACC)
    shift = tl.load(shift_ptr + row).to(ACC)
    offsets = tl.arange(0, BLOCK)
    for start in range(0, L, BLOCK):
        idx = start + offsets
        inside = idx < L
        x = tl.load(x_ptr + row * L + idx, mask=inside, other=0.0).to(ACC)
        tl.store(y_ptr + row * L + idx, (x * scale + shift).to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _grad_sums_kernel(g_ptr, x_ptr, center_ptr, sum_g_ptr, sum_gx_ptr, L, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """sum_g[r] = sum g[r, :], sum_gx[r] = sum g[r, :] (x[r, :] - center[r])."""
    row = tl.program_id(0).to(tl.int64)
    center = tl.load(center_ptr + row).to(ACC)
    offsets = tl.arange(0, BLOCK)
    acc_g = tl.zeros([BLOCK], dtype=ACC)
    acc_gx = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, L, BLOCK):
        idx = start + offsets
        inside = idx < L
        g = tl.load(g_ptr + row * L + idx, mask=inside, other=0.0).to(ACC)
        x = tl.load(x_ptr + row * L + idx, mask=inside, other=0.0).to(ACC)
        acc_g += g
        acc_gx += g * tl.where(inside, x - center, 0.0)
    tl.store(sum_g_ptr + row, tl.sum(acc_g, axis=0))
    tl.store(sum_gx_ptr + row, tl.sum(acc_gx, axis=0))


@triton.jit
def _grad_x_kernel(g_ptr, x_ptr, a_ptr, bx_ptr, c0_ptr, out_ptr, L, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """out[r, :] = g[r, :] a[r] + x[r, :] bx[r] + c0[r]."""
    row = tl.program_id(0).to(tl.int64)
    a = tl.load(a_ptr + row).to(ACC)
    bx = tl.load(bx_ptr + row).to(ACC)
    c0 = tl.load(c0_ptr + row).to(ACC)
    offsets = tl.arange(0, BLOCK)
    for start in range(0, L, BLOCK):
        idx = start + offsets
        inside = idx < L
        g = tl.load(g_ptr + row * L + idx, mask=inside, other=0.0).to(ACC)
        x = tl.load(x_ptr + row * L + idx, mask=inside, other=0.0).to(ACC)
        tl.store(out_ptr + row * L + idx, (g * a + x * bx + c0).to(out_ptr.dtype.element_ty), mask=inside)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _rows(x: Tensor) -> Tuple[Tensor, int, int, int]:
    B, C = x.shape[0], x.shape[1]
    L = x[0, 0].numel() if B * C else 0
    return x.contiguous().reshape(B, C, L), B, C, L


def _block(L: int) -> int:
    return min(BLOCK, triton.next_power_of_2(max(L, 1)))


def channel_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """y[b, c, :] = x[b, c, :] * scale[b, c] + shift[b, c]; see reference.channel_affine."""
    xr, B, C, L = _rows(x)
    y = torch.empty_like(xr)
    if B * C * L:
        _affine_rows_kernel[(B * C,)](
            xr, scale.contiguous(), shift.contiguous(), y, L, BLOCK=_block(L), ACC=_tl_acc(x.dtype)
        )
    return y.reshape(x.shape)


def channel_affine_backward(grad_y: Tensor, x: Tensor, scale: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """grad_x = grad_y scale; grad_scale = sum_l grad_y x; grad_shift = sum_l grad_y."""
    xr, B, C, L = _rows(x)
    gr = grad_y.contiguous().reshape(B, C, L)
    acc = _acc_dtype(x.dtype)
    grad_scale = torch.empty(B, C, dtype=acc, device=x.device)
    grad_shift = torch.empty(B, C, dtype=acc, device=x.device)
    grad_x = torch.empty_like(xr)
    if B * C:
        zeros = torch.zeros(B, C, dtype=acc, device=x.device)
        block, tl_acc = _block(L), _tl_acc(x.dtype)
        _grad_sums_kernel[(B * C,)](gr, xr, zeros, grad_shift, grad_scale, L, BLOCK=block, ACC=tl_acc)
        # grad_x = g * scale: the affine kernel with scale and a zero shift, applied to g
        _affine_rows_kernel[(B * C,)](gr, scale.contiguous(), zeros, grad_x, L, BLOCK=block, ACC=tl_acc)
    return grad_x.reshape(x.shape), grad_scale, grad_shift


def arch_batch_norm(
    x: Tensor, arch: Tensor, weight: Tensor, bias: Tensor, group_size: int, eps: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training-mode forward; returns (y, mean [G, C], invstd [G, C], row_mean [B, C], row_m2 [B, C])
    as reference.arch_batch_norm."""
    xr, B, C, L = _rows(x)
    acc = _acc_dtype(x.dtype)
    G = B // group_size
    row_mean = torch.empty(B, C, dtype=acc, device=x.device)
    row_m2 = torch.empty(B, C, dtype=acc, device=x.device)
    _row_stats_kernel[(B * C,)](xr, row_mean, row_m2, L, BLOCK=_block(L), ACC=_tl_acc(x.dtype))
    # Chan's combination of the group's rows (equal counts L): mean of the row means, and
    # M2 = sum row_m2 + L sum (row_mean - mean)^2.
    rm = row_mean.view(G, group_size, C)
    mean = rm.mean(1)
    m2 = row_m2.view(G, group_size, C).sum(1) + L * ((rm - mean.unsqueeze(1)) ** 2).sum(1)
    invstd = torch.rsqrt(m2 / (group_size * L) + eps)
    scale = (invstd.repeat_interleave(group_size, 0)) * weight.to(acc)[arch]
    shift = bias.to(acc)[arch] - mean.repeat_interleave(group_size, 0) * scale
    y = channel_affine(x, scale, shift)
    return y, mean, invstd, row_mean, row_m2


def arch_batch_norm_backward(
    grad_y: Tensor, x: Tensor, arch: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, group_size: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients to x, weight and bias; see reference.arch_batch_norm_backward."""
    xr, B, C, L = _rows(x)
    gr = grad_y.contiguous().reshape(B, C, L)
    acc = _acc_dtype(x.dtype)
    G, S = B // group_size, weight.shape[0]
    block, tl_acc = _block(L), _tl_acc(x.dtype)
    mean_rows = mean.repeat_interleave(group_size, 0).contiguous()  # [B, C]
    invstd_rows = invstd.repeat_interleave(group_size, 0)
    sum_g = torch.empty(B, C, dtype=acc, device=x.device)
    sum_gx = torch.empty(B, C, dtype=acc, device=x.device)  # sum g (x - mean)
    _grad_sums_kernel[(B * C,)](gr, xr, mean_rows, sum_g, sum_gx, L, BLOCK=block, ACC=tl_acc)
    w = weight.to(acc)[arch]  # [B, C]
    N = group_size * L
    m1 = (w * sum_g).view(G, group_size, C).sum(1) / N  # mean of dxhat over the group
    m2 = invstd * (w * sum_gx).view(G, group_size, C).sum(1) / N  # mean of dxhat * xhat
    m1_rows, m2_rows = m1.repeat_interleave(group_size, 0), m2.repeat_interleave(group_size, 0)
    a = invstd_rows * w
    bx = -invstd_rows * invstd_rows * m2_rows
    c0 = mean_rows * invstd_rows * invstd_rows * m2_rows - invstd_rows * m1_rows
    grad_x = torch.empty_like(xr)
    _grad_x_kernel[(B * C,)](gr, xr, a.contiguous(), bx.contiguous(), c0.contiguous(), grad_x, L, BLOCK=block, ACC=tl_acc)
    grad_weight = torch.zeros(S, C, dtype=acc, device=x.device).index_add_(0, arch, invstd_rows * sum_gx)
    grad_bias = torch.zeros(S, C, dtype=acc, device=x.device).index_add_(0, arch, sum_g)
    return grad_x.reshape(x.shape), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)
