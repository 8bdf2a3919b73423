"""Concrete (Gumbel-sigmoid) dropout with a learnable drop probability:
``torch.ops.bnas_fast.gumbel_sigmoid_dropout``.

PGNAS (seed 001, eq. 16) relaxes the Bernoulli variable that switches a kernel slice on or off:

    eps = sigmoid((log p - log(1 - p) + log(-log r2) - log(-log r1)) / tau),   r1, r2 ~ U(0, 1)

(the extracted text drops the minus signs inside the logs, without which they are undefined).

**Which probability p is.** Eq. 15's weight term (l^2 (1 - p) / 2N) ||m||^2 is Gal's KL for a
dropout layer whose units are *kept* with probability 1 - p: the squared norm of the weights a
unit gates counts only when the unit is on. The text agrees ("convolution kernels are randomly
deactivated w.r.t. probability p"), and so does eq. 16: as tau -> 0, eps -> 1 with probability p,
so eps as written is the relaxed *drop* indicator. Eq. 13 writes eps ~ Bernoulli(p) as the factor
of the kernel, which would make p a keep rate; that reading contradicts eq. 15 and the text, and we
take p to be the **drop probability** throughout. Everything here is parameterised by
lambda = log(p / (1 - p)), the logit of the drop probability, and multiplies x by the relaxed keep
variable 1 - eps = sigmoid(-(lambda + L) / tau), L = log(-log r2) - log(-log r1) ~ Logistic(0, 1).
:func:`bnas_fast.reference.gumbel_sigmoid_keep` has the math; :mod:`bnas_fast.reference` draws L
from one 32-bit Philox word per unit (the same distribution as the two uniforms of eq. 16).

The noise is never stored: it is a function of a (seed, offset) pair, drawn from torch's generator
(so ``torch.manual_seed`` controls it) and saved for backward as two integers, and of the unit's
index. Every backend (reference, C++, Triton) draws the same Philox bits for the same pair.

Schema, fake kernels, autograd and backend registration live here, as for every op.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from bnas_fast import _backend, _checks, reference
from bnas_fast.ops._library import LIB, refuse_second_derivative

__all__ = ["gumbel_sigmoid_dropout", "GRANULARITIES", "MODES", "draw_seed_offset"]

GRANULARITIES = ("element", "channel", "group")
MODES = reference.MODES  # ("soft", "straight_through", "hard"), the schema's int codes 0, 1, 2

_ARGS = "Tensor x, Tensor drop_logit, Tensor seed_offset, float temperature, int group_size, bool per_element, bool rescale, int mode"
LIB.define(f"gumbel_sigmoid_dropout({_ARGS}) -> Tensor")
LIB.define(f"gumbel_sigmoid_dropout_backward(Tensor grad_y, {_ARGS}) -> (Tensor, Tensor)")
# For tests: the backend's logistic noise of given 32-bit words (int64 [n] in [0, 2^32)), float32.
LIB.define("logistic_noise_of_words(Tensor words) -> Tensor")


@torch.library.register_fake("bnas_fast::gumbel_sigmoid_dropout")
def _fake(x, drop_logit, seed_offset, temperature, group_size, per_element, rescale, mode):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("bnas_fast::gumbel_sigmoid_dropout_backward")
def _backward_fake(grad_y, x, drop_logit, seed_offset, temperature, group_size, per_element, rescale, mode):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(drop_logit)


@torch.library.register_fake("bnas_fast::logistic_noise_of_words")
def _noise_fake(words):
    return torch.empty(words.shape, dtype=torch.float32, device=words.device)


def _setup_context(ctx, inputs, output):
    x, drop_logit, seed_offset, *config = inputs
    ctx.config = config
    # The noise is not saved: two integers regenerate it. x is needed for the gradient to lambda.
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, drop_logit, seed_offset)


def _backward_formula(ctx, grad_y):
    x, drop_logit, seed_offset = ctx.saved_tensors
    sources = (grad_y, x, drop_logit)
    if x is None:  # no gradient to lambda wanted: grad_x does not depend on x, any tensor of its shape will do
        x = grad_y
    with torch.no_grad():
        grad_x, grad_logit = torch.ops.bnas_fast.gumbel_sigmoid_dropout_backward(grad_y, x, drop_logit, seed_offset, *ctx.config)
    # No second derivative: the backward op has no autograd formula of its own, and gradients taken
    # with create_graph=True silently differentiated to zero (a review of 2026-12-02 found it).
    grad_x, grad_logit = refuse_second_derivative("gumbel_sigmoid_dropout", (grad_x, grad_logit), sources)
    return (
        grad_x if ctx.needs_input_grad[0] else None,
        grad_logit if ctx.needs_input_grad[1] else None,
        None, None, None, None, None, None,
    )


torch.library.register_autograd("bnas_fast::gumbel_sigmoid_dropout", _backward_formula, setup_context=_setup_context)


def _triton_kernel(x, drop_logit, seed_offset, temperature, group_size, per_element, rescale, mode):
    from bnas_fast.triton import gumbel_sigmoid_dropout as triton_gsd

    return triton_gsd.gumbel_sigmoid_dropout(x, drop_logit, seed_offset, temperature, group_size, per_element, rescale, mode)


def _triton_backward_kernel(grad_y, x, drop_logit, seed_offset, temperature, group_size, per_element, rescale, mode):
    from bnas_fast.triton import gumbel_sigmoid_dropout as triton_gsd

    return triton_gsd.gumbel_sigmoid_dropout_backward(
        grad_y, x, drop_logit, seed_offset, temperature, group_size, per_element, rescale, mode
    )


def _triton_noise_kernel(words):
    from bnas_fast.triton import gumbel_sigmoid_dropout as triton_gsd

    return triton_gsd.logistic_noise(words)


_KERNELS = {
    "reference": {
        "gumbel_sigmoid_dropout": reference.gumbel_sigmoid_dropout,
        "gumbel_sigmoid_dropout_backward": reference.gumbel_sigmoid_dropout_backward,
        "logistic_noise_of_words": reference.logistic_noise,
    },
    "triton": {
        "gumbel_sigmoid_dropout": _triton_kernel,
        "gumbel_sigmoid_dropout_backward": _triton_backward_kernel,
        "logistic_noise_of_words": _triton_noise_kernel,
    },
}
for _device, _backend_name in _backend.backends().items():
    if _backend_name in _KERNELS:  # "cpp" registered itself from C++
        for _name, _fn in _KERNELS[_backend_name].items():
            LIB.impl(_name, _fn, _device.upper())


def _check_generator(generator: object, op: str) -> None:
    """generator: None or a CPU torch.Generator (the pair is drawn on the CPU, whatever x's device).
    Checked up front: torch.randint would otherwise dump its whole signature."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be None or a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(
            f"{op}: generator must be a CPU torch.Generator (the (seed, offset) pair is drawn on the CPU), "
            f"got one on {generator.device}"
        )


def draw_seed_offset(generator: Optional[torch.Generator] = None) -> Tensor:
    """A fresh (seed, offset) pair, CPU int64 [2], from ``generator`` (default: torch's global CPU
    generator, so ``torch.manual_seed`` makes the masks reproducible)."""
    _check_generator(generator, "draw_seed_offset")
    return torch.randint(0, 2**62, (2,), generator=generator, dtype=torch.int64)


#: The smallest temperature accepted: the kernels multiply by 1 / temperature in float32, which
#: overflows below about 2.9e-39 (and a gradient then turns into 0 * inf = NaN).
MIN_TEMPERATURE = 1e-30


def _check_temperature(temperature: object, op: str) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{op}: temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature >= MIN_TEMPERATURE):
        raise ValueError(
            f"{op}: temperature must be a finite number >= {MIN_TEMPERATURE:g} (1 / temperature must stay finite "
            f"in float32 for the backward's slope), got {temperature!r}"
        )
    return float(temperature)


def gumbel_sigmoid_dropout(
    x: Tensor,
    drop_logit: Tensor,
    temperature: float = 0.2,
    *,
    granularity: str = "element",
    group_size: Optional[int] = None,
    rescale: bool = True,
    mode: str = "soft",
    training: bool = True,
    seed_offset: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Concrete dropout with learnable drop probabilities: ``y = x * keep * scale``.

    lambda = ``drop_logit`` is the logit of the DROP probability p = sigmoid(lambda) (module
    docstring). Per mask unit, with L ~ Logistic(0, 1) from a counter-based generator,
    keep = sigmoid(-(lambda + L) / temperature) (``mode="soft"``); the hard sample
    1[lambda + L < 0] ~ Bernoulli(1 - p) with the soft sample's gradient (``"straight_through"``);
    or the hard sample alone, no gradient through it (``"hard"``, for sampling architectures).
    scale = 1 / (1 - p) when ``rescale`` (concrete dropout: E[y] = x in the hard limit), else 1
    (PGNAS). In eval mode (``training=False``) the output is the expectation of the hard sample,
    x (1 - p) scale, deterministic.

    Args:
        x: [B, C, *] floating (float32, float64, bfloat16, float16; low precision computes in
            float32).
        drop_logit: the logits, same dtype as x: [C] (or [1], shared) for "element" and "channel";
            [C / group_size] (or [1]) for "group". Gradients flow to it (and to x).
        temperature: tau > 0 (PGNAS uses 0.2; Gal et al. 0.1).
        granularity: the mask unit. "element": every element of x has its own noise, channel c
            its own p; "channel": one mask per (example, channel), over all of x[b, c] (a
            convolution's kernels sliced per input channel, as PGNAS drops them); "group": one
            mask and one p per (example, group of ``group_size`` consecutive channels), e.g. one
            path of a multi-branch block.
        group_size: channels per group ("group" only; must divide C).
        rescale: multiply by 1 / (1 - p).
        mode: "soft", "straight_through" or "hard".
        training: False gives the deterministic expectation.
        seed_offset: int64 [2] (seed, offset) of the noise; default: drawn with
            :func:`draw_seed_offset` from ``generator``. The same pair gives the same masks on
            every backend.

    Returns:
        y with x's shape and dtype.
    """
    op = "gumbel_sigmoid_dropout"
    _checks.check_tensor("x", x, op)
    _checks.check_bool("training", training, op)
    _checks.check_tensor("drop_logit", drop_logit, op)
    _checks.check_floating("x", x, op)
    _checks.check_floating("drop_logit", drop_logit, op)
    _checks.check_same_dtype("drop_logit", drop_logit, "x", x, op)
    _checks.check_same_device("drop_logit", drop_logit, "x", x, op)
    if x.dim() < 2:
        raise ValueError(f"{op}: x must have shape [B, C, *] (at least 2 dimensions), got {tuple(x.shape)}")
    temperature = _check_temperature(temperature, op)
    _check_generator(generator, op)  # also when unused (eval mode, seed_offset given): a bad one is a bug
    if granularity not in GRANULARITIES:
        raise ValueError(f"{op}: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if mode not in MODES:
        raise ValueError(f"{op}: mode must be one of {MODES}, got {mode!r}")
    C = x.shape[1]
    if granularity == "group":
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"{op}: granularity 'group' needs group_size, a positive int, got {group_size!r}")
        if C % group_size:
            raise ValueError(f"{op}: group_size = {group_size} does not divide the C = {C} channels of x")
    elif group_size not in (None, 1):
        raise ValueError(f"{op}: group_size is for granularity 'group' only, got group_size = {group_size!r} with {granularity!r}")
    else:
        group_size = 1
    num_groups = C // group_size
    table = drop_logit.reshape(-1) if drop_logit.dim() <= 1 else drop_logit
    if table.dim() != 1 or table.shape[0] not in (1, num_groups):
        what = f"C / group_size = {num_groups} groups" if granularity == "group" else f"C = {C} channels"
        raise ValueError(f"{op}: drop_logit must have shape [{num_groups}] (one logit per {what}) or [1], got {tuple(drop_logit.shape)}")
    if not torch.compiler.is_compiling():  # reads the small table; skipped under torch.compile (a value check breaks the graph)
        if bool(torch.isnan(table).any()) or bool(torch.isinf(table).any()):
            raise ValueError(
                f"{op}: drop_logit holds NaN or infinity: the drop probability p = sigmoid(drop_logit) must lie in (0, 1)"
            )
        if rescale:
            # 1 / (1 - p) = 1 + exp(lambda) must stay finite in the compute dtype (float32 for
            # float16/bfloat16): beyond, p rounds to 1 there and a dropped unit would give 0 * inf.
            compute = torch.float64 if x.dtype == torch.float64 else torch.float32
            limit = math.log(torch.finfo(compute).max) - 1.0
            if bool((table > limit).any()):
                raise ValueError(
                    f"{op}: drop_logit holds {float(table.max()):.4g}: with rescale, 1 / (1 - p) = 1 + exp(drop_logit) "
                    f"overflows {compute} above {limit:.4g} (p is 1 to that precision; the drop probability must be below 1)"
                )
    table = table.expand(num_groups)
    if not training:
        # E[keep] * scale per channel, worked out in the compute dtype (float32 for float16 and
        # bfloat16: 1 + exp(drop_logit) overflows float16 above drop_logit = 11) and rounded once.
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        table_c = table.to(compute)
        keep = torch.sigmoid(-table_c)
        factor = keep * (1.0 + torch.exp(table_c)) if rescale else keep
        factor = factor.repeat_interleave(group_size).to(x.dtype)
        return x * factor.reshape((1, C) + (1,) * (x.dim() - 2))
    if seed_offset is None:
        seed_offset = draw_seed_offset(generator)
    else:
        _checks.check_tensor("seed_offset", seed_offset, op)
        if seed_offset.dtype != torch.int64 or seed_offset.shape != (2,) or seed_offset.device.type != "cpu":
            raise TypeError(
                f"{op}: seed_offset must be a CPU int64 tensor of shape [2] (seed, offset), got "
                f"{seed_offset.dtype} {tuple(seed_offset.shape)} on {seed_offset.device}"
            )
        if not torch.compiler.is_compiling() and bool((seed_offset < 0).any()):
            raise ValueError(f"{op}: seed_offset must be non-negative, got {seed_offset.tolist()}")
    rows = x.reshape(x.shape[0], C, -1) if x.numel() else x.reshape(x.shape[0], C, math.prod(x.shape[2:]))
    y = torch.ops.bnas_fast.gumbel_sigmoid_dropout(
        rows, table, seed_offset, temperature, group_size, granularity == "element", bool(rescale), MODES.index(mode)
    )
    return y.reshape(x.shape)
