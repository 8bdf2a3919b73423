"""Architecture-conditional batch norm modules: drop-ins for ``nn.BatchNorm1d`` / ``nn.BatchNorm2d``.

    bn = bnas_fast.nn.ArchBatchNorm2d(64, num_archs=5, running_stats="per_arch")
    y = bn(x, arch)          # x [B, 64, H, W], arch [B] int64 in [0, 5)

Each architecture s has its own affine parameters weight[s], bias[s] ([S, C]); the batch statistics
are taken over the whole batch (every architecture together, as NSA-i of seed 002 needs) or over
ghost batches of ``group_size`` consecutive examples (seed 004). Running statistics are either
``"shared"`` (one [C] pair, as the NSA code does) or ``"per_arch"`` ([S, C], row s updated only from
the examples of architecture s present in the batch), which attacks the train/eval disparity of
section 3 of seed 002: an architecture evaluated in eval mode uses statistics of its own activations.
Per-architecture statistics average the mean and the second moment E[x^2] over batches (not the
per-batch variances), so an architecture met by one example per batch still gets the variance
between its examples. ``momentum`` counts training batches, as for shared statistics
(``momentum_per="batch"``, the default): an architecture met again after t batches moves by
1 - (1 - momentum)^t, so its statistics are as recent as the shared ones. With
``momentum_per="update"`` it moves by ``momentum`` whenever it is met, which leaves an
architecture met once in S batches (NSA) with statistics from early in training. Per-architecture
statistics match training when training normalised each architecture's examples by themselves
(NSA: one architecture per batch); with NSA-i's whole-batch statistics they do not (README, "NSA,
NSA-i and NSA-id").

With ``num_archs = 1`` the module matches ``nn.BatchNorm2d`` in both modes, and
``load_state_dict`` accepts a BatchNorm state_dict: its [C] parameters and statistics are broadcast
to every architecture.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from bnas_fast import _checks
from bnas_fast.ops.arch_batch_norm import arch_batch_norm

__all__ = ["ArchBatchNorm1d", "ArchBatchNorm2d", "recalibrate_batch_norm"]

_RUNNING_STATS = ("shared", "per_arch")
_MOMENTUM_PER = ("batch", "update")


def _check_arch(arch: Tensor, batch: int, num_archs: int, op: str) -> None:
    """arch: a [B] int64 tensor with values in [0, S) (the functional's own check, needed earlier here)."""
    _checks.check_tensor("arch", arch, op)
    if arch.dtype != torch.int64 or arch.dim() != 1 or arch.shape[0] != batch:
        raise ValueError(f"{op}: arch must be a [B] = [{batch}] int64 tensor, got {arch.dtype} {tuple(arch.shape)}")
    _checks.check_index_range("arch", arch, num_archs, op, what="S architectures")


class _ArchBatchNorm(nn.Module):
    _expected_dims: tuple = ()
    _version = 2  # as nn.BatchNorm: state_dicts of version 1 may lack num_batches_tracked

    def __init__(
        self,
        num_features: int,
        num_archs: int = 1,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        running_stats: str = "shared",
        group_size: Optional[int] = None,
        device=None,
        dtype=None,
        momentum_per: str = "batch",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for key, value in (("num_features", num_features), ("num_archs", num_archs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {key} must be an int >= 1, got {value!r}")
        if running_stats not in _RUNNING_STATS:
            raise ValueError(f"{name}: running_stats must be one of {_RUNNING_STATS}, got {running_stats!r}")
        # Type first: a string would otherwise fail inside the comparison with a raw TypeError, and a
        # bool would pass as 0 or 1.
        for key, value in (("momentum", momentum), ("eps", eps)):
            if (key == "momentum" and value is None) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
                continue
            allowed = "None or a number in [0, 1]" if key == "momentum" else "a finite number >= 0"
            raise TypeError(f"{name}: {key} must be {allowed}, got {value!r}")
        if momentum is not None and not 0 <= momentum <= 1:
            raise ValueError(f"{name}: momentum must be in [0, 1] or None (cumulative average), got {momentum!r}")
        # eps = 0 is allowed, as nn.BatchNorm allows it (and the functional op); "not >=" catches NaN.
        if not eps >= 0 or eps == float("inf"):
            raise ValueError(f"{name}: eps must be a finite number >= 0, got {eps!r}")
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2):
            raise ValueError(f"{name}: group_size must be None (the whole batch) or an int >= 2, got {group_size!r}")
        if momentum_per not in _MOMENTUM_PER:
            raise ValueError(f"{name}: momentum_per must be one of {_MOMENTUM_PER}, got {momentum_per!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.num_archs = num_features, num_archs
        self.eps, self.momentum = eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.running_stats, self.group_size, self.momentum_per = running_stats, group_size, momentum_per
        if affine:
            self.weight = nn.Parameter(torch.ones(num_archs, num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_archs, num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            shape = (num_features,) if running_stats == "shared" else (num_archs, num_features)
            self.register_buffer("running_mean", torch.zeros(shape, **factory))
            self.register_buffer("running_var", torch.ones(shape, **factory))
            # per_arch: batches in which each architecture was present (for momentum=None)
            counts = () if running_stats == "shared" else (num_archs,)
            self.register_buffer("num_batches_tracked", torch.zeros(counts, dtype=torch.long, device=device))
            if running_stats == "per_arch":
                # training batches since each architecture's statistics last moved (momentum_per="batch")
                since = torch.zeros(num_archs, dtype=torch.long, device=device)
                self.register_buffer("batches_since_update", since)
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_archs={self.num_archs}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
            f"running_stats={self.running_stats!r}, group_size={self.group_size}"
            + (f", momentum_per={self.momentum_per!r}" if self.running_stats == "per_arch" else "")
        )

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()
            if self.running_stats == "per_arch":
                self.batches_since_update.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, arch: Optional[Tensor] = None) -> Tensor:
        """x: [B, C, *] (see the subclass), arch: [B] int64 in [0, num_archs); None means architecture 0
        for every example (allowed with num_archs = 1 only, for nn.BatchNorm drop-in use)."""
        name = type(self).__name__
        if x.dim() not in self._expected_dims:
            raise ValueError(f"{name}: expected a {' or '.join(f'{d}D' for d in self._expected_dims)} input, got {x.dim()}D")
        if arch is None:
            if self.num_archs != 1:
                raise ValueError(f"{name}: arch is required when num_archs = {self.num_archs} > 1")
            arch = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        use_batch_stats = self.training or not self.track_running_stats
        momentum, arch_momentum = self.momentum if self.momentum is not None else 0.0, None
        # The batch counts advance only once the call has succeeded (a rejected arch must not skew
        # the cumulative average); the momentum they give is worked out beforehand.
        counts, since = None, None
        if self.training and self.track_running_stats:
            with torch.no_grad():
                if self.running_stats == "shared":
                    counts = self.num_batches_tracked + 1
                    if self.momentum is None:
                        momentum = 1.0 / float(counts)
                else:
                    if not torch.compiler.is_compiling():  # bincount needs a valid arch: check it first
                        _check_arch(arch, x.shape[0], self.num_archs, name)
                    present = torch.bincount(arch, minlength=self.num_archs)[: self.num_archs] > 0
                    counts = self.num_batches_tracked + present.long()
                    since = torch.where(present, 0, self.batches_since_update + 1)
                    if self.momentum is None:
                        arch_momentum = 1.0 / counts.clamp(min=1).to(torch.float64)
                    elif self.momentum_per == "batch":
                        # the weight that shared statistics give the batches since the last update:
                        # 1 - (1 - momentum)^t for an architecture last met t batches ago (t = 1: momentum)
                        # (float32 at least: no float64 on backends that lack it, unless the module is)
                        acc = torch.promote_types(self.running_mean.dtype, torch.float32)
                        t = (self.batches_since_update + 1).to(acc)
                        arch_momentum = 1.0 - (1.0 - self.momentum) ** t
        running = self.track_running_stats and (self.training or not use_batch_stats)
        weight, bias = _affine_in_dtype_of(x, self.weight, self.bias)
        y = arch_batch_norm(
            x,
            arch,
            weight,
            bias,
            self.running_mean if running else None,
            self.running_var if running else None,
            training=use_batch_stats,
            momentum=momentum,
            eps=self.eps,
            group_size=self.group_size,
            arch_momentum=arch_momentum,
            num_archs=self.num_archs,
        )
        if counts is not None:
            self.num_batches_tracked.copy_(counts)
        if since is not None:
            self.batches_since_update.copy_(since)
        return y

    def __setstate__(self, state) -> None:
        # Modules pickled whole before momentum_per existed: they keep the rule they were trained
        # with (per update) and get the counter that forward needs.
        super().__setstate__(state)
        if "momentum_per" not in self.__dict__:
            self.momentum_per = "update"
        if self.track_running_stats and self.running_stats == "per_arch" and "batches_since_update" not in self._buffers:
            since = torch.zeros(self.num_archs, dtype=torch.long, device=self.running_mean.device)
            self.register_buffer("batches_since_update", since)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A BatchNorm state_dict has [C] weight and bias (and [C] running statistics, a scalar
        # num_batches_tracked): broadcast them to every architecture.
        S, C = self.num_archs, self.num_features
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            # as nn.BatchNorm: state_dicts saved before num_batches_tracked existed load with a count of 0
            state_dict[key] = torch.zeros_like(self.num_batches_tracked)
        for key in ("weight", "bias"):
            value = state_dict.get(prefix + key)
            if value is not None and self.affine and value.shape == (C,):
                state_dict[prefix + key] = value.unsqueeze(0).expand(S, C).clone()
        if self.track_running_stats and self.running_stats == "per_arch":
            for key in ("running_mean", "running_var"):
                value = state_dict.get(prefix + key)
                if value is not None and value.shape == (C,):
                    state_dict[prefix + key] = value.unsqueeze(0).expand(S, C).clone()
            value = state_dict.get(prefix + "num_batches_tracked")
            if value is not None and value.dim() == 0:
                state_dict[prefix + "num_batches_tracked"] = value.expand(S).clone()
            # BatchNorm state_dicts and those saved before momentum_per existed: every row counts as
            # just updated (its next update moves it by momentum). Only when this module's statistics
            # are loaded (a partial state_dict leaves the counter alone), on their device (assign=True).
            key, loaded = prefix + "batches_since_update", state_dict.get(prefix + "running_mean")
            if key not in state_dict and loaded is not None:
                state_dict[key] = torch.zeros(S, dtype=torch.long, device=loaded.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def _affine_in_dtype_of(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]):
    """The affine parameters cast to x's dtype (float32 parameters with a bfloat16 input, as under
    autocast): nn.BatchNorm takes such a mix, the fused op wants one dtype. The gradient flows back
    through the cast to the parameters in their own dtype."""
    if weight is not None and weight.dtype != x.dtype:
        weight, bias = weight.to(x.dtype), bias.to(x.dtype)
    return weight, bias


class ArchBatchNorm1d(_ArchBatchNorm):
    """Architecture-conditional BatchNorm1d: x is [B, C] or [B, C, L] (module docstring)."""

    _expected_dims = (2, 3)


class ArchBatchNorm2d(_ArchBatchNorm):
    """Architecture-conditional BatchNorm2d: x is [B, C, H, W] (module docstring)."""

    _expected_dims = (4,)


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, batches: Iterable[Union[Tensor, Sequence]]) -> int:
    """Recompute, in place, the running statistics of every batch norm of ``model`` that keeps them
    (``nn.BatchNorm1d/2d/3d`` and :class:`ArchBatchNorm1d/2d`), with the weights fixed.

    The statistics are reset, the model runs ``model(batch)`` (or ``model(*batch)`` for a tuple or
    list) on every batch in train mode without gradients, and each layer averages the batches'
    statistics with equal weight (``momentum=None``). Momentum and every module's train/eval mode
    are restored afterwards (the whole model runs in train mode meanwhile, dropout included, as in
    training).

    This is the batch-norm calibration of one-shot NAS (Bender et al. §3.2 compute the statistics
    "on the fly"; single-path one-shot NAS recomputes them per candidate): run with one architecture
    fixed, eval mode then sees that architecture's statistics instead of those of the mixture of
    architectures seen in training (the train/eval disparity of §3 of the NSA paper).

    Returns the number of batches used. Raises ValueError when ``batches`` is empty or ``model``
    has no batch norm that keeps running statistics.
    """
    layers = [
        m for m in model.modules()
        if (isinstance(m, (nn.modules.batchnorm._BatchNorm, _ArchBatchNorm))
            or getattr(type(m), "recalibrated_like_batch_norm", False))  # e.g. NSANet(fused=False)'s stage norms
        and m.track_running_stats
    ]
    if not layers:
        raise ValueError("recalibrate_batch_norm: the model has no batch norm layer with running statistics")
    modes = [(m, m.training) for m in model.modules()]  # each module's own mode, restored as it was
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    used = 0
    try:
        model.train()
        for batch in batches:
            model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
            used += 1
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    if used == 0:
        raise ValueError(
            "recalibrate_batch_norm: batches is empty (the statistics were reset and nothing replaced them)"
        )
    return used
