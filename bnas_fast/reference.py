"""Pure-PyTorch reference of every bnas_fast op.

This module is the specification. It is written for clarity, not speed, and it is used four ways:

* the spec: each docstring states the math and the shapes that the kernels implement;
* the fallback: when the C++ extension is not built (or a backend is forced with
  ``BNAS_FAST_BACKEND=reference``), the registered ops run these functions;
* the test oracle: tests compare every kernel's forward and backward against these functions
  (backward through autograd of the forward below, and the explicit backward formulas here);
* the benchmark baseline: "eager" and "torch.compile" providers time these functions.

Nothing here validates its arguments; the public functions in :mod:`bnas_fast.functional` do that
once, before any backend runs.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "mix",
    "mix_backward",
    "mix_sparse",
    "mix_sparse_backward",
    "dense_to_sparse",
    "arch_weights",
    "depth_loglik",
    "depth_loglik_backward",
    "arch_batch_norm",
    "arch_batch_norm_backward",
    "arch_batch_norm_eval",
    "channel_affine",
    "channel_affine_backward",
    "philox_bits",
    "logistic_noise",
    "gumbel_sigmoid_keep",
    "gumbel_sigmoid_dropout",
    "gumbel_sigmoid_dropout_backward",
    "unfolded_gram",
    "softmax_ce_hessian_factors",
]


def _column(weights: Tensor, k: int, like: Tensor) -> Tensor:
    """weights[:, k] shaped [B, 1, 1, ...] so that it broadcasts against a [B, *rest] tensor."""
    return weights[:, k].reshape((-1,) + (1,) * (like.dim() - 1))


def _rows(t: Tensor) -> Tensor:
    """[n, *rest] -> [n, prod(rest)]; unlike reshape(n, -1) this also works for n = 0."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Low-precision inputs are accumulated in float32, as the kernels do."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ----------------------------------------------------------------------------------------------
# mix: per-example weighted sum of K candidate outputs
# ----------------------------------------------------------------------------------------------


def mix(ys: Sequence[Tensor], weights: Tensor, relu: bool = False) -> Tensor:
    """out[b] = sum_k weights[b, k] * ys[k][b], or relu of that sum with ``relu``.

    Args:
        ys: K tensors of identical shape [B, *rest] (the candidate operations' outputs).
        weights: [B, K] per-example weights (binary masks, softmax weights, aggregation
            coefficients).
        relu: apply max(., 0) to the sum (the ReLU that follows a node's sum in NSA).

    Returns:
        [B, *rest], the dtype of ``ys``. Low-precision inputs are summed in float32 and rounded once.
    """
    acc_dtype = _accumulation_dtype(ys[0].dtype)
    out = torch.zeros(ys[0].shape, dtype=acc_dtype, device=ys[0].device)
    for k, y in enumerate(ys):
        out = out + _column(weights, k, y).to(acc_dtype) * y.to(acc_dtype)
    if relu:
        out = torch.relu(out)
    return out.to(ys[0].dtype)


def mix_backward(
    grad_out: Tensor,
    ys: Sequence[Tensor],
    weights: Tensor,
    weights_requires_grad: bool,
    relu_out: Optional[Tensor] = None,
) -> Tuple[List[Tensor], Tensor]:
    """Gradients of :func:`mix`, with g = grad_out (or grad_out * 1[relu_out > 0] when ``relu_out``,
    the output of a ``relu=True`` forward, is given):

    grad_ys[k][b] = weights[b, k] * g[b]
    grad_weights[b, k] = <g[b], ys[k][b]>   (zeros when ``weights_requires_grad`` is False)

    Shapes: grad_out [B, *rest]; returns K tensors [B, *rest] and [B, K].
    """
    acc_dtype = _accumulation_dtype(grad_out.dtype)
    g = grad_out.to(acc_dtype)
    if relu_out is not None:
        g = torch.where(relu_out.to(acc_dtype) > 0, g, torch.zeros_like(g))
    grad_ys = [(_column(weights, k, y).to(acc_dtype) * g).to(y.dtype) for k, y in enumerate(ys)]
    if weights_requires_grad:
        flat = _rows(g)
        grad_weights = torch.stack(
            [(flat * _rows(y.to(acc_dtype))).sum(1) for y in ys], dim=1
        ).to(weights.dtype)
    else:
        grad_weights = torch.zeros_like(weights)
    return grad_ys, grad_weights


# ----------------------------------------------------------------------------------------------
# mix_sparse: candidate k computed only on the examples indices[k]
# ----------------------------------------------------------------------------------------------


def mix_sparse(ys: Sequence[Tensor], indices: Sequence[Tensor], weights: Tensor) -> Tensor:
    """out[b] = sum_k sum_{i : indices[k][i] = b} weights[b, k] * ys[k][i].

    Candidate k was computed only on the examples ``indices[k]``; its rows are scattered to their
    examples and weighted. Examples that no candidate covers get zeros.

    Args:
        ys: K tensors [n_k, *rest] (n_k may differ between candidates, and may be 0).
        indices: K int64 tensors [n_k] of distinct example indices in [0, B).
        weights: [B, K].

    Returns:
        [B, *rest].
    """
    batch = weights.shape[0]
    acc_dtype = _accumulation_dtype(ys[0].dtype)
    out = torch.zeros((batch,) + tuple(ys[0].shape[1:]), dtype=acc_dtype, device=weights.device)
    for k, (y, idx) in enumerate(zip(ys, indices)):
        w = weights[idx, k].reshape((-1,) + (1,) * (y.dim() - 1)).to(acc_dtype)
        out = out.index_add(0, idx, w * y.to(acc_dtype))
    return out.to(ys[0].dtype)


def mix_sparse_backward(
    grad_out: Tensor,
    ys: Sequence[Tensor],
    indices: Sequence[Tensor],
    weights: Tensor,
    weights_requires_grad: bool,
) -> Tuple[List[Tensor], Tensor]:
    """Gradients of :func:`mix_sparse`.

    grad_ys[k][i] = weights[indices[k][i], k] * grad_out[indices[k][i]]
    grad_weights[b, k] = <grad_out[b], ys[k][i]> where indices[k][i] = b, else 0.
    """
    acc_dtype = _accumulation_dtype(grad_out.dtype)
    g = grad_out.to(acc_dtype)
    grad_ys: List[Tensor] = []
    grad_weights = torch.zeros(weights.shape, dtype=acc_dtype, device=weights.device)
    for k, (y, idx) in enumerate(zip(ys, indices)):
        g_rows = g.index_select(0, idx)
        w = weights[idx, k].reshape((-1,) + (1,) * (y.dim() - 1)).to(acc_dtype)
        grad_ys.append((w * g_rows).to(y.dtype))
        if weights_requires_grad:
            dots = _rows(g_rows * y.to(acc_dtype)).sum(1)
            grad_weights[:, k] = grad_weights[:, k].index_add(0, idx, dots)
    return grad_ys, grad_weights.to(weights.dtype)


def dense_to_sparse(ys: Sequence[Tensor], weights: Tensor, threshold: float = 0.0) -> Tuple[List[Tensor], List[Tensor]]:
    """Rows of each dense candidate whose weight is non-zero, and their example indices.

    A helper for tests and examples: ``mix_sparse(*dense_to_sparse(ys, w), w) == mix(ys, w)``.
    """
    indices = [torch.nonzero(weights[:, k].abs() > threshold).flatten() for k in range(len(ys))]
    return [y.index_select(0, idx) for y, idx in zip(ys, indices)], indices


def arch_weights(arch: Tensor, table: Tensor) -> Tensor:
    """weights[b] = table[arch[b]]: per-example architecture index [B] into a [S, K] table -> [B, K]."""
    return table.index_select(0, arch)


# ----------------------------------------------------------------------------------------------
# depth_loglik: expected log-likelihood over a categorical depth posterior (learnt-depth networks)
# ----------------------------------------------------------------------------------------------


def depth_loglik(logits: Tensor, targets: Tensor, log_q: Tensor) -> Tensor:
    """out[b] = sum_i q_i * log_softmax(logits[i, b])[targets[b]],  q_i = exp(log_q[i]).

    The expected log-likelihood term of the learnt-depth ELBO (eq. 2 of seed 000), per example,
    computed exactly over every depth i in {0..D} from one forward pass.

    Args:
        logits: [D+1, B, C] the output block applied to every depth's activation.
        targets: [B] int64 class indices in [0, C).
        log_q: [D+1] log-probabilities of the depth posterior q(d).

    Returns:
        [B], the dtype of ``logits`` (float32 accumulation for low precision).
    """
    acc = _accumulation_dtype(logits.dtype)
    lsm = torch.log_softmax(logits.to(acc), dim=-1)  # [D+1, B, C]
    picked = lsm.gather(2, targets.view(1, -1, 1).expand(lsm.shape[0], -1, 1)).squeeze(2)  # [D+1, B]
    # A depth without mass contributes exactly 0 whatever its logits (the kernels do not read them;
    # q * NaN would be NaN).
    mass = _depth_mass(log_q, logits.dtype).unsqueeze(1)
    return torch.where(mass, log_q.to(acc).exp().unsqueeze(1) * picked, 0.0).sum(0).to(logits.dtype)


def _depth_mass(log_q: Tensor, dtype: torch.dtype) -> Tensor:
    """[D+1] bool: the depths with q_i = exp(log_q[i]) != 0 in the accumulation dtype of ``dtype``,
    the test the C++ and Triton kernels use to skip a depth (and never read its logits)."""
    return log_q.to(_accumulation_dtype(dtype)).exp() != 0


def depth_loglik_backward(
    grad_out: Tensor, logits: Tensor, targets: Tensor, log_q: Tensor
) -> Tuple[Tensor, Tensor]:
    """Gradients of :func:`depth_loglik`.

    With p = softmax(logits[i, b]) and l[i, b] = log p[targets[b]]:
        grad_logits[i, b, c] = grad_out[b] * q_i * (1[c = targets[b]] - p[c])
        grad_log_q[i]        = q_i * sum_b grad_out[b] * l[i, b]        (q_i = exp(log_q[i]))

    Shapes: grad_out [B]; returns [D+1, B, C] and [D+1].
    """
    acc = _accumulation_dtype(logits.dtype)
    lsm = torch.log_softmax(logits.to(acc), dim=-1)
    q = log_q.to(acc).exp()
    g = grad_out.to(acc)
    onehot = torch.zeros_like(lsm).scatter_(2, targets.view(1, -1, 1).expand(lsm.shape[0], -1, 1), 1.0)
    mass = _depth_mass(log_q, logits.dtype)  # no mass, no gradient, whatever the logits (as the kernels)
    grad_logits = torch.where(mass.view(-1, 1, 1), (q.view(-1, 1, 1) * g.view(1, -1, 1)) * (onehot - lsm.exp()), 0.0)
    picked = (lsm * onehot).sum(2)  # [D+1, B]
    grad_log_q = torch.where(mass, q * (picked * g.view(1, -1)).sum(1), 0.0)
    return grad_logits.to(logits.dtype), grad_log_q.to(log_q.dtype)


# ----------------------------------------------------------------------------------------------
# arch_batch_norm: batch norm whose affine parameters depend on each example's architecture (NSA)
# ----------------------------------------------------------------------------------------------


def _bcl(t: Tensor) -> Tensor:
    """[B, C, *] -> [B, C, L]; unlike reshape(B, C, -1) this also works for an empty t (B = 0 or a
    zero spatial size), which the kernels accept."""
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))


def _group_view(t: Tensor, group_size: int) -> Tensor:
    """[B, C, L] -> [G, g, C, L] with g = group_size examples per statistics group (B = G g)."""
    return t.reshape(t.shape[0] // group_size, group_size, t.shape[1], t.shape[2])


def arch_batch_norm(
    x: Tensor, arch: Tensor, weight: Tensor, bias: Tensor, group_size: int, eps: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training-mode architecture-conditional batch norm (NSA-id, seed 002; ghost batches, seed 004).

    Examples are split into G = B / group_size consecutive groups (group_size = B: one group, the
    whole batch, every architecture together). For group k, channel c, over its N = group_size * L
    values (L = prod of the spatial sizes):

        mean[k, c]   = sum x / N
        invstd[k, c] = 1 / sqrt(var[k, c] + eps),   var = biased variance (divide by N)
        y[b, c, l]   = (x[b, c, l] - mean[k(b), c]) * invstd[k(b), c] * weight[arch[b], c] + bias[arch[b], c]

    Also returns the per-example statistics that running averages are made of (the running-stat
    update itself is not part of the op): row_mean[b, c] = mean of x[b, c, :] over its L values and
    row_m2[b, c] = sum over l of (x[b, c, l] - row_mean[b, c])^2.

    Args:
        x: [B, C, *] (any number of spatial dims, including none).
        arch: [B] int64 in [0, S).
        weight, bias: [S, C], the dtype of x.
        group_size: examples per statistics group; divides B.
        eps: added to the variance.

    Returns:
        y [B, C, *] in x's dtype; mean, invstd [G, C] and row_mean, row_m2 [B, C] in the
        accumulation dtype (float32 for bfloat16/float16 inputs).
    """
    acc = _accumulation_dtype(x.dtype)
    B, C = x.shape[0], x.shape[1]
    xr = _bcl(x).to(acc)  # [B, C, L]
    row_mean = xr.mean(2)
    row_m2 = ((xr - row_mean.unsqueeze(2)) ** 2).sum(2)
    xg = _group_view(xr, group_size)  # [G, g, C, L]
    mean = xg.mean(dim=(1, 3))  # [G, C]
    var = xg.var(dim=(1, 3), unbiased=False)
    invstd = torch.rsqrt(var + eps)
    xhat = (xg - mean[:, None, :, None]) * invstd[:, None, :, None]
    scale = weight.to(acc)[arch].view(B, C, 1)
    shift = bias.to(acc)[arch].view(B, C, 1)
    y = xhat.reshape(xr.shape) * scale + shift  # [G, g, C, L] -> [B, C, L]
    return y.reshape(x.shape).to(x.dtype), mean, invstd, row_mean, row_m2


def arch_batch_norm_backward(
    grad_y: Tensor, x: Tensor, arch: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, group_size: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`arch_batch_norm`'s y to x, weight and bias.

    With xhat = (x - mean) invstd, dxhat = grad_y * weight[arch[b], c], and means over a group's N values:

        grad_x[b, c, l]  = invstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        grad_weight[s, c] = sum over examples b with arch[b] = s, and over l, of grad_y * xhat
        grad_bias[s, c]   = sum over the same of grad_y

    Shapes: grad_y and x [B, C, *]; mean, invstd [G, C]; returns [B, C, *], [S, C], [S, C].
    """
    acc = _accumulation_dtype(x.dtype)
    B, C = x.shape[0], x.shape[1]
    S = weight.shape[0]
    xg = _group_view(_bcl(x).to(acc), group_size)
    gg = _group_view(_bcl(grad_y).to(acc), group_size)
    xhat = (xg - mean[:, None, :, None]) * invstd[:, None, :, None]
    w = _group_view(weight.to(acc)[arch].view(B, C, 1), group_size)  # [G, g, C, 1]
    dxhat = gg * w
    grad_x = invstd[:, None, :, None] * (
        dxhat - dxhat.mean(dim=(1, 3), keepdim=True) - xhat * (dxhat * xhat).mean(dim=(1, 3), keepdim=True)
    )
    per_example_w = (gg * xhat).sum(3).reshape(B, C)
    per_example_b = gg.sum(3).reshape(B, C)
    grad_weight = torch.zeros(S, C, dtype=acc, device=x.device).index_add_(0, arch, per_example_w)
    grad_bias = torch.zeros(S, C, dtype=acc, device=x.device).index_add_(0, arch, per_example_b)
    return grad_x.reshape(x.shape).to(x.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


def arch_batch_norm_eval(
    x: Tensor, arch: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor, eps: float
) -> Tensor:
    """Eval-mode architecture-conditional batch norm with running statistics, shared ([C]) or per
    architecture ([S, C], row arch[b] for example b):

        y[b, c, l] = (x[b, c, l] - rm[b, c]) / sqrt(rv[b, c] + eps) * weight[arch[b], c] + bias[arch[b], c]
    """
    acc = _accumulation_dtype(x.dtype)
    B, C = x.shape[0], x.shape[1]
    rm = (running_mean[arch] if running_mean.dim() == 2 else running_mean.expand(B, C)).to(acc)
    rv = (running_var[arch] if running_var.dim() == 2 else running_var.expand(B, C)).to(acc)
    scale = torch.rsqrt(rv + eps) * weight.to(acc)[arch]
    shift = bias.to(acc)[arch] - rm * scale
    y = _bcl(x).to(acc) * scale.unsqueeze(2) + shift.unsqueeze(2)
    return y.reshape(x.shape).to(x.dtype)


def channel_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """y[b, c, l] = x[b, c, l] * scale[b, c] + shift[b, c]: one affine map per (example, channel).

    The eval mode of :func:`arch_batch_norm_eval` as an op: scale and shift ([B, C], accumulation
    dtype) come from the running statistics and the gathered affine parameters. x is [B, C, *].
    """
    acc = _accumulation_dtype(x.dtype)
    B, C = x.shape[0], x.shape[1]
    y = _bcl(x).to(acc) * scale.unsqueeze(2) + shift.unsqueeze(2)
    return y.reshape(x.shape).to(x.dtype)


def channel_affine_backward(grad_y: Tensor, x: Tensor, scale: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """grad_x = grad_y * scale[b, c]; grad_scale[b, c] = sum_l grad_y x; grad_shift[b, c] = sum_l grad_y."""
    acc = _accumulation_dtype(x.dtype)
    B, C = x.shape[0], x.shape[1]
    g = _bcl(grad_y).to(acc)
    grad_x = (g * scale.unsqueeze(2)).reshape(x.shape).to(x.dtype)
    return grad_x, (g * _bcl(x).to(acc)).sum(2), g.sum(2)


# ----------------------------------------------------------------------------------------------
# gumbel_sigmoid_dropout: concrete (Gumbel-sigmoid) dropout with a learnable drop probability
# ----------------------------------------------------------------------------------------------

PHILOX_ROUNDS = 10
_M32 = 0xFFFFFFFF
_PHILOX_MUL_A, _PHILOX_MUL_B = 0xD2511F53, 0xCD9E8D57  # multipliers of counter words 0 and 2
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85  # key increments (golden ratio, sqrt(3) - 1)

# Soft relaxation, straight-through (hard forward, soft gradient), hard (exact Bernoulli, no
# gradient through the sample): the int codes of the op schemas.
MODES = ("soft", "straight_through", "hard")


def _mulhilo32(multiplier: int, word: Tensor) -> Tuple[Tensor, Tensor]:
    """(high, low) 32-bit halves of multiplier * word, for words in [0, 2^32) held in int64.
    The word is split in 16-bit halves so that no product exceeds 2^48 (int64 cannot hold 2^64)."""
    low_product = (word & 0xFFFF) * multiplier  # < 2^48
    high_product = (word >> 16) * multiplier  # < 2^48; the full product is high * 2^16 + low
    high = (high_product + (low_product >> 16)) >> 16
    low = (low_product + ((high_product & 0xFFFF) << 16)) & _M32
    return high, low


def philox_bits(seed: int, offset: int, n: int, device=None) -> Tensor:
    """n pseudo-random 32-bit words from Philox-4x32-10 (Salmon et al. 2011), int64 [n] in [0, 2^32).

    Word i is output word (i mod 4) of the block cipher applied to the 128-bit counter
    (lo32(offset + i // 4), hi32(offset + i // 4), 0, 0) under the 64-bit key seed = (lo32, hi32).
    A call over n units uses ceil(n / 4) counters from offset; the public function draws a fresh
    (seed, offset) per call, so calls do not share counters.
    Ten rounds of: (c0, c1, c2, c3) <- (hi(B c2) ^ c1 ^ k0, lo(B c2), hi(A c0) ^ c3 ^ k1, lo(A c0)),
    then k0 += 0x9E3779B9, k1 += 0xBB67AE85 (mod 2^32). This is Random123's philox4x32 and Triton's
    ``tl.philox`` word for word, so every backend draws the same bits from the same (seed, offset).
    The noise made from them agrees across backends up to the rounding of each one's float32 log
    (a few ulp), so a hard mask can differ in the rare unit where lambda + L is that close to 0.
    A call over n units uses ceil(n / 4) counters from offset; the public function draws a fresh
    (seed, offset) per call.
    """
    counters = torch.arange((n + 3) // 4, dtype=torch.int64, device=device) + offset
    c0, c1 = counters & _M32, (counters >> 32) & _M32
    c2 = c3 = torch.zeros_like(counters)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(PHILOX_ROUNDS):
        high_b, low_b = _mulhilo32(_PHILOX_MUL_B, c2)
        high_a, low_a = _mulhilo32(_PHILOX_MUL_A, c0)
        c0, c1, c2, c3 = high_b ^ c1 ^ k0, low_b, high_a ^ c3 ^ k1, low_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return torch.stack((c0, c1, c2, c3), 1).reshape(-1)[:n]


def logistic_noise(bits: Tensor) -> Tensor:
    """Standard logistic noise from 32-bit words, float32: L = log(u / (1 - u)), u = (w + 1/2) / 2^32.

    Written as log(a / b) with a = float32(w) + 1/2 and b = float32(2^32 - 1 - w) + 1/2, so that u
    never rounds to 0 or 1: |L| <= log(2^33) = 22.9, finite at both ends of the range. The paper's
    log(-log r2) - log(-log r1) (eq. 16, read with the minus signs that make it defined) is the
    difference of two standard Gumbels, which is exactly this distribution.
    """
    a = bits.to(torch.float32) + 0.5
    b = (_M32 - bits).to(torch.float32) + 0.5
    return torch.log(a / b)


def _unit_noise(x: Tensor, seed_offset: Tensor, group_size: int, per_element: bool) -> Tensor:
    """Logistic noise for every mask unit of x [B, C, P], shaped to broadcast against it:
    [B, C, P] per element (unit index (b C + c) P + s); [B, C, 1] per group of channels, where the
    group_size channels of group g = c // group_size share the unit index b G + g."""
    seed, offset = (int(v) for v in seed_offset.tolist())
    B, C, P = x.shape
    if per_element:
        return logistic_noise(philox_bits(seed, offset, B * C * P, x.device)).reshape(B, C, P)
    G = C // group_size
    noise = logistic_noise(philox_bits(seed, offset, B * G, x.device)).reshape(B, G, 1)
    return noise.repeat_interleave(group_size, dim=1)


def gumbel_sigmoid_keep(
    x: Tensor, drop_logit: Tensor, seed_offset: Tensor, temperature: float, group_size: int, per_element: bool
) -> Tuple[Tensor, Tensor]:
    """(soft keep, hard keep) for x [B, C, P], in the accumulation dtype, differentiable in drop_logit.

    drop_logit [C / group_size] is lambda = log(p / (1 - p)) with p the DROP probability of each
    group of channels. With L the logistic noise of the unit (:func:`logistic_noise`):

        z    = (lambda + L) / temperature
        drop = sigmoid(z)            (eq. 16 of the paper: -> Bernoulli(p) as temperature -> 0)
        keep = 1 - drop = sigmoid(-z)
        hard = 1[lambda + L < 0]      (= 1[z < 0]: Bernoulli(1 - p) at any temperature, up to
                                       the float32 rounding of L)
    """
    acc = _accumulation_dtype(x.dtype)
    noise = _unit_noise(x, seed_offset, group_size, per_element).to(acc)
    logit = drop_logit.to(acc).repeat_interleave(group_size)[None, :, None]
    # hard from the sign of lambda + L, not of z: dividing by the temperature may round a tiny
    # negative sum to -0, and every backend computes this sum exactly the same way
    return torch.sigmoid(-(logit + noise) / temperature), (logit + noise < 0).to(acc)


def _scale(drop_logit: Tensor, group_size: int, rescale: bool, acc: torch.dtype) -> Tensor:
    """1 / (1 - p) = 1 + exp(lambda) per channel (rescale), else 1; shaped [1, C, 1]."""
    logit = drop_logit.to(acc).repeat_interleave(group_size)[None, :, None]
    return 1.0 + torch.exp(logit) if rescale else torch.ones_like(logit)


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
    """Concrete dropout (PGNAS eq. 16; Gal et al. 2017) on x [B, C, P]: y = x * keep * scale.

    keep is the soft relaxation (mode 0), the hard sample with the soft sample's gradient
    (straight-through, mode 1), or the hard sample alone (mode 2: exact Bernoulli(1 - p), no
    gradient through the sample). scale = 1 / (1 - p) with ``rescale`` (concrete dropout: E[y] = x
    in the hard limit), else 1 (PGNAS). The noise is keyed by seed_offset = (seed, offset), int64 [2]
    (:func:`philox_bits`); see :func:`gumbel_sigmoid_keep` for the units and the math. Autograd of
    this function is the reference for the gradients to x and drop_logit.
    """
    acc = _accumulation_dtype(x.dtype)
    soft, hard = gumbel_sigmoid_keep(x, drop_logit, seed_offset, temperature, group_size, per_element)
    if mode == 0:
        keep = soft
    elif mode == 1:
        keep = hard + (soft - soft.detach())  # exactly hard in the forward pass, soft's gradient
    else:
        keep = hard
    return (x.to(acc) * keep * _scale(drop_logit, group_size, rescale, acc)).to(x.dtype)


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
    """Explicit gradients of :func:`gumbel_sigmoid_dropout`, the noise regenerated from seed_offset.
    With s the soft keep, h the hard keep, r = 1 if rescale else 0, scale = 1 + r exp(lambda), and
    d scale / d lambda = scale * p * r:

        grad_x      = grad_y * k * scale,        k = s (soft) or h (straight-through, hard)
        grad_lambda = sum over the channels of the group and their units of
                      grad_y * x * scale * (k p r - t),   t = s (1 - s) / temperature (soft,
                      straight-through) or 0 (hard: the sample has no gradient)

    Returns (grad_x [B, C, P] in x's dtype, grad_drop_logit [C / group_size] in its dtype).
    """
    acc = _accumulation_dtype(x.dtype)
    soft, hard = gumbel_sigmoid_keep(x, drop_logit, seed_offset, temperature, group_size, per_element)
    keep = soft if mode == 0 else hard
    scale = _scale(drop_logit, group_size, rescale, acc)
    p = torch.sigmoid(drop_logit.to(acc)).repeat_interleave(group_size)[None, :, None]
    slope = soft * (1 - soft) / temperature if mode != 2 else torch.zeros_like(soft)
    g, xa = grad_y.to(acc), x.to(acc)
    grad_x = g * keep * scale
    per_channel = (g * xa * scale * (keep * p * float(rescale) - slope)).sum((0, 2))  # [C]
    grad_logit = per_channel.reshape(-1, group_size).sum(1)
    return grad_x.to(x.dtype), grad_logit.to(drop_logit.dtype)


# ----------------------------------------------------------------------------------------------
# unfolded_gram: per-filter Gauss-Newton (GGN) blocks of a Conv2d / Linear layer (BayesNAS)
# ----------------------------------------------------------------------------------------------


def unfolded_gram(
    x: Tensor,
    factors: Tensor,
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    groups: int,
    bias: bool,
    diagonal: bool = False,
) -> Tensor:
    """Per-output-channel GGN blocks of a Conv2d layer from its input and back-propagated factors.

    The layer computes z = conv2d(x, W, b) with W [C_out, C_in / groups, kh, kw]. Let X_n [P, D] be
    the im2col unfolding of x[n] restricted to the C_in / groups input channels of o's group
    (P = Ho * Wo output positions, D = C_in / groups * kh * kw in the order of W[o].flatten():
    channel, then kernel row, then kernel column). The factors S[n, k] = d(v_{n,k}^T f_n) / dz_n are
    the square-root factors of the loss Hessian back-propagated to the layer output. Then

        j[n, k, o, d] = sum_p S[n, k, o, p] * X_n[p, d]         (d < D)
        j[n, k, o, D] = sum_p S[n, k, o, p]                      (only with ``bias``)
        G[o]          = sum_n sum_k j[n, k, o] j[n, k, o]^T

    G[o] is the Gauss-Newton matrix J^T H J of the loss restricted to filter o's parameters
    (W[o].flatten(), then b[o]) whenever sum_k v_{n,k} v_{n,k}^T is the Hessian H_n of the loss wrt
    the network output f_n (exactly, or in expectation for Monte-Carlo factors). A Linear layer is
    the case H = W = kh = kw = 1.

    This is the straightforward unfold + einsum reference: the whole input is unfolded once (its
    columns for group g are the contiguous rows g * D .. (g + 1) * D - 1 of the unfolding), then
    contracted with the factors to j, then j with itself to G.

    Args:
        x: [N, C_in, H, W] the layer input (or [N, C_in] for a Linear layer).
        factors: [N, K, C_out, Ho, Wo] (or [N, K, C_out] for a Linear layer).
        kernel_size, stride, padding, dilation: (int, int) as in Conv2d.
        groups: the convolution's groups (divides C_in and C_out).
        bias: whether the layer has a bias (adds the last coordinate of each block).
        diagonal: return only the diagonals, sum_n sum_k j[n, k, o]^2 ([C_out, D']): the exact
            diagonal GGN (BackPACK's DiagGGNExact) without the Gram products.

    Returns:
        G [C_out, D', D'] (or its diagonals [C_out, D']) with D' = D + bias, in the accumulation
        dtype (float32 for bfloat16/float16 inputs, else the dtype of x).
    """
    acc = _accumulation_dtype(x.dtype)
    if x.dim() == 2:  # Linear: a 1x1 convolution of a 1x1 image
        x = x[:, :, None, None]
        factors = factors[..., None, None]
    N, K, C_out = factors.shape[0], factors.shape[1], factors.shape[2]
    if 0 in x.shape[1:]:
        # F.unfold rejects an empty channel or spatial dimension; the unfolding is then all zeros
        # (no channels, or only padding) over the P positions the factors have.
        P = math.prod(factors.shape[3:])
        cols = torch.zeros(N, x.shape[1] * kernel_size[0] * kernel_size[1], P, dtype=acc, device=x.device)
    else:
        cols = torch.nn.functional.unfold(
            x.to(acc), kernel_size, dilation=dilation, padding=padding, stride=stride
        )  # [N, C_in * kh * kw, P]
    cols = cols.reshape(N, groups, cols.shape[1] // groups, cols.shape[2])  # [N, G, D, P]
    s = factors.to(acc).reshape(N, K, groups, C_out // groups, cols.shape[3])  # [N, K, G, C_out/G, P]
    j = torch.einsum("nkgop,ngdp->nkgod", s, cols)
    if bias:
        j = torch.cat((j, s.sum(4, keepdim=True)), dim=4)  # [N, K, G, C_out/G, D + 1]
    if diagonal:
        return j.square().sum((0, 1)).reshape(C_out, j.shape[4])
    gram = torch.einsum("nkgod,nkgoe->gode", j, j)
    return gram.reshape(C_out, j.shape[4], j.shape[4])


# ----------------------------------------------------------------------------------------------
# rank_one: factors of rank one per (example, output channel), back-propagated through a convolution
# ----------------------------------------------------------------------------------------------


def rank_one_split(factors: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Splits factors S [K, N, C_out, Ho, Wo] that have rank one per (example n, channel o) into
    S[k, n, o] = coeffs[k, n, o] maps[n, o].

    For each (n, o), maps[n, o] is the factor k of largest norm sum_p S[k, n, o, p]^2 (the first
    such k on ties; 0 when every factor is 0) and coeffs[k, n, o] = <S[k, n, o], w> / <w, w> with
    w = maps[n, o]. The split holds (``ok``) when every factor's residual S[k, n, o] - c w has a
    norm of at most 16 epsilon (of the dtype) times its own, for every (k, n, o), and every entry
    is finite. The test is computed on each (n, o)'s factors scaled by a power of two to a largest
    magnitude in [1/2, 1), so that tiny factors do not underflow when squared. One exception: a
    factor below about 2^-75 (float32; 2^-537 in float64) of the largest one of its (n, o) squares
    to 0 even then, and passes whatever its direction; its contribution to a Gram product, 2^-149
    of the largest factor's or less, is below the dtype's resolution.

    Returns:
        (coeffs [K, N, C_out], maps [N, C_out, Ho, Wo], ok [] bool), in the dtype of ``factors``;
        coeffs and maps are all zeros when ``ok`` is False.
    """
    K, N, O, Ho, Wo = factors.shape
    S = factors.reshape(K, N, O, Ho * Wo)
    tol = 16 * torch.finfo(factors.dtype).eps
    largest = S.abs().amax((0, 3)) if S.numel() else torch.zeros(N, O, dtype=S.dtype, device=S.device)  # [N, O]
    finite = torch.isfinite(S).all()
    exponent = torch.frexp(torch.where(torch.isfinite(largest), largest, 0))[1]  # [N, O]
    # 2^-exponent in two steps: a single power overflows for subnormal float64 factors
    half = torch.div(-exponent, 2, rounding_mode="floor")
    step = lambda e: torch.exp2(e.to(S.dtype))[None, :, :, None]  # noqa: E731
    scaled = S * step(half) * step(-exponent - half)
    norms = scaled.square().sum(-1)  # [K, N, O]
    best = norms.argmax(0, keepdim=True) if K else torch.zeros(1, N, O, dtype=torch.long, device=S.device)
    w = scaled.gather(0, best[..., None].expand(1, N, O, S.shape[3])) if K else torch.zeros(
        1, N, O, S.shape[3], dtype=S.dtype, device=S.device)  # [1, N, O, P]
    ww = norms.gather(0, best) if K else torch.ones(1, N, O, dtype=S.dtype, device=S.device)
    coeffs = torch.where(ww > 0, (scaled * w).sum(-1) / torch.where(ww > 0, ww, 1), 0)  # [K, N, O]
    residual = (scaled - coeffs[..., None] * w).square().sum(-1)
    ok = finite & (residual <= tol * tol * norms).all()  # a tensor: no host synchronisation
    maps = S.gather(0, best[..., None].expand(1, N, O, S.shape[3]))[0].reshape(N, O, *factors.shape[3:]) if K else (
        torch.zeros(N, O, *factors.shape[3:], dtype=S.dtype, device=S.device))
    return torch.where(ok, coeffs, 0), torch.where(ok, maps, 0), ok


def rank_one_conv_input_grad(
    coeffs: Tensor,
    maps: Tensor,
    weight: Tensor,
    input_size: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    groups: int,
) -> Tensor:
    """The gradients E [K, N, C_in, H, W] at the input of a Conv2d (weight [C_out, C_in / groups,
    kh, kw], input size (H, W); stride, padding, dilation, groups as in Conv2d) for the K N output
    gradients S[k, n, o] = coeffs[k, n, o] maps[n, o] (coeffs [K, N, C_out], maps [N, C_out, Ho, Wo]):

        E[k, n] = conv2d_input(S[k, n]) = sum_o coeffs[k, n, o] (maps[n, o] transposed-convolved with W[o])

    Here: the factors expanded to [K N, C_out, Ho, Wo] and ``torch.nn.grad.conv2d_input``.
    """
    K, N, O = coeffs.shape
    H, W = input_size
    C = weight.shape[1] * groups
    if O == 0:  # no output channels to sum over (ATen's transposed convolution refuses an empty weight)
        return torch.zeros(K, N, C, H, W, dtype=coeffs.dtype, device=coeffs.device)
    full = (coeffs[..., None, None] * maps).reshape(K * N, O, *maps.shape[2:])
    E = torch.nn.grad.conv2d_input((K * N, C, H, W), weight, full, stride, padding, dilation, groups)
    return E.reshape(K, N, C, H, W)


def softmax_ce_hessian_factors(logits: Tensor, mode: str = "exact", generator=None, minimal: bool = False) -> Tensor:
    """Square-root factors v [N, K, C] of the softmax cross-entropy Hessian wrt the logits.

    The loss is the SUM over the batch of the per-example losses L = sum_n -log softmax(f_n)[y_n],
    so the Hessian wrt f_n is H_n = diag(p_n) - p_n p_n^T with p_n = softmax(f_n), independent of
    the labels. (For the batch MEAN, H_n and the GGN are divided by N: scale v by 1 / sqrt(N).)

    * ``mode="exact"``: K = C, v[n, k] = sqrt(p_{n,k}) (e_k - p_n), so that
      sum_k v[n, k] v[n, k]^T = diag(p_n) - p_n p_n^T exactly.
    * ``mode="exact"`` with ``minimal``: K = C - 1, the fewest factors there can be (H_n has rank
      C - 1: H_n 1 = 0). With q = sqrt(p_n) (a unit vector), H_n = D (I - q q^T) D, D =
      diag(q), and I - q q^T = B B^T for any orthonormal basis B [C, C - 1] of the complement of q.
      B is the columns i != j of the Householder reflection Q = I - 2 u u^T / (u^T u) with
      u = q + e_j, j = argmax q (Q q = -e_j; adding, not subtracting, e_j avoids cancellation),
      and v[n, i] = D B[:, i]. Every later step (the backward pass, the Gram products) then does
      (C - 1) / C of the work.
    * ``mode="mc"``: K = 1, v[n, 0] = e_y - p_n for a label y drawn from p_n
      (``torch.multinomial`` with ``generator``). E[(e_y - p)(e_y - p)^T] = diag(p) - 2 p p^T + p p^T
      = H_n, so the Gauss-Newton blocks built from these factors are unbiased.

    Args:
        logits: [N, C].
        mode: "exact" or "mc".
        generator: the torch.Generator of the Monte-Carlo draw (None: the default generator).
        minimal: C - 1 exact factors instead of C (needs C >= 2; no effect on "mc").

    Returns:
        [N, C, C] (exact), [N, C - 1, C] (exact, minimal) or [N, 1, C] (mc), in the dtype of
        ``logits`` (computed in the accumulation dtype).
    """
    acc = _accumulation_dtype(logits.dtype)
    p = torch.softmax(logits.to(acc), dim=-1)  # [N, C]
    C = p.shape[1]
    if mode == "exact" and minimal and C >= 2:
        q = p.sqrt()
        j = q.argmax(1, keepdim=True)  # [N, 1]
        u = q.scatter_add(1, j, torch.ones_like(j, dtype=acc))  # q + e_j; u^T u = 2 (1 + q_j) >= 2
        reflection = torch.eye(C, dtype=acc, device=p.device) - (2 / (u * u).sum(1))[:, None, None] * u[:, :, None] * u[:, None, :]
        keep = torch.ones_like(p, dtype=torch.bool).scatter_(1, j, False)  # the columns i != j
        basis = reflection.transpose(1, 2)[keep].reshape(p.shape[0], C - 1, C)  # row i: column i of Q
        v = basis * q[:, None, :]  # v[n, i, c] = q_c Q[c, i]
    elif mode == "exact":
        eye = torch.eye(p.shape[1], dtype=acc, device=p.device)
        v = p.sqrt().unsqueeze(2) * (eye - p.unsqueeze(1))  # v[n, k, c] = sqrt(p_k) (1[k = c] - p_c)
    else:
        y = torch.multinomial(p, 1, generator=generator)  # [N, 1]
        v = (torch.zeros_like(p).scatter_(1, y, 1.0) - p).unsqueeze(1)
    return v.to(logits.dtype)
