"""Triton kernels for factors of rank one per (example, output channel) (the CUDA backend of
``bnas_fast::rank_one_split`` and ``bnas_fast::rank_one_conv_input_grad``; module docstring of
:mod:`bnas_fast.ops.rank_one`).

* ``_split_kernel``: a program owns one (n, o) and loads its K x P factors as one tile (K and P
  rounded up to powers of two: a 64 x 64 map with K = 10 is a 16 x 4096 tile). Tiles above
  MAX_SPLIT_TILE elements (2^16; Triton refuses tensors above 2^20, and registers run out long
  before) go to the pure-PyTorch reference on the same device instead. It scales the tile by its largest
  magnitude (the C++ kernel uses the nearest power of two, so the two can differ in the last bit
  of the coefficients), picks the row of largest norm w (the first on ties), and writes
  coeffs[k, n, o] = <S_k, w> / <w, w>, maps[n, o] = the unscaled row, and a flag: every row's
  residual off c_k w at most 16 epsilon of its norm, every entry finite. The launcher combines the
  flags on the device (no host synchronisation) and zeroes the outputs when one is False.
* ``_input_grad_kernel``: a program owns one (n, c), a block of BLOCK input pixels and a block of
  up to BLOCK_K factors k. For each output channel o of c's group it forms
  t = sum_taps W[o, c, tap] maps[n, o, tap's source pixel] once, with masked loads (a source pixel
  exists where (iy + ph - u dh) / sh and (ix + pw - v dw) / sw are whole and inside the map), and
  adds coeffs[k, n, o] t to every factor's row of a [BLOCK_K, BLOCK] accumulator: the taps are
  paid once per (n, o), not once per factor, as in the C++ kernel. Any stride, padding, dilation
  and groups.

Offsets are 64-bit. Each output is computed by one program in a fixed order: deterministic.
:mod:`bnas_fast.reference` is the specification; the launchers repeat the C++ kernels' checks,
because a direct call of the op on CUDA reaches them without the public functions' checks.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from bnas_fast._checks import MAX_GEOMETRY

__all__ = ["rank_one_split", "rank_one_conv_input_grad", "MAX_BLOCK_K", "MAX_BLOCK_PIXELS", "MAX_SPLIT_TILE"]

MAX_BLOCK_PIXELS = 256  # input pixels per program of the input-gradient kernel
MAX_BLOCK_K = 16  # factors per program of the input-gradient kernel (a [16, 256] accumulator)
MAX_SPLIT_TILE = 2**16  # largest K x P tile (powers of two) of the split kernel; larger splits run the reference


@triton.jit
def _split_kernel(
    coeffs_ptr,  # [K, N, O] written, contiguous
    maps_ptr,  # [N, O, P] written, contiguous
    flags_ptr,  # [N O] int32 written: 1 where (n, o) is of rank one
    s_ptr,  # [K, N, O, P], any strides
    K, N, O, P,
    ssk, ssn, sso, ssp,
    TOL2: tl.constexpr,  # (16 epsilon)^2
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n = pid // O
    o = pid % O
    k = tl.arange(0, BLOCK_K)
    p = tl.arange(0, BLOCK_P)
    in_k = k < K
    mask = in_k[:, None] & (p < P)[None, :]
    tile = s_ptr + n * ssn + o * sso + k.to(tl.int64)[:, None] * ssk + p.to(tl.int64)[None, :] * ssp
    s = tl.load(tile, mask=mask, other=0.0)
    largest = tl.max(tl.max(tl.abs(s), axis=1), axis=0)
    # Scaled to a largest magnitude of 1, so that tiny factors do not underflow when squared. An
    # infinite entry becomes NaN here and fails the residual test below, as NaN does.
    scaled = s / tl.where(largest > 0, largest, 1.0)
    norms = tl.sum(scaled * scaled, axis=1)  # [BLOCK_K]
    best = tl.argmax(norms, axis=0, tie_break_left=True)
    chosen = (k == best)[:, None]
    w = tl.sum(tl.where(chosen, scaled, 0.0), axis=0)  # [BLOCK_P]
    ww = tl.sum(w * w, axis=0)
    c = tl.sum(scaled * w[None, :], axis=1) / tl.where(ww > 0, ww, 1.0)
    r = scaled - c[:, None] * w[None, :]
    residual = tl.sum(r * r, axis=1)
    row_ok = (residual <= TOL2 * norms) | (k >= K)  # False for NaN
    ok = tl.min(row_ok.to(tl.int32), axis=0)
    tl.store(flags_ptr + pid, ok)
    tl.store(coeffs_ptr + (k.to(tl.int64) * N + n) * O + o, c, mask=in_k)
    tl.store(maps_ptr + pid * P + p, tl.sum(tl.where(chosen, s, 0.0), axis=0), mask=p < P)


@triton.jit
def _input_grad_kernel(
    e_ptr,  # [K, N, C, H, W] written, contiguous
    a_ptr,  # coeffs [K, N, O], contiguous
    m_ptr,  # maps [N, O, Ho, Wo], contiguous
    w_ptr,  # weight [O, Cg, KH, KW], contiguous
    K, N, O, C, H, W, Ho, Wo, Cg, Og,
    sh, sw, ph, pw, dh, dw,
    KH: tl.constexpr,
    KW: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # n C + c
    c = pid % C
    n = pid // C
    group = c // Cg
    c_local = c % Cg
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = i < H * W
    iy = i // W
    ix = i % W
    k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_k = k < K
    acc = tl.zeros([BLOCK_K, BLOCK], dtype=ACC)
    for oo in range(0, Og):
        o = group * Og + oo
        # t: map o transposed-convolved with W[o, c] at this block's pixels, once for all K factors
        t = tl.zeros([BLOCK], dtype=ACC)
        for u in tl.static_range(KH):
            for v in tl.static_range(KW):
                y = iy + ph - u * dh  # sh times the map row this tap reads, when whole
                x = ix + pw - v * dw
                valid = inside & (y >= 0) & (x >= 0) & (y % sh == 0) & (x % sw == 0) & (y // sh < Ho) & (x // sw < Wo)
                src = m_ptr + ((n * O + o) * Ho + tl.where(valid, y // sh, 0)) * Wo + tl.where(valid, x // sw, 0)
                # where(), not the masked load's 0 alone: a NaN or infinite weight times the 0 of a tap
                # that reads no map pixel would give NaN at pixels that weight never touches
                tap = tl.load(w_ptr + ((o * Cg + c_local) * KH + u) * KW + v) * tl.load(src, mask=valid, other=0.0)
                t += tl.where(valid, tap, 0.0)
        a = tl.load(a_ptr + (k.to(tl.int64) * N + n) * O + o, mask=in_k, other=0.0)  # [BLOCK_K]
        acc += a[:, None] * t[None, :]
    out = e_ptr + ((k.to(tl.int64) * N + n) * C + c)[:, None] * (H * W) + i[None, :]
    tl.store(out, acc, mask=in_k[:, None] & inside[None, :])


def _check_float_or_double(name: str, t: Tensor, op: str) -> None:
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: {name} must be float32 or float64, got {t.dtype}")


def rank_one_split(factors: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(coeffs [K, N, O], maps [N, O, Ho, Wo], ok [] bool) of factors [K, N, O, Ho, Wo] (module docstring)."""
    op = "rank_one_split"
    _check_float_or_double("factors", factors, op)
    if factors.dim() != 5:
        raise ValueError(f"{op}: factors must be [K, N, C_out, Ho, Wo], got {tuple(factors.shape)}")
    K, N, O, Ho, Wo = factors.shape
    P = Ho * Wo
    coeffs = torch.zeros((K, N, O), dtype=factors.dtype, device=factors.device)
    maps = torch.zeros((N, O, Ho, Wo), dtype=factors.dtype, device=factors.device)
    if factors.numel() == 0:
        return coeffs, maps, torch.ones((), dtype=torch.bool, device=factors.device)
    block_k, block_p = triton.next_power_of_2(K), triton.next_power_of_2(P)
    if block_k * block_p > MAX_SPLIT_TILE:
        # One (n, o)'s factors no longer fit one tile (module docstring): the reference, on the device.
        from bnas_fast import reference

        return reference.rank_one_split(factors)
    s = factors.reshape(K, N, O, P)
    flags = torch.empty(N * O, dtype=torch.int32, device=factors.device)
    tol = 16 * torch.finfo(factors.dtype).eps
    _split_kernel[(N * O,)](
        coeffs, maps, flags, s, K, N, O, P, *s.stride(),
        TOL2=tol * tol, BLOCK_K=block_k, BLOCK_P=block_p,
    )
    ok = flags.bool().all()
    return torch.where(ok, coeffs, 0), torch.where(ok, maps, 0), ok


def rank_one_conv_input_grad(
    coeffs: Tensor, maps: Tensor, weight: Tensor, input_size: Sequence[int], stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int], groups: int,
) -> Tensor:
    """E [K, N, C_in, H, W] of a Conv2d for the output gradients coeffs[k, n, o] maps[n, o] (module docstring)."""
    op = "rank_one_conv_input_grad"
    for name, t in (("coeffs", coeffs), ("maps", maps), ("weight", weight)):
        _check_float_or_double(name, t, op)
    if maps.dtype != coeffs.dtype or weight.dtype != coeffs.dtype:
        raise TypeError(f"{op}: coeffs, maps and weight must share a dtype, got {coeffs.dtype}, {maps.dtype} and {weight.dtype}")
    if coeffs.dim() != 3 or maps.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"{op}: need coeffs [K, N, C_out], maps [N, C_out, Ho, Wo] and weight [C_out, C_in / groups, kh, kw]")
    if any(len(arg) != 2 for arg in (input_size, stride, padding, dilation)):
        raise ValueError(f"{op}: input_size, stride, padding and dilation must have 2 entries")
    K, N, O = coeffs.shape
    (H, W), (kh, kw) = input_size, weight.shape[2:]
    if tuple(maps.shape[:2]) != (N, O) or weight.shape[0] != O:
        raise ValueError(f"{op}: maps {tuple(maps.shape)} and weight {tuple(weight.shape)} do not match coeffs "
                         f"{tuple(coeffs.shape)} (N and C_out)")
    if groups < 1 or O % groups:
        raise ValueError(f"{op}: groups = {groups} must divide C_out = {O}")
    if min(H, W, *stride, *dilation) < 1 or min(padding) < 0:
        raise ValueError(f"{op}: input_size, stride and dilation must be >= 1 and padding >= 0")
    if max(H, W, kh, kw, *stride, *padding, *dilation) > MAX_GEOMETRY:
        raise ValueError(f"{op}: input_size, the kernel size, stride, padding and dilation must be below 2^31")
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if H + 2 * padding[0] < dilation[0] * (kh - 1) + 1 or W + 2 * padding[1] < dilation[1] * (kw - 1) + 1 or (
            tuple(maps.shape[2:]) != (Ho, Wo)):
        raise ValueError(f"{op}: maps' size {tuple(maps.shape[2:])} is not the convolution's output size for "
                         f"input_size {tuple(input_size)}")
    Cg = weight.shape[1]
    C = Cg * groups
    E = torch.empty((K, N, C, H, W), dtype=coeffs.dtype, device=coeffs.device)
    if E.numel() == 0:
        return E
    block = min(MAX_BLOCK_PIXELS, triton.next_power_of_2(H * W))
    block_k = min(MAX_BLOCK_K, triton.next_power_of_2(K))
    _input_grad_kernel[(N * C, triton.cdiv(H * W, block), triton.cdiv(K, block_k))](
        E, coeffs.contiguous(), maps.contiguous(), weight.contiguous(),
        K, N, O, C, H, W, Ho, Wo, Cg, O // groups,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=kh, KW=kw, ACC=tl.float64 if coeffs.dtype == torch.float64 else tl.float32, BLOCK_K=block_k, BLOCK=block,
    )
    return E
