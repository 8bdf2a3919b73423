"""Concrete (Gumbel-sigmoid) dropout with learnable drop rates, and the regulariser of PGNAS eq. 15.

    drop = GumbelSigmoidDropout(64, init_drop=0.1)              # one drop rate per channel
    layer = InputDropoutConv2d(nn.Conv2d(64, 128, 3, padding=1), init_drop=0.1)
    loss = F.cross_entropy(model(x), y) + layer.regularizer(length_scale=1e-2, num_data=N)

The parameter is the logit of the DROP probability p (see :mod:`bnas_fast.ops.gumbel_sigmoid_dropout`
for why eq. 16 of the paper is read that way); :attr:`GumbelSigmoidDropout.drop_rate` is p.

**The regulariser (eq. 15) and its scaling for convolutions.** Gal and Ghahramani's KL for a layer
whose input unit u is kept with probability 1 - p_u, its weights m_u (the weights that multiply
that unit) under a N(0, 1 / l^2) prior, is, per training example (divided by N):

    R = sum_u [ l^2 (1 - p_u) / (2 N) ||m_u||^2  -  H(p_u) / N ],
    H(p) = -p log p - (1 - p) log(1 - p)

The sum runs over the *mask units of one example*, because the variational distribution is over
weights: a unit that is dropped zeroes a set of weights. For a convolution whose input channels are
dropped (one mask per example and input channel, as PGNAS drops kernels sliced per input channel):

* the unit is input channel c and m_c = W[:, c, :, :], all C_out kh kw weights that read channel c
  (a grouped convolution: the C_out / groups filters of c's group); the spatial positions share
  those weights, so ||m_c||^2 is counted once, not once per position;
* the entropy is counted once per input channel: C_in H(p) for a shared p (PGNAS's k^s_l, "the
  number of input channels"), not C_in H W H(p) as a dense layer over the flattened input would
  count it. This per-position count is the known mistake of applying the dense concrete-dropout
  regulariser to convolutions;
* one mask per group of channels (a path of a multi-branch block) is one unit: ||m_g||^2 sums the
  weights of all the group's channels, and H(p_g) is counted once per group.

With ``rescale`` the layer sees x / (1 - p), i.e. its effective weights are W / (1 - p), so the
weight term becomes l^2 ||W||^2 / (2 N (1 - p)) (Gal et al.'s concrete-dropout code); PGNAS does not
rescale, giving l^2 (1 - p) ||W||^2 / (2 N). The paper prints only the p log p half of the entropy;
the KL of a Bernoulli gives both halves, and we keep both.

Per-element dropout on a convolution's input has no such weight-space reading (each position would
need its own weights), so the regulariser supports "channel" and "group" for convolutions and
"element" or "channel" (the same thing) for linear layers.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from bnas_fast import _checks
from bnas_fast.ops.gumbel_sigmoid_dropout import GRANULARITIES, MODES, _check_temperature, gumbel_sigmoid_dropout

__all__ = ["GumbelSigmoidDropout", "InputDropoutConv2d", "concrete_dropout_regularizer"]


def _check_probability(name: str, value: object, owner: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value < 1.0):
        raise ValueError(f"{owner}: {name} must be a drop probability in (0, 1), got {value!r}")
    return float(value)


class GumbelSigmoidDropout(nn.Module):
    """Concrete dropout with a learnable drop rate per channel or group of channels.

    Args:
        shape: number of drop rates: C (one per channel), C / group_size (one per group), or 1
            (shared by every channel).
        init_drop: initial drop probability p in (0, 1).
        temperature: tau > 0 of the relaxation.
        granularity: "element", "channel" or "group" (:func:`bnas_fast.gumbel_sigmoid_dropout`).
        group_size: channels per group (granularity "group").
        rescale: multiply by 1 / (1 - p) (concrete dropout) or not (PGNAS).
        mode: "soft", "straight_through" or "hard" in training.

    Input [B, C, *]; output of the same shape. In eval mode the output is the deterministic
    expectation x (1 - p) scale. :meth:`sample_keep` draws a hard keep mask (an architecture), and
    :attr:`fixed_keep` ([C], or [C / group_size] for "group"), when set, replaces the random mask
    by that one for every example, in training and eval. It is a buffer: it moves with the module
    (``.to``, ``.double()``) and is saved in the state_dict when set, so a sampled architecture
    survives saving and loading (a state_dict without it loads as no fixed mask).
    """

    def __init__(
        self,
        shape: Union[int, Sequence[int]],
        init_drop: float = 0.1,
        temperature: float = 0.2,
        granularity: str = "channel",
        group_size: Optional[int] = None,
        rescale: bool = True,
        mode: str = "soft",
    ):
        super().__init__()
        owner = "GumbelSigmoidDropout"
        size = shape if isinstance(shape, int) else math.prod(shape)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{owner}: shape must give at least one drop rate, got {shape!r}")
        p = _check_probability("init_drop", init_drop, owner)
        _check_temperature(temperature, owner)
        if granularity not in GRANULARITIES:
            raise ValueError(f"{owner}: granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if mode not in MODES:
            raise ValueError(f"{owner}: mode must be one of {MODES}, got {mode!r}")
        # checked here too: the fixed_keep path and sample_keep divide by it before the functional sees it
        if granularity == "group" and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
            raise ValueError(f"{owner}: granularity 'group' needs group_size, a positive int, got {group_size!r}")
        self.temperature, self.granularity, self.group_size = float(temperature), granularity, group_size
        self.rescale, self.mode = bool(rescale), mode
        self.drop_logit = nn.Parameter(torch.full((size,), math.log(p) - math.log1p(-p)))
        self.register_buffer("fixed_keep", None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A None buffer is neither saved nor loaded: make room for a saved mask (or clear ours when
        # the state has none), so that loading restores exactly the saved architecture.
        saved = state_dict.get(prefix + "fixed_keep")
        self.fixed_keep = None if saved is None else torch.empty_like(saved, device=self.drop_logit.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    @property
    def drop_rate(self) -> Tensor:
        """p = sigmoid(drop_logit), [shape]."""
        return torch.sigmoid(self.drop_logit)

    def _unit_channels(self) -> int:
        """Channels per mask unit: group_size for "group", else 1 (a fixed mask is per channel)."""
        return self.group_size if self.granularity == "group" else 1

    def sample_keep(self, channels: int, generator: Optional[torch.Generator] = None, drop_rate: Optional[float] = None) -> Tensor:
        """A hard keep mask for an input of ``channels`` channels, one entry per channel (per group
        for "group"), keep ~ Bernoulli(1 - p) with the learned p (or ``drop_rate``): float 0 / 1."""
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 0 or channels % self._unit_channels():
            raise ValueError(f"GumbelSigmoidDropout.sample_keep: channels must be an int >= 0 and a multiple of "
                             f"{self._unit_channels()}, got {channels!r}")
        if drop_rate is not None and (isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float))
                                      or not 0.0 <= drop_rate <= 1.0):  # also false for NaN
            raise ValueError(f"GumbelSigmoidDropout.sample_keep: drop_rate must be a number in [0, 1], got {drop_rate!r}")
        units = channels // self._unit_channels()
        with torch.no_grad():
            p = torch.sigmoid(self.drop_logit.double()).expand(units) if drop_rate is None else torch.full((units,), float(drop_rate), dtype=torch.float64)
            u = torch.rand(units, generator=generator, dtype=torch.float64)
            return (u >= p).to(self.drop_logit.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.fixed_keep is not None:
            # A sampled architecture: the same mask for every example, scaled as in training.
            _checks.check_tensor("x", x, "GumbelSigmoidDropout")
            if x.dim() < 2:
                raise ValueError(f"GumbelSigmoidDropout: x must have shape [B, C, *] (at least 2 dimensions), got {tuple(x.shape)}")
            if x.shape[1] % self._unit_channels():  # else the mask repeated per group would not fit x
                raise ValueError(f"GumbelSigmoidDropout: group_size = {self.group_size} does not divide the "
                                 f"C = {x.shape[1]} channels of x")
            units = x.shape[1] // self._unit_channels()
            if self.fixed_keep.shape != (units,):
                raise ValueError(f"GumbelSigmoidDropout: fixed_keep must be [{units}] for an input of {x.shape[1]} channels, got {tuple(self.fixed_keep.shape)}")
            if self.drop_logit.shape[0] not in (1, units):  # as the functional checks on the random path
                raise ValueError(f"GumbelSigmoidDropout: the {self.drop_logit.shape[0]} drop rates do not fit an input of "
                                 f"{x.shape[1]} channels ({units} mask units)")
            if not bool(((self.fixed_keep == 0) | (self.fixed_keep == 1)).all()):
                raise ValueError("GumbelSigmoidDropout: fixed_keep must hold only 0 and 1 (a hard keep mask), got "
                                 f"{self.fixed_keep.tolist()}")
            # in the compute dtype (float32 for float16 / bfloat16, where 1 + exp overflows), rounded once
            compute = torch.float64 if x.dtype == torch.float64 else torch.float32
            keep = self.fixed_keep.to(compute)
            if self.rescale:
                keep = keep * (1.0 + torch.exp(self.drop_logit.to(compute))).expand(units)
            keep = keep.repeat_interleave(self._unit_channels()).to(x.dtype)
            return x * keep.reshape((1, x.shape[1]) + (1,) * (x.dim() - 2))
        return gumbel_sigmoid_dropout(
            x,
            self.drop_logit.to(x.dtype),
            self.temperature,
            granularity=self.granularity,
            group_size=self.group_size,
            rescale=self.rescale,
            mode=self.mode,
            training=self.training,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.drop_logit.shape[0]}, temperature={self.temperature}, granularity={self.granularity!r}, "
            f"group_size={self.group_size}, rescale={self.rescale}, mode={self.mode!r}"
        )


def _input_channel_sq_norms(weight: Tensor, conv_groups: int) -> Tensor:
    """||m_c||^2 for every input channel c of a Linear [out, in] or Conv [out, in / groups, *k] weight."""
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    per = weight.reshape(conv_groups, out_channels // conv_groups, in_per_group, -1).square().sum((1, 3))
    return per.reshape(conv_groups * in_per_group)  # channel c = group * in_per_group + local index


def concrete_dropout_regularizer(
    weight: Tensor,
    drop_logit: Tensor,
    length_scale: float,
    num_data: int,
    *,
    unit_size: int = 1,
    rescale: bool = True,
    conv_groups: int = 1,
) -> Tensor:
    """Eq. 15 for one layer whose input channels are dropped (module docstring for the derivation):

        R = sum_units [ l^2 w(p_u) ||m_u||^2 / (2 N) - H(p_u) / N ],
        w(p) = 1 / (1 - p) with rescale, 1 - p without

    Args:
        weight: the weight of the layer reading the dropped input: Linear [out, in] or Conv
            [out, in / conv_groups, kh, kw].
        drop_logit: [in / unit_size] logits of the drop rates, or [1] shared by all units.
        length_scale: l, of the N(0, 1 / l^2) weight prior.
        num_data: N, the number of training examples.
        unit_size: input channels per mask unit (1: per channel; the group size: per group).
        rescale: whether the dropout rescales by 1 / (1 - p).
        conv_groups: the convolution's groups.

    Returns:
        A scalar, differentiable in weight and drop_logit.
    """
    owner = "concrete_dropout_regularizer"
    _checks.check_tensor("weight", weight, owner)
    _checks.check_tensor("drop_logit", drop_logit, owner)
    _checks.check_bool("rescale", rescale, owner)
    # bools are ints: True would pass as 1; 0 would divide by zero below
    for key, value in (("unit_size", unit_size), ("conv_groups", conv_groups)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {key} must be a positive int, got {value!r}")
    if weight.dim() < 2:
        raise ValueError(f"{owner}: weight must be a Linear [out, in] or Conv [out, in/groups, *k] weight, got {tuple(weight.shape)}")
    if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
        raise ValueError(f"{owner}: num_data must be a positive int, got {num_data!r}")
    if not (isinstance(length_scale, (int, float)) and math.isfinite(length_scale) and length_scale >= 0):
        raise ValueError(f"{owner}: length_scale must be a finite number >= 0, got {length_scale!r}")
    if weight.shape[0] % conv_groups:
        raise ValueError(f"{owner}: conv_groups = {conv_groups} does not divide the {weight.shape[0]} output channels")
    sq = _input_channel_sq_norms(weight, conv_groups)
    in_channels = sq.shape[0]
    if unit_size < 1 or in_channels % unit_size:
        raise ValueError(f"{owner}: unit_size = {unit_size} does not divide the {in_channels} input channels")
    units = in_channels // unit_size
    if drop_logit.dim() != 1 or drop_logit.shape[0] not in (1, units):
        raise ValueError(f"{owner}: drop_logit must be [{units}] (one per unit) or [1], got {tuple(drop_logit.shape)}")
    if not torch.compiler.is_compiling():  # a NaN or infinite logit would give a NaN regulariser
        _checks.check_finite_values("drop_logit", drop_logit, owner)
    logit = drop_logit.expand(units)
    unit_sq = sq.reshape(units, unit_size).sum(1)
    # w(p) and H(p) from the logit, stable at p near 0 and 1: log p = -softplus(-lambda),
    # log(1 - p) = -softplus(lambda), 1 / (1 - p) = 1 + exp(lambda).
    p = torch.sigmoid(logit)
    log_p, log_keep = -torch.nn.functional.softplus(-logit), -torch.nn.functional.softplus(logit)
    weight_factor = 1.0 + torch.exp(logit) if rescale else 1.0 - p
    entropy = -(p * log_p + (1.0 - p) * log_keep)
    return (length_scale**2 * weight_factor * unit_sq / 2.0 - entropy).sum() / num_data


class InputDropoutConv2d(nn.Module):
    """A Conv2d whose input channels go through :class:`GumbelSigmoidDropout` first: PGNAS's
    "dropout on the kernels sliced per input channel" (dropping input channel c of an example is
    dropping the kernel slice W[:, c] for that example).

    Args:
        conv: the convolution (kept as ``self.conv``, its state_dict keys under ``conv.``).
        init_drop, temperature, rescale, mode: as for :class:`GumbelSigmoidDropout`.
        granularity: "channel" (one rate per input channel), or "group" (one rate and mask per
            ``group_size`` input channels).
        shared: one drop rate for all units of the layer (PGNAS's p^s_l) instead of one per unit.
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        init_drop: float = 0.1,
        temperature: float = 0.2,
        granularity: str = "channel",
        group_size: Optional[int] = None,
        rescale: bool = False,
        mode: str = "soft",
        shared: bool = False,
    ):
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"InputDropoutConv2d: conv must be an nn.Conv2d, got {type(conv).__name__}")
        if granularity not in ("channel", "group"):
            raise ValueError(f"InputDropoutConv2d: granularity must be 'channel' or 'group', got {granularity!r}")
        unit_size = 1 if granularity == "channel" else group_size
        if granularity == "group" and (not isinstance(group_size, int) or group_size < 1 or conv.in_channels % group_size):
            raise ValueError(f"InputDropoutConv2d: group_size = {group_size!r} must divide in_channels = {conv.in_channels}")
        self.unit_size = unit_size
        self.conv = conv
        self.dropout = GumbelSigmoidDropout(
            1 if shared else conv.in_channels // unit_size, init_drop, temperature, granularity,
            group_size if granularity == "group" else None, rescale, mode,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.dropout(x))

    def regularizer(self, length_scale: float, num_data: int) -> Tensor:
        """Eq. 15 for this layer (:func:`concrete_dropout_regularizer`)."""
        return concrete_dropout_regularizer(
            self.conv.weight, self.dropout.drop_logit, length_scale, num_data,
            unit_size=self.unit_size, rescale=self.dropout.rescale, conv_groups=self.conv.groups,
        )
