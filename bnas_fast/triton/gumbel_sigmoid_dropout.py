"""Triton kernels for concrete (Gumbel-sigmoid) dropout with a learnable drop probability (the CUDA
backend of ``bnas_fast::gumbel_sigmoid_dropout`` and ``gumbel_sigmoid_dropout_backward``).

x is viewed as [B, C, P] contiguous; G = C / group_size groups of channels share a drop logit
lambda[g] (log p / (1 - p), p the drop probability). Every *mask unit* draws one logistic noise L
from the counter-based Philox-4x32-10 generator keyed by seed_offset = (seed, offset):

    word(i)  = output word (i mod 4) of Philox-4x32-10 on the counter (lo32(offset + i // 4),
               hi32(offset + i // 4), 0, 0) under the key (lo32(seed), hi32(seed))
    L(i)     = log(a / b) in float32,  a = float32(w) + 1/2,  b = float32(2^32 - 1 - w) + 1/2
    z        = (lambda + L) / temperature
    soft     = sigmoid(-z),  hard = 1[z < 0],  scale = 1 + exp(lambda) (rescale) or 1,  p = sigmoid(lambda)

    forward   y      = x * k * scale,  k = soft (mode 0) or hard (mode 1, straight-through; mode 2, hard)
    backward  grad_x = g * k * scale   (g = grad_y; k = soft in mode 0, else hard)
              grad_lambda[gr] = sum over b, the channels c of group gr and s of
                                g x scale (k p r - t),  r = 1 if rescale else 0,
                                t = soft (1 - soft) / temperature (modes 0, 1) or 0 (mode 2)

(see :func:`bnas_fast.reference.gumbel_sigmoid_dropout`, the specification). Units are numbered
u = (b C + c) P + s per element (the flat index of x[b, c, s]), and u = b G + c // group_size per
group of channels (one unit for all of x[b, c, :] with c in the group). A call with n units uses
the counters offset .. offset + ceil(n / 4) - 1; advancing the offset between calls is the caller's.

The design:

* One Philox call (``tl.philox``, whose key split and round order are those of the reference) on
  quad counter q gives the words of the four consecutive units 4q .. 4q + 3; every tile is laid out
  as whole quads, [..., 4] with the unit's lane last, and a ``tl.where`` on the lane picks its word.
  The noise is never stored: the backward regenerates it from (seed, offset).
* Two layouts. *Unit rows* (one noise per row): per group, unit u owns the contiguous rows
  u * group_size .. (u + 1) * group_size - 1 of x, i.e. a row of L = group_size * P values of the
  [B G, group_size P] view; per element with P = 1 every value is its own unit row (L = 1). A tile
  is [BLOCK_Q quads, 4 lanes, BLOCK_L values]: one Philox call per quad of unit rows, no waste. The
  logit of unit u is lambda[(u mod UC) // UGS] (UC = units per example, UGS = units per logit).
  *Element rows* (per element, P > 1): row r = b C + c holds the P units r P .. r P + P - 1, which
  start at any lane of a quad. A tile is [BLOCK_R rows, BLOCK_Q quads, 4 lanes], each row walking
  the quads that cover its units and masking the lanes outside it: at most 3 lanes wasted at each
  end of a row (none when 4 divides P). A flat layout would waste none, but it needs the channel
  of every element (an int64 division per element) and cannot sum grad_lambda per row.
* Long rows are split into chunks of at most MAX_STEPS tiles (a second grid axis), so that a few
  long rows (drop-path-like groups, B G small and group_size P large) still make many programs.
* grad_lambda: every program writes the sum of its tile over its chunk for each of its rows to a
  [chunks, rows] buffer (per unit row: sum g x times the unit's constant factor; per element row:
  sum g x times each element's factor); torch sums the buffer over chunks, examples and the channels
  of each group. No atomics, so the result is deterministic.
* The noise is float32 as in the reference: a and b are exact conversions plus 1/2, a / b is an
  IEEE (correctly rounded) division (``div_rn``; plain ``/`` is approximate on NVIDIA GPUs), and
  the log is ``tl.log`` (libdevice's logf on NVIDIA, within 1 ulp; numpy's float32 log under the
  interpreter, within 4), not correctly rounded, and neither is torch.log: the noise may differ from
  the reference's by a few ulp, which flips a hard mask only when lambda + L is within those ulp of
  0 (about 1e-8 per unit). The kernels compute the keep and the slope already multiplied by
  scale, as in the C++ kernels: with e = exp(z - log scale), soft scale = 1 / (1 / scale + e) and
  1 - soft = e soft scale, so t scale = soft scale (e soft scale) / temperature. Near the float32
  limit of the rescale (lambda about 80 to 87.7), soft underflows while soft scale is of order 1,
  and scale times a sum of terms overflowed (a NaN grad_lambda). 1 - soft needs no subtraction, so
  it does not cancel when soft is near 1; exp's argument is capped (88 in float32, 700 in float64)
  so that e soft scale stays about 1 instead of inf * 0.
* float16/bfloat16 compute in float32 and are rounded once; float32 and float64 compute in their
  own type (the noise is float32, then converted). temperature reaches the kernels as a one-element
  tensor of that type (a Python float argument would be float32, too coarse for float64). The
  straight-through forward uses hard exactly (the reference's hard + soft - soft.detach() can be
  one ulp below 1).
* Offsets are 64-bit: a row index times its length may exceed 2^31 elements.

The launchers own the layout (contiguity, the views, output allocation, tiling) and read (seed,
offset) on the host; the kernels own the per-element math. The launchers repeat the C++ kernel's
argument checks (shapes, dtypes, group_size dividing C, temperature > 0, mode in {0, 1, 2}; metadata
only), because a direct call of the op on CUDA reaches them without the public function's checks, and
a drop_logit shorter than C / group_size would be read out of bounds. There is no autograd logic here.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "MAX_STEPS",
    "MAX_TILE",
    "gumbel_sigmoid_dropout",
    "gumbel_sigmoid_dropout_backward",
    "logistic_noise",
    "philox_bits",
]

# Elements a program holds per loop step (BLOCK_Q * 4 * BLOCK_L or BLOCK_R * BLOCK_Q * 4). 1024
# with the default 4 warps is 8 values per thread; the Philox state adds 4 words per quad.
MAX_TILE = 1024

# Tiles a program walks along its rows before the rest of the row goes to another program (the
# chunks of the second grid axis): 8 tiles of 1024 values amortise the Philox calls and per-row
# set-up of a program and still split a long row over many programs.
MAX_STEPS = 8

# Largest second grid dimension CUDA allows; longer rows get longer chunks.
_MAX_GRID_Y = 65535

# Rounds of the Philox cipher (Philox-4x32-10, as reference.PHILOX_ROUNDS).
PHILOX_ROUNDS = tl.constexpr(10)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _philox_quads(seed, offset, quads):
    """The four Philox-4x32-10 words (uint32, quads' shape) of the counters offset + quads (int64):
    counter words (lo32, hi32, 0, 0), key (lo32(seed), hi32(seed)), as reference.philox_bits."""
    counter = offset + quads
    lo = counter.to(tl.uint32)  # truncation: the low word
    hi = (counter >> 32).to(tl.uint32)
    zero = tl.zeros_like(lo)
    return tl.philox(seed, lo, hi, zero, zero, PHILOX_ROUNDS)


@triton.jit
def _pick(w0, w1, w2, w3, lane):
    """Word ``lane`` of each quad: w0..w3 broadcast against lane (values 0..3, the last axis)."""
    return tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))


@triton.jit
def _logistic_noise(w):
    """Standard logistic noise of uint32 words, float32, as reference.logistic_noise."""
    a = w.to(tl.float32) + 0.5
    b = (~w).to(tl.float32) + 0.5  # ~w = 2^32 - 1 - w
    return tl.log(tl.math.div_rn(a, b))


@triton.jit
def _soft_scaled(z, temperature, inv_scale, log_scale):
    """(soft scale, t scale) with e = exp(z - log scale): 1 / (1 / scale + e) and that times
    (e soft scale) / temperature (module docstring)."""
    if z.dtype == tl.float64:
        cap = 700.0
    else:
        cap = 88.0  # exp stays finite in float32, so e soft scale is about 1, not inf * 0
    e = tl.exp(tl.minimum(z - log_scale, cap))
    soft_scaled = 1.0 / (inv_scale + e)
    return soft_scaled, soft_scaled * (e * soft_scaled) / temperature


@triton.jit
def _scaled_gate(lam, noise, temperature, scale, inv_scale, log_scale, MODE: tl.constexpr, GRAD: tl.constexpr):
    """(k scale, t scale): the keep value of the mode (soft in mode 0, hard otherwise) and, with GRAD,
    the slope t = soft (1 - soft) / temperature (0 in mode 2), both times scale, for
    z = (lam + noise) / temperature. lam, temperature and the rescale constants are in the compute
    dtype, noise float32; the shapes broadcast."""
    s = lam + noise.to(lam.dtype)
    z = s / temperature
    if MODE == 0:
        keep, slope = _soft_scaled(z, temperature, inv_scale, log_scale)
    else:
        # the sign of lambda + L itself, as the reference: dividing a tiny negative s by the
        # temperature could round it to -0
        keep = tl.where(s < 0, scale, 0.0).to(lam.dtype)
        if MODE == 1 and GRAD:
            _, slope = _soft_scaled(z, temperature, inv_scale, log_scale)
        else:
            slope = tl.zeros_like(keep)
    return keep, slope


@triton.jit
def _rescale_constants(lam, RESCALE: tl.constexpr):
    """(scale, 1 / scale, log scale, p) with scale = 1 + exp(lam) and p = sigmoid(lam) with RESCALE;
    (1, 1, 0, 0) without (p is only used times r = 0)."""
    if RESCALE:
        scale = 1.0 + tl.exp(lam)
        inv_scale = 1.0 / scale
        # softplus(lam) = log(1 + e^lam), without overflow for large lam
        log_scale = tl.maximum(lam, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(lam)))
        p = 1.0 / (1.0 + tl.exp(-lam))
    else:
        scale = tl.full(lam.shape, 1.0, lam.dtype)
        inv_scale = scale
        log_scale = tl.zeros_like(lam)
        p = tl.zeros_like(lam)
    return scale, inv_scale, log_scale, p


@triton.jit(do_not_specialize=["seed", "offset"])
def _philox_kernel(
    out_ptr,  # [n] written, int64: the words
    seed, offset, n,
    BLOCK_Q: tl.constexpr,
):
    """Words 4q .. 4q + 3 of the stream (seed, offset) for the program's quads q (a test helper)."""
    quads = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    w0, w1, w2, w3 = _philox_quads(seed, offset, quads)
    lane = tl.arange(0, 4)[None, :]
    idx = quads[:, None] * 4 + lane
    w = _pick(w0[:, None], w1[:, None], w2[:, None], w3[:, None], lane)
    tl.store(out_ptr + idx, w.to(tl.int64), mask=idx < n)  # zero-extends the uint32


@triton.jit
def _noise_kernel(
    out_ptr,  # [n] written, float32
    bits_ptr,  # [n] int64 words in [0, 2^32)
    n,
    BLOCK: tl.constexpr,
):
    """The logistic noise of given words, computed as the kernels compute it (a test helper)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(bits_ptr + idx, mask=idx < n, other=0).to(tl.uint32)
    tl.store(out_ptr + idx, _logistic_noise(w), mask=idx < n)


@triton.jit(do_not_specialize=["seed", "offset"])
def _unit_rows_kernel(
    out_ptr,  # [U, L] written, x's dtype: y (forward) or grad_x (GRAD)
    part_ptr,  # GRAD: [chunks, U] written, ACC: the chunk's share of each unit's grad_lambda term
    x_ptr,  # [U, L] contiguous
    g_ptr,  # GRAD: [U, L] grad_y, contiguous (unused in the forward)
    logit_ptr,  # [G] drop logits
    temp_ptr,  # [1] ACC: the temperature
    seed, offset,
    U, L,
    UC, UGS,  # the logit of unit u is logit[(u mod UC) // UGS]
    chunk,  # values of a row per program (a multiple of BLOCK_L)
    ACC: tl.constexpr,
    MODE: tl.constexpr,
    RESCALE: tl.constexpr,
    GRAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """One noise per row of L values; program (i, j) owns the unit rows of quads i * BLOCK_Q ..
    (i + 1) * BLOCK_Q - 1 and their values j * chunk .. (j + 1) * chunk - 1."""
    quads = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    w0, w1, w2, w3 = _philox_quads(seed, offset, quads)
    lane = tl.arange(0, 4)[None, :]
    units = quads[:, None] * 4 + lane  # [BLOCK_Q, 4]
    in_units = units < U
    noise = _logistic_noise(_pick(w0[:, None], w1[:, None], w2[:, None], w3[:, None], lane))
    lam = tl.load(logit_ptr + (units % UC) // UGS, mask=in_units, other=0.0).to(ACC)
    temperature = tl.load(temp_ptr)
    scale, inv_scale, log_scale, p = _rescale_constants(lam, RESCALE)
    keep, slope = _scaled_gate(lam, noise, temperature, scale, inv_scale, log_scale, MODE, GRAD)
    keep3 = keep[:, :, None]

    cols = tl.arange(0, BLOCK_L)[None, None, :]
    base = units[:, :, None] * L  # int64
    begin = tl.program_id(1).to(tl.int64) * chunk
    end = tl.minimum(begin + chunk, L)
    acc = tl.zeros([BLOCK_Q, 4, BLOCK_L], dtype=ACC)
    for start in range(begin, end, BLOCK_L):
        idx = start + cols
        inside = in_units[:, :, None] & (idx < end)
        x = tl.load(x_ptr + base + idx, mask=inside, other=0.0).to(ACC)
        if GRAD:
            g = tl.load(g_ptr + base + idx, mask=inside, other=0.0).to(ACC)
            out = g * keep3
            acc += g * x  # 0 outside the tensor
        else:
            out = x * keep3
        tl.store(out_ptr + base + idx, out.to(out_ptr.dtype.element_ty), mask=inside)
    if GRAD:
        # Every value of a unit row has the same factor scale (k p r - t): one product per unit
        # (keep and slope are already times scale; p is 0 without RESCALE).
        factor = keep * p - slope
        part = tl.sum(acc, axis=2) * factor
        tl.store(part_ptr + tl.program_id(1).to(tl.int64) * U + units, part, mask=in_units)


@triton.jit(do_not_specialize=["seed", "offset"])
def _element_rows_kernel(
    out_ptr,  # [R, P] written, x's dtype: y (forward) or grad_x (GRAD)
    part_ptr,  # GRAD: [chunks, R] written, ACC: the chunk's share of each row's grad_lambda term
    x_ptr,  # [R, P] contiguous
    g_ptr,  # GRAD: [R, P] grad_y, contiguous (unused in the forward)
    logit_ptr,  # [G] drop logits
    temp_ptr,  # [1] ACC: the temperature
    seed, offset,
    R, C, P,
    group_size,
    NQ,  # quads a row spans at most
    chunk,  # quads of a row per program (a multiple of BLOCK_Q)
    ACC: tl.constexpr,
    MODE: tl.constexpr,
    RESCALE: tl.constexpr,
    GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    """One noise per value; row r holds the units r P .. r P + P - 1, covered by the quads from
    (r P) // 4 on. Program (i, j) owns rows i * BLOCK_R .. (i + 1) * BLOCK_R - 1 and their quads
    j * chunk .. (j + 1) * chunk - 1 (counted from each row's first quad)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows = rows < R
    lam = tl.load(logit_ptr + (rows % C) // group_size, mask=in_rows, other=0.0).to(ACC)
    temperature = tl.load(temp_ptr)
    scale, inv_scale, log_scale, p = _rescale_constants(lam, RESCALE)
    lam3 = lam[:, None, None]
    scale3, inv_scale3, log_scale3, p3 = scale[:, None, None], inv_scale[:, None, None], log_scale[:, None, None], p[:, None, None]

    first = rows * P  # the row's first unit (= its flat offset in x), int64
    first3 = first[:, None, None]
    in_rows3 = in_rows[:, None, None]
    lane = tl.arange(0, 4)[None, None, :]
    steps = tl.arange(0, BLOCK_Q)
    begin = tl.program_id(1).to(tl.int64) * chunk
    end = tl.minimum(begin + chunk, NQ)
    acc = tl.zeros([BLOCK_R, BLOCK_Q, 4], dtype=ACC)
    for k in range(begin, end, BLOCK_Q):
        step = k + steps
        quads = (first >> 2)[:, None] + step[None, :]  # [BLOCK_R, BLOCK_Q]
        w0, w1, w2, w3 = _philox_quads(seed, offset, quads)
        units = quads[:, :, None] * 4 + lane  # [BLOCK_R, BLOCK_Q, 4]
        inside = in_rows3 & (step < end)[None, :, None] & (units >= first3) & (units < first3 + P)
        noise = _logistic_noise(_pick(w0[:, :, None], w1[:, :, None], w2[:, :, None], w3[:, :, None], lane))
        keep, slope = _scaled_gate(lam3, noise, temperature, scale3, inv_scale3, log_scale3, MODE, GRAD)
        x = tl.load(x_ptr + units, mask=inside, other=0.0).to(ACC)
        if GRAD:
            g = tl.load(g_ptr + units, mask=inside, other=0.0).to(ACC)
            out = g * keep
            # keep and slope are already times scale; p is 0 without RESCALE
            acc += tl.where(inside, g * x * (keep * p3 - slope), 0.0)
        else:
            out = x * keep
        tl.store(out_ptr + units, out.to(out_ptr.dtype.element_ty), mask=inside)
    if GRAD:
        part = tl.sum(tl.sum(acc, axis=2), axis=1)
        tl.store(part_ptr + tl.program_id(1).to(tl.int64) * R + rows, part, mask=in_rows)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_accumulation_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check(
    op: str,
    x: Tensor,
    drop_logit: Tensor,
    seed_offset: Tensor,
    temperature: float,
    group_size: int,
    mode: int,
    grad_y: Tensor | None = None,
) -> None:
    """The C++ kernel's checks (make_config in csrc/gumbel_sigmoid_dropout.cpp, same messages); with
    ``grad_y`` also the backward's. Metadata only: the sign of (seed, offset), which the C++ kernel
    also checks, is left to the public function (the kernels key Philox with any int64 pair)."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{op}: x must be a float16, bfloat16, float32 or float64 tensor, got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [B, C, P], got {tuple(x.shape)}")
    C = x.shape[1]
    if group_size < 1 or C % group_size:
        raise ValueError(f"{op}: group_size = {group_size} must be >= 1 and divide C = {C}")
    if drop_logit.dim() != 1 or drop_logit.shape[0] != C // group_size or drop_logit.device != x.device:
        raise ValueError(
            f"{op}: drop_logit must be [C / group_size] = [{C // group_size}] on {x.device}, got "
            f"{tuple(drop_logit.shape)} on {drop_logit.device}"
        )
    if drop_logit.dtype != x.dtype:
        raise TypeError(f"{op}: drop_logit has dtype {drop_logit.dtype} but x has dtype {x.dtype}")
    if seed_offset.dtype != torch.int64 or seed_offset.numel() != 2:
        raise TypeError(f"{op}: seed_offset must be an int64 tensor of 2 entries (seed, offset)")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")
    if mode not in (0, 1, 2):
        raise ValueError(f"{op}: mode must be 0 (soft), 1 (straight-through) or 2 (hard), got {mode}")
    if grad_y is not None:
        if grad_y.shape != x.shape or grad_y.device != x.device:
            raise ValueError(f"{op}: grad_y must have x's shape {tuple(x.shape)}, got {tuple(grad_y.shape)}")
        if grad_y.dtype != x.dtype:
            raise TypeError(f"{op}: grad_y has dtype {grad_y.dtype} but x has dtype {x.dtype}")


def _seed_offset(seed_offset: Tensor) -> Tuple[int, int]:
    # Read on the host: on a GPU this .tolist() synchronises with the device (acceptable here; the
    # kernels could instead load the two words themselves).
    seed, offset = (int(v) for v in seed_offset.tolist())
    return seed, offset


def _chunking(n_steps: int, block: int) -> Tuple[int, int]:
    """(chunk, chunks): a row of n_steps tiles of ``block`` split in chunks of at most MAX_STEPS
    tiles, longer if the chunk count would exceed the grid's second dimension."""
    steps = max(MAX_STEPS, triton.cdiv(n_steps, _MAX_GRID_Y))
    return block * steps, triton.cdiv(n_steps, steps)


class _Plan(NamedTuple):
    """How x [B, C, P] is tiled: ``units`` (unit rows, :func:`_unit_rows_kernel`) or element rows."""

    units: bool
    rows: int  # U unit rows or R = B C element rows
    length: int  # L values per unit row, or P
    uc: int  # unit rows: units per example
    ugs: int  # unit rows: units per logit
    nq: int  # element rows: quads a row spans at most
    block_rows: int  # BLOCK_Q (unit rows: quads of 4 rows) or BLOCK_R
    block: int  # BLOCK_L (unit rows) or BLOCK_Q (element rows)
    chunk: int
    grid: Tuple[int, int]


def _plan(B: int, C: int, P: int, group_size: int, per_element: bool) -> _Plan:
    if not per_element or P == 1:
        if per_element:  # P = 1: every value is a unit row of one value, with the logit of its channel
            rows, length, uc, ugs = B * C, 1, C, group_size
        else:  # unit b G + g owns the group_size consecutive rows of its channels
            G = C // group_size
            rows, length, uc, ugs = B * G, group_size * P, G, 1
        block = min(MAX_TILE // 4, triton.next_power_of_2(length))
        block_rows = max(1, min(MAX_TILE // (4 * block), triton.next_power_of_2(triton.cdiv(rows, 4))))
        chunk, chunks = _chunking(triton.cdiv(length, block), block)
        grid = (triton.cdiv(rows, 4 * block_rows), chunks)
        return _Plan(True, rows, length, uc, ugs, 0, block_rows, block, chunk, grid)
    # Element rows. A row starts at lane (r P) mod 4, a multiple of gcd(P, 4); the worst start,
    # lane 4 - gcd(P, 4), makes the row span the most quads.
    rows = B * C
    nq = (4 - math.gcd(P, 4) + P - 1) // 4 + 1
    block = min(MAX_TILE // 4, triton.next_power_of_2(nq))
    block_rows = max(1, min(MAX_TILE // (4 * block), triton.next_power_of_2(rows)))
    chunk, chunks = _chunking(triton.cdiv(nq, block), block)
    grid = (triton.cdiv(rows, block_rows), chunks)
    return _Plan(False, rows, P, 0, 0, nq, block_rows, block, chunk, grid)


def _launch(
    plan: _Plan,
    out: Tensor,
    part: Tensor,
    x: Tensor,
    g: Tensor,
    drop_logit: Tensor,
    seed_offset: Tensor,
    temperature: float,
    group_size: int,
    rescale: bool,
    mode: int,
    grad: bool,
) -> None:
    seed, offset = _seed_offset(seed_offset)
    acc = _accumulation_dtype(x.dtype)
    temp = torch.full((1,), temperature, dtype=acc, device=x.device)
    common = dict(ACC=_tl_accumulation_dtype(x.dtype), MODE=int(mode), RESCALE=bool(rescale), GRAD=grad)
    logit = drop_logit.contiguous()
    if plan.units:
        _unit_rows_kernel[plan.grid](
            out, part, x, g, logit, temp, seed, offset,
            plan.rows, plan.length, plan.uc, plan.ugs, plan.chunk,
            BLOCK_Q=plan.block_rows, BLOCK_L=plan.block, **common,
        )
    else:
        C = x.shape[1]
        _element_rows_kernel[plan.grid](
            out, part, x, g, logit, temp, seed, offset,
            plan.rows, C, plan.length, group_size, plan.nq, plan.chunk,
            BLOCK_R=plan.block_rows, BLOCK_Q=plan.block, **common,
        )


def gumbel_sigmoid_dropout(
    x: Tensor,
    drop_logit: Tensor,
    seed_offset: Tensor,
    temperature: float,
    group_size: int,
    per_element: bool,
    rescale: bool,
    mode: int,
) -> Tensor:
    """y = x * keep * scale; see :func:`bnas_fast.reference.gumbel_sigmoid_dropout`.

    x: [B, C, P] (any strides); drop_logit: [C / group_size], x's dtype; seed_offset: int64 [2] =
    (seed, offset). Returns y, contiguous, x's shape and dtype.
    """
    _check("gumbel_sigmoid_dropout", x, drop_logit, seed_offset, temperature, group_size, mode)
    B, C, P = x.shape
    xc = x.contiguous()
    y = torch.empty_like(xc)
    if xc.numel() == 0:
        return y
    plan = _plan(B, C, P, group_size, per_element)
    # The forward has no partial sums and no grad_y: x stands in for both (never accessed).
    _launch(plan, y, xc, xc, xc, drop_logit, seed_offset, temperature, group_size, rescale, mode, False)
    return y


def gumbel_sigmoid_dropout_backward(
    grad_y: Tensor,
    x: Tensor,
    drop_logit: Tensor,
    seed_offset: Tensor,
    temperature: float,
    group_size: int,
    per_element: bool,
    rescale: bool,
    mode: int,
) -> Tuple[Tensor, Tensor]:
    """(grad_x, grad_drop_logit), the noise regenerated from seed_offset; see
    :func:`bnas_fast.reference.gumbel_sigmoid_dropout_backward`.

    Returns grad_x (contiguous, x's shape and dtype) and grad_drop_logit [C / group_size] in
    drop_logit's dtype.
    """
    op = "gumbel_sigmoid_dropout_backward"
    _check(op, x, drop_logit, seed_offset, temperature, group_size, mode, grad_y=grad_y)
    B, C, P = x.shape
    G = C // group_size
    xc = x.contiguous()
    gc = grad_y.contiguous()
    acc = _accumulation_dtype(x.dtype)
    grad_x = torch.empty_like(xc)
    if xc.numel() == 0:  # an empty sum
        return grad_x, torch.zeros(G, dtype=drop_logit.dtype, device=x.device)
    plan = _plan(B, C, P, group_size, per_element)
    part = torch.empty((plan.grid[1], plan.rows), dtype=acc, device=x.device)
    _launch(plan, grad_x, part, xc, gc, drop_logit, seed_offset, temperature, group_size, rescale, mode, True)
    # Fixed-order reductions: over the chunks, then over the examples (and, per element, the
    # channels of each group). part's rows are unit rows b G + g per group, element (or P = 1 unit)
    # rows b C + c per element.
    per_row = part.sum(0)
    if per_element:
        grad_logit = per_row.view(B, G, group_size).sum((0, 2))
    else:
        grad_logit = per_row.view(B, G).sum(0)
    return grad_x, grad_logit.to(drop_logit.dtype)


def philox_bits(seed: int, offset: int, n: int, device=None) -> Tensor:
    """The n words the kernels draw from (seed, offset), int64 [n] in [0, 2^32); equals
    :func:`bnas_fast.reference.philox_bits` (a test helper)."""
    out = torch.empty(n, dtype=torch.int64, device=device)
    if n:
        block_q = min(MAX_TILE // 4, triton.next_power_of_2(triton.cdiv(n, 4)))
        _philox_kernel[(triton.cdiv(n, 4 * block_q),)](out, seed, offset, n, BLOCK_Q=block_q)
    return out


def logistic_noise(bits: Tensor) -> Tensor:
    """The kernels' logistic noise of 32-bit words (int64 [n] in [0, 2^32)), float32 [n]:
    :func:`bnas_fast.reference.logistic_noise` up to the rounding of the log (a test helper)."""
    if bits.dtype != torch.int64:  # the word range is not checked: that would read the tensor
        raise TypeError("logistic_noise_of_words: words must be an int64 tensor")
    bits = bits.contiguous()
    out = torch.empty(bits.shape, dtype=torch.float32, device=bits.device)
    n = bits.numel()
    if n:
        block = min(MAX_TILE, triton.next_power_of_2(n))
        _noise_kernel[(triton.cdiv(n, block),)](out, bits, n, BLOCK=block)
    return out
