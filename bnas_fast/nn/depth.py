"""Learnt-depth networks (seed 000): variational inference over the depth of a residual network.

A network of D residual blocks f_1..f_D between an input block f_0 and an output block f_{D+1}:

    a_0 = f_0(x),    a_i = a_{i-1} + f_i(a_{i-1})   (i = 1..D),    logits_i = f_{D+1}(a_i)

A network of depth d predicts with ``softmax(logits_d)``; one forward pass gives the logits of every
depth 0..D. Depth is a latent variable with prior p_beta(d) = Cat(beta), beta_i ∝ gamma^(1+i)
(appendix B), and approximate posterior q_alpha(d) = Cat(alpha), alpha = softmax(learnable logits).

ELBO (eq. 2), exact, from one forward pass, for a mini-batch of N' of the N training points:

    L(alpha, theta) = (N / N') * sum_{n=1}^{N'} sum_{i=0}^{D} alpha_i log p_theta(y_n | f_{D+1}(a_i(x_n)))
                      - sum_{i=0}^{D} alpha_i log(alpha_i / beta_i)

The double sum is the fused op :func:`bnas_fast.depth_loglik` (per example), the second term is
KL(q || p_beta).

Pruning (section 2). The 95% rule: s = {i : alpha_i >= 0.95 max_j alpha_j}, d_opt = min s, the
shallowest depth whose posterior probability is within 5% of the largest; the expected-depth rule
(appendix D): d_opt = round(E_q[d]); and argmax (the paper's choice in the low-data regime). Blocks
after d_opt are removed and their mass moves to d_opt: q'(d_opt) = q(d >= d_opt), q'(i) = q(i) for
i < d_opt (q'(d > d_opt) = 0, so those depths are dropped).

Prediction (eq. 3): p(y* | x*) = sum_{i=0}^{d_opt} q'(d = i) softmax(logits_i(x*))_y, computed in log
space (logsumexp) from the one forward pass that runs d_opt blocks.

Also here: the deterministic-depth baseline :class:`ResNet` (same blocks, prediction from a_d only),
the block families of appendix B (:class:`FCBlocks`, :class:`ConvBlocks`), and calibration
(:func:`expected_calibration_error`, :func:`reliability_diagram`).
"""

from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from bnas_fast import _checks
from bnas_fast.ops.depth_loglik import depth_loglik

__all__ = [
    "LearntDepthNet",
    "DepthPosterior",
    "ResNet",
    "FCBlocks",
    "ConvBlocks",
    "PreActBottleneck",
    "Residual",
    "learnt_depth_net",
    "resnet",
    "geometric_prior",
    "categorical_kl",
    "elbo",
    "depth_95",
    "depth_expected",
    "depth_argmax",
    "select_depth",
    "DEPTH_RULES",
    "prune_log_q",
    "marginal_log_predictive",
    "marginal_predictive",
    "per_depth_predictions",
    "expected_calibration_error",
    "reliability_diagram",
]

PriorLike = Union[str, Tensor, Sequence[float]]


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------


def _check_probabilities(name: str, q: Tensor, where: str) -> Tensor:
    """A 1-D non-empty tensor of finite, non-negative values (a categorical, up to normalisation)."""
    if not isinstance(q, Tensor):
        q = torch.as_tensor(q, dtype=torch.float64)
    if q.dim() != 1 or q.numel() == 0:
        raise ValueError(
            f"{where}: {name} must be a non-empty 1-D tensor of probabilities, got shape {tuple(q.shape)}"
        )
    q = q.detach()
    if not bool(torch.isfinite(q).all()) or bool((q < 0).any()):
        raise ValueError(f"{where}: {name} must hold finite non-negative probabilities, got {q.tolist()}")
    if float(q.sum()) <= 0:
        raise ValueError(f"{where}: {name} has no mass (all zeros)")
    return q


def _check_log_probabilities(name: str, log_p: Tensor, where: str) -> None:
    """Log-probabilities: no NaN, no +inf, none above 0 (beyond rounding); -inf (probability 0) is allowed."""
    values = log_p.detach()
    if bool(torch.isnan(values).any()) or bool((values > 1e-4).any()):
        raise ValueError(f"{where}: {name} must hold log-probabilities (<= 0, -inf allowed, no NaN), "
                         f"got {values.tolist() if values.numel() <= 12 else tuple(values.shape)}")


# ----------------------------------------------------------------------------------------------
# prior, KL, posterior
# ----------------------------------------------------------------------------------------------


def geometric_prior(max_depth: int, gamma: float = 0.85, dtype: torch.dtype = torch.float64) -> Tensor:
    """beta_i = gamma^(1+i) / sum_{j=0}^{D} gamma^(1+j), i = 0..D (appendix B). gamma = 1 is uniform.

    Returns:
        [D+1] probabilities, computed in log space so that large D with small gamma does not underflow.
    """
    _checks.check_int("max_depth", max_depth, "geometric_prior", 0)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 < float(gamma) <= 1.0:
        raise ValueError(f"geometric_prior: gamma must be a number in (0, 1], got {gamma!r}")
    exponents = torch.arange(1, max_depth + 2, dtype=torch.float64) * math.log(float(gamma))
    return torch.softmax(exponents, dim=0).to(dtype)


def _log_prior(max_depth: int, prior: PriorLike, gamma: float, where: str) -> Tensor:
    """The validated log prior, float64 [D+1]."""
    if isinstance(prior, str):
        if prior != "geometric":
            raise ValueError(
                f"{where}: prior must be 'geometric' or a sequence of D+1 probabilities, got {prior!r}"
            )
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 < float(gamma) <= 1.0:
            raise ValueError(f"{where}: gamma must be a number in (0, 1], got {gamma!r}")
        return geometric_prior(max_depth, gamma).log()
    try:
        p = torch.as_tensor(prior, dtype=torch.float64).detach().clone()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"{where}: prior must be 'geometric' or a sequence of D+1 probabilities ({exc})"
        ) from exc
    if p.dim() != 1 or p.numel() != max_depth + 1:
        raise ValueError(
            f"{where}: prior must have D+1 = {max_depth + 1} entries (depths 0..{max_depth}), "
            f"got shape {tuple(p.shape)}"
        )
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise ValueError(f"{where}: prior must hold finite non-negative probabilities, got {p.tolist()}")
    total = float(p.sum())
    if abs(total - 1.0) > 1e-5:
        raise ValueError(f"{where}: prior must sum to one, sums to {total:.8g}")
    zeros = (p == 0).nonzero().flatten().tolist()
    if zeros:
        raise ValueError(
            f"{where}: prior is zero at depth(s) {zeros}, where q has mass (q = softmax(logits) is "
            "positive at every depth 0..D), so KL(q || prior) would be infinite; use a smaller max_depth"
        )
    return (p / total).log()


def categorical_kl(log_q: Tensor, log_prior: Tensor) -> Tensor:
    """KL(q || p) = sum_i q_i (log q_i - log p_i), terms with q_i = 0 contributing 0.

    Args:
        log_q, log_prior: [D+1] log-probabilities (-inf allowed where the probability is 0).

    Returns:
        a scalar in the dtype of ``log_q``; differentiable in ``log_q``.

    Raises:
        ValueError naming ``log_prior`` when p_i = 0 where q_i > 0 (the KL would be infinite).
    """
    _checks.check_tensor("log_q", log_q, "categorical_kl")
    _checks.check_tensor("log_prior", log_prior, "categorical_kl")
    if log_q.dim() != 1 or log_q.shape != log_prior.shape:
        raise ValueError(
            f"categorical_kl: log_q and log_prior must be 1-D of the same length, got {tuple(log_q.shape)} "
            f"and {tuple(log_prior.shape)}"
        )
    _check_log_probabilities("log_q", log_q, "categorical_kl")
    _check_log_probabilities("log_prior", log_prior, "categorical_kl")
    q = log_q.exp()
    has_mass = q > 0
    if bool((has_mass & (log_prior == float("-inf"))).any()):
        bad = (has_mass & (log_prior == float("-inf"))).nonzero().flatten().tolist()
        raise ValueError(f"categorical_kl: log_prior is -inf (prior 0) at depth(s) {bad} where q has mass")
    # where() before the product: 0 * (-inf - x) would be NaN in value and in gradient.
    diff = torch.where(has_mass, log_q - log_prior.to(log_q.dtype), torch.zeros_like(log_q))
    return (q * diff).sum()


class DepthPosterior(nn.Module):
    """q_alpha(d) = Cat(softmax(logits)) over d in {0..D}, with a fixed prior p_beta(d).

    Args:
        max_depth: D >= 1.
        prior: ``"geometric"`` (beta_i ∝ gamma^(1+i), appendix B) or D+1 probabilities that sum to one
            with no zeros (q has mass at every depth, so a zero would make the KL infinite).
        gamma: ratio of the geometric prior, in (0, 1]; 0.85 in the paper; 1 is uniform.
        init_logits: optional [D+1] initial logits of q (default zeros: q uniform).

    Attributes:
        logits: the learnable [D+1] parameter (float32).
        log_prior: [D+1] buffer, log beta.
    """

    def __init__(
        self,
        max_depth: int,
        prior: PriorLike = "geometric",
        gamma: float = 0.85,
        init_logits: Optional[Tensor] = None,
    ):
        super().__init__()
        _checks.check_int("max_depth", max_depth, "DepthPosterior", 1)
        log_prior = _log_prior(max_depth, prior, gamma, "DepthPosterior")
        if init_logits is None:
            logits = torch.zeros(max_depth + 1)
        else:
            logits = torch.as_tensor(init_logits, dtype=torch.float32).detach().clone()
            if logits.shape != (max_depth + 1,):
                raise ValueError(
                    f"DepthPosterior: init_logits must have shape [D+1] = [{max_depth + 1}], "
                    f"got {tuple(logits.shape)}"
                )
            if not bool(torch.isfinite(logits).all()):
                raise ValueError("DepthPosterior: init_logits must be finite")
        self.logits = nn.Parameter(logits)
        self.register_buffer("log_prior", log_prior.to(torch.float32))
        self.prior_name = prior if isinstance(prior, str) else "custom"
        self.gamma = float(gamma) if isinstance(prior, str) else None

    @property
    def max_depth(self) -> int:
        return self.logits.shape[0] - 1

    def extra_repr(self) -> str:
        # "geometric" only while the buffer still holds that prior: pruned() folds its tail, and a
        # loaded state_dict may bring another one
        geometric = self.prior_name == "geometric" and torch.allclose(
            self.log_prior.double(), geometric_prior(self.max_depth, self.gamma).log(), atol=1e-6)
        prior = f"geometric(gamma={self.gamma:g})" if geometric else "custom"
        return f"max_depth={self.max_depth}, prior={prior}"

    def log_q(self) -> Tensor:
        """[D+1] log q(d)."""
        return torch.log_softmax(self.logits, dim=0)

    def q(self) -> Tensor:
        """[D+1] q(d)."""
        return torch.softmax(self.logits, dim=0)

    def prior(self) -> Tensor:
        """[D+1] beta."""
        return self.log_prior.exp()

    def kl(self) -> Tensor:
        """KL(q || p_beta) = sum_i alpha_i log(alpha_i / beta_i), a scalar differentiable in ``logits``."""
        return categorical_kl(self.log_q(), self.log_prior)

    def forward(self) -> Tensor:
        return self.log_q()

    def depth(self, rule: str = "95") -> int:
        """d_opt by ``rule`` (see :func:`select_depth`)."""
        return select_depth(self.q().detach(), rule)

    def pruned(self, depth: int) -> "DepthPosterior":
        """The posterior over {0..depth} with the tail's mass moved to ``depth`` (section 2):
        q'(i) = q(i) for i < depth, q'(depth) = q(d >= depth). The prior is folded the same way, so
        that the returned object is a valid posterior/prior pair over depths 0..depth.
        ``depth`` may be 0 (a linear model) here, unlike in the constructor.
        """
        _checks.check_int("depth", depth, "DepthPosterior.pruned", 0)
        if depth > self.max_depth:
            raise ValueError(
                f"DepthPosterior.pruned: depth must be <= max_depth = {self.max_depth}, got {depth}"
            )
        out = copy.deepcopy(self)
        with torch.no_grad():
            out.logits = nn.Parameter(prune_log_q(self.log_q().detach(), depth))
            out.log_prior = prune_log_q(self.log_prior, depth)
        return out


# ----------------------------------------------------------------------------------------------
# the ELBO
# ----------------------------------------------------------------------------------------------


def elbo(logits: Tensor, targets: Tensor, posterior: DepthPosterior, dataset_size: int) -> Tensor:
    """The exact ELBO of eq. 2 for one mini-batch: (N / N') sum_b E_q[log p(y_b | x_b, d)] - KL(q || beta).

    No sampling: the expectation over d is the fused :func:`bnas_fast.depth_loglik` over the logits of
    every depth. Gradients reach ``logits`` (so the network) and ``posterior.logits``.

    Args:
        logits: [D+1, B, C] per-depth logits (:meth:`LearntDepthNet.forward`); finite.
        targets: [B] int64 in [0, C).
        posterior: the :class:`DepthPosterior` over the same D+1 depths.
        dataset_size: N, the number of training points (>= B); N / N' scales the mini-batch sum.

    Returns:
        a scalar (to maximise; minimise ``-elbo``).
    """
    op = "elbo"
    _checks.check_tensor("logits", logits, op)
    if not isinstance(posterior, DepthPosterior):
        raise TypeError(f"{op}: posterior must be a DepthPosterior, got {type(posterior).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"{op}: logits must have shape [D+1, B, C], got {tuple(logits.shape)}")
    if logits.shape[0] != posterior.max_depth + 1:
        raise ValueError(
            f"{op}: logits has {logits.shape[0]} depths but the posterior covers "
            f"D+1 = {posterior.max_depth + 1} "
            f"(max_depth = {posterior.max_depth})"
        )
    _checks.check_int("dataset_size", dataset_size, op, 1)
    if dataset_size < logits.shape[1]:
        raise ValueError(
            f"{op}: dataset_size (N = {dataset_size}) is smaller than the batch (B = {logits.shape[1]})"
        )
    log_q = posterior.log_q()
    expected_loglik = depth_loglik(logits, targets, log_q.to(logits.dtype))  # [B]
    scale = dataset_size / logits.shape[1]
    return scale * expected_loglik.sum() - posterior.kl().to(logits.dtype)


# ----------------------------------------------------------------------------------------------
# choosing the depth, pruning, prediction
# ----------------------------------------------------------------------------------------------


def depth_95(q: Tensor, threshold: float = 0.95) -> int:
    """Section 2's rule: d_opt = min{i : q_i >= threshold * max_j q_j} (threshold = 0.95).

    The shallowest depth whose posterior probability is within 5% of the largest one: in the
    medium/large data regime q flattens out after an adequate depth and this keeps the fewest blocks.
    ``q`` need not be normalised (the rule is scale-free).
    """
    q = _check_probabilities("q", q, "depth_95")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"depth_95: threshold must be in (0, 1], got {threshold!r}")
    return int((q >= threshold * q.max()).nonzero()[0, 0])


def depth_expected(q: Tensor) -> int:
    """Appendix D's rule: d_opt = round(E_q[d]) = round(sum_i i q_i), halves rounded up (q is normalised
    here)."""
    q = _check_probabilities("q", q, "depth_expected").to(torch.float64)
    mean = float((torch.arange(q.numel(), dtype=torch.float64) * q).sum() / q.sum())
    return int(math.floor(mean + 0.5))


def depth_argmax(q: Tensor) -> int:
    """d_opt = argmax_i q_i (the shallowest on ties): the paper's choice in the low-data regime."""
    q = _check_probabilities("q", q, "depth_argmax")
    return int((q == q.max()).nonzero()[0, 0])


DEPTH_RULES = {"95": depth_95, "expected": depth_expected, "argmax": depth_argmax}


def select_depth(q: Tensor, rule: str = "95") -> int:
    """d_opt by ``rule``: ``"95"`` (:func:`depth_95`), ``"expected"`` (:func:`depth_expected`) or
    ``"argmax"`` (:func:`depth_argmax`)."""
    if rule not in DEPTH_RULES:
        raise ValueError(f"select_depth: rule must be one of {sorted(DEPTH_RULES)}, got {rule!r}")
    return DEPTH_RULES[rule](q)


def prune_log_q(log_q: Tensor, depth: int) -> Tensor:
    """log q' over {0..depth}: q'(i) = q(i) for i < depth, q'(depth) = q(d >= depth) (section 2).

    Args:
        log_q: [D+1] log-probabilities.
        depth: d_opt in [0, D].

    Returns:
        [depth+1] log-probabilities (they still sum to one: the tail's mass is moved, not dropped).
    """
    _checks.check_tensor("log_q", log_q, "prune_log_q")
    if log_q.dim() != 1:
        raise ValueError(f"prune_log_q: log_q must be 1-D [D+1], got shape {tuple(log_q.shape)}")
    _check_log_probabilities("log_q", log_q, "prune_log_q")
    _checks.check_int("depth", depth, "prune_log_q", 0)
    if depth > log_q.shape[0] - 1:
        raise ValueError(f"prune_log_q: depth must be <= D = {log_q.shape[0] - 1}, got {depth}")
    return torch.cat([log_q[:depth], torch.logsumexp(log_q[depth:], dim=0, keepdim=True)])


def marginal_log_predictive(logits: Tensor, log_q: Tensor, depth: Optional[int] = None) -> Tensor:
    """log p(y | x) of eq. 3: log sum_{i=0}^{d} q'(i) softmax(logits_i), q' = :func:`prune_log_q`(log_q, d).

    Args:
        logits: [d'+1, B, C] per-depth logits with d' >= d (a forward pass that ran at least d blocks).
        log_q: [D+1] log q(d) of the unpruned posterior (or an already pruned one, with D = d).
        depth: d; None means every depth of ``log_q``, which then must match ``logits``.

    Returns:
        [B, C] log-probabilities, computed with logsumexp (no underflow for confident depths).
    """
    op = "marginal_log_predictive"
    _checks.check_tensor("logits", logits, op)
    _checks.check_tensor("log_q", log_q, op)
    if logits.dim() != 3:
        raise ValueError(f"{op}: logits must have shape [D+1, B, C], got {tuple(logits.shape)}")
    if log_q.dim() != 1:
        raise ValueError(f"{op}: log_q must be 1-D [D+1], got shape {tuple(log_q.shape)}")
    _check_log_probabilities("log_q", log_q, op)
    if depth is None:
        if logits.shape[0] != log_q.shape[0]:
            raise ValueError(
                f"{op}: logits has {logits.shape[0]} depths but log_q has {log_q.shape[0]}; pass depth= to "
                "marginalise over the first depth+1 only"
            )
        depth = log_q.shape[0] - 1
    _checks.check_int("depth", depth, op, 0)
    if depth > logits.shape[0] - 1:
        raise ValueError(f"{op}: depth = {depth} but logits only covers depths 0..{logits.shape[0] - 1}")
    lq = prune_log_q(log_q.to(logits.dtype), depth)
    log_probs = torch.log_softmax(logits[: depth + 1], dim=-1)
    return torch.logsumexp(lq.view(-1, 1, 1) + log_probs, dim=0)


def marginal_predictive(logits: Tensor, log_q: Tensor, depth: Optional[int] = None) -> Tensor:
    """p(y | x) of eq. 3, [B, C]: ``marginal_log_predictive(...).exp()``."""
    return marginal_log_predictive(logits, log_q, depth).exp()


def per_depth_predictions(logits: Tensor) -> Tensor:
    """[D+1, B, C] -> [D+1, B, C] class probabilities of the network of each depth."""
    _checks.check_tensor("logits", logits, "per_depth_predictions")
    if logits.dim() != 3:
        raise ValueError(
            f"per_depth_predictions: logits must have shape [D+1, B, C], got {tuple(logits.shape)}"
        )
    return torch.softmax(logits, dim=-1)


# ----------------------------------------------------------------------------------------------
# calibration
# ----------------------------------------------------------------------------------------------


def _calibration_bins(probs: Tensor, targets: Tensor, n_bins: int, op: str) -> Dict[str, Tensor]:
    _checks.check_tensor("probs", probs, op)
    _checks.check_tensor("targets", targets, op)
    _checks.check_int("n_bins", n_bins, op, 1)
    if probs.dim() != 2:
        raise ValueError(f"{op}: probs must have shape [N, C], got {tuple(probs.shape)}")
    _checks.check_floating("probs", probs, op)
    if targets.dtype != torch.int64 or targets.dim() != 1 or targets.shape[0] != probs.shape[0]:
        raise ValueError(
            f"{op}: targets must be int64 [N] with N = {probs.shape[0]}, "
            f"got {targets.dtype} {tuple(targets.shape)}"
        )
    _checks.check_index_range("targets", targets, probs.shape[1], op, what="C classes")
    if probs.shape[0] == 0:
        raise ValueError(f"{op}: probs holds no examples")
    probs = probs.detach().to(torch.float64)
    # class probabilities, not logits: finite, in [0, 1], each row summing to one (float16 rounding allowed)
    if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()) or bool((probs > 1 + 1e-6).any()) \
            or bool(((probs.sum(1) - 1).abs() > 1e-3).any()):
        raise ValueError(f"{op}: probs must hold class probabilities (finite, in [0, 1], rows summing to 1); "
                         "pass softmax(logits), not logits")
    confidence, prediction = probs.max(dim=1)
    correct = (prediction == targets).to(torch.float64)
    # Bins (k/n, (k+1)/n], k = 0..n-1 (a confidence of exactly 0 goes to the first); inner edges k/n
    # computed as k/n in float64 so that a confidence of exactly 0.6 lands in (0.4, 0.6].
    inner = torch.arange(1, n_bins, dtype=torch.float64) / n_bins
    index = torch.bucketize(confidence, inner, right=False)
    count = torch.bincount(index, minlength=n_bins).to(torch.float64)
    conf_sum = torch.bincount(index, weights=confidence, minlength=n_bins)
    acc_sum = torch.bincount(index, weights=correct, minlength=n_bins)
    safe = count.clamp_min(1)
    return {
        "edges": torch.arange(0, n_bins + 1, dtype=torch.float64) / n_bins,
        "count": count,
        "confidence": torch.where(count > 0, conf_sum / safe, torch.full_like(count, float("nan"))),
        "accuracy": torch.where(count > 0, acc_sum / safe, torch.full_like(count, float("nan"))),
        "ece": ((acc_sum - conf_sum).abs().sum() / probs.shape[0]),
    }


def expected_calibration_error(probs: Tensor, targets: Tensor, n_bins: int = 15) -> float:
    """ECE (Guo et al., 2017) = sum_k (|B_k| / N) |acc(B_k) - conf(B_k)| over ``n_bins`` equal-width
    confidence bins (k/n, (k+1)/n], where the confidence is max_c probs[b, c] and the prediction its argmax.

    Args:
        probs: [N, C] predicted class probabilities.
        targets: [N] int64 in [0, C).
        n_bins: number of bins (15 as in Guo et al.).

    Returns:
        a float in [0, 1].
    """
    return float(_calibration_bins(probs, targets, n_bins, "expected_calibration_error")["ece"])


def reliability_diagram(probs: Tensor, targets: Tensor, n_bins: int = 15) -> Dict[str, List[float]]:
    """Data of a reliability diagram: per confidence bin, the mean confidence, the accuracy and the count.

    Returns:
        ``{"edges": [n_bins+1], "confidence": [n_bins], "accuracy": [n_bins], "count": [n_bins],
        "ece": float}``;
        empty bins have NaN confidence and accuracy. Plot accuracy against the bin centres (or the
        mean confidence); the diagonal is perfect calibration.
    """
    bins = _calibration_bins(probs, targets, n_bins, "reliability_diagram")
    out: Dict[str, List[float]] = {k: v.tolist() for k, v in bins.items() if k != "ece"}
    out["ece"] = float(bins["ece"])  # type: ignore[assignment]
    return out


# ----------------------------------------------------------------------------------------------
# networks
# ----------------------------------------------------------------------------------------------


def _check_module(name: str, value: object, where: str) -> nn.Module:
    if not isinstance(value, nn.Module):
        raise TypeError(f"{where}: {name} must be an nn.Module, got {type(value).__name__}")
    return value


def _check_blocks(blocks: Sequence[nn.Module], where: str) -> List[nn.Module]:
    if isinstance(blocks, nn.Module) and not isinstance(blocks, nn.ModuleList):
        raise TypeError(
            f"{where}: blocks must be a sequence of modules (one per residual block), got a single module"
        )
    blocks = list(blocks)
    for k, b in enumerate(blocks):
        _check_module(f"blocks[{k}]", b, where)
    return blocks


def _activations(input_block: nn.Module, blocks: Sequence[nn.Module], x: Tensor, depth: int) -> List[Tensor]:
    """[a_0, ..., a_depth] with a_0 = f_0(x), a_i = a_{i-1} + f_i(a_{i-1})."""
    acts = [input_block(x)]
    for i in range(depth):
        acts.append(acts[-1] + blocks[i](acts[-1]))
    return acts


def _apply_output_block(output_block: nn.Module, acts: List[Tensor], where: str) -> Tensor:
    """The output block on every activation in ONE call: [(d+1) * B, *feat] -> [d+1, B, C].

    One call instead of d+1: the head's matmul (or its pooling + MLP) runs once on a (d+1)-times
    taller batch. Caveat, knowingly: a BatchNorm inside the output block then normalises, in training
    mode, over the rows of every depth together, i.e. over the mixture a shared head serves.
    """
    stacked = torch.stack(acts, dim=0)
    n_depths, batch = stacked.shape[0], stacked.shape[1]
    out = output_block(stacked.flatten(0, 1))
    if out.dim() != 2 or out.shape[0] != n_depths * batch:
        raise ValueError(
            f"{where}: the output block must map [N, *features] to [N, C] logits, got {tuple(out.shape)} "
            f"for N = {n_depths * batch}"
        )
    return out.view(n_depths, batch, out.shape[1])


class LearntDepthNet(nn.Module):
    """A residual network of D blocks that predicts at every depth, with a learnt posterior over depth.

    ``a_0 = input_block(x)``, ``a_i = a_{i-1} + blocks[i-1](a_{i-1})``; the logits of depth i are
    ``output_block(a_i)``. :meth:`forward` returns all of them from one pass, the output block applied
    once to the stacked activations.

    Args:
        input_block: f_0, [B, *in] -> [B, *feat].
        blocks: D >= 1 residual functions f_1..f_D, [B, *feat] -> [B, *feat] (the skip is added here).
        output_block: f_{D+1}, [N, *feat] -> [N, C] logits (the softmax is applied by the losses).
        posterior: a :class:`DepthPosterior` with max_depth D; by default ``DepthPosterior(D)`` (geometric
            prior, gamma = 0.85, q uniform).

    Shapes:
        x: [B, *in]; ``forward(x)`` -> [D+1, B, C]; ``forward(x, max_depth=d)`` -> [d+1, B, C].
    """

    def __init__(
        self,
        input_block: nn.Module,
        blocks: Sequence[nn.Module],
        output_block: nn.Module,
        posterior: Optional[DepthPosterior] = None,
    ):
        super().__init__()
        where = "LearntDepthNet"
        _check_module("input_block", input_block, where)
        _check_module("output_block", output_block, where)
        blocks = _check_blocks(blocks, where)
        if not blocks:
            raise ValueError(
                f"{where}: blocks must hold at least one residual block (D >= 1), got none (D = 0)"
            )
        if posterior is None:
            posterior = DepthPosterior(len(blocks))
        elif not isinstance(posterior, DepthPosterior):
            raise TypeError(f"{where}: posterior must be a DepthPosterior, got {type(posterior).__name__}")
        elif posterior.max_depth != len(blocks):
            raise ValueError(
                f"{where}: posterior has max_depth {posterior.max_depth} but there are "
                f"D = {len(blocks)} blocks"
            )
        self.input_block = input_block
        self.blocks = nn.ModuleList(blocks)
        self.output_block = output_block
        self.posterior = posterior

    @property
    def max_depth(self) -> int:
        return len(self.blocks)

    def extra_repr(self) -> str:
        return f"max_depth={self.max_depth}"

    def _check_depth(self, depth: Optional[int], name: str, where: str) -> int:
        if depth is None:
            return self.max_depth
        _checks.check_int(name, depth, where, 0)
        if depth > self.max_depth:
            raise ValueError(f"{where}: {name} must be <= D = {self.max_depth}, got {depth}")
        return depth

    def forward(self, x: Tensor, max_depth: Optional[int] = None) -> Tensor:
        """Logits of every depth 0..d, [d+1, B, C]; only the first d = ``max_depth`` (default D) blocks
        run."""
        depth = self._check_depth(max_depth, "max_depth", "LearntDepthNet.forward")
        acts = _activations(self.input_block, self.blocks, x, depth)
        return _apply_output_block(self.output_block, acts, "LearntDepthNet.forward")

    def elbo(self, x: Tensor, targets: Tensor, dataset_size: int) -> Tensor:
        """:func:`elbo` of one forward pass over the mini-batch ``(x, targets)``."""
        return elbo(self(x), targets, self.posterior, dataset_size)

    def depth(self, rule: str = "95") -> int:
        """d_opt of the current posterior by ``rule`` (``"95"``, ``"expected"``, ``"argmax"``)."""
        return self.posterior.depth(rule)

    def log_predictive(self, x: Tensor, depth: Optional[int] = None) -> Tensor:
        """log p(y | x) of eq. 3 over depths <= ``depth`` (default D), running only ``depth`` blocks:
        [B, C]."""
        depth = self._check_depth(depth, "depth", "LearntDepthNet.log_predictive")
        return marginal_log_predictive(self(x, max_depth=depth), self.posterior.log_q(), depth)

    def predict(self, x: Tensor, depth: Optional[int] = None) -> Tensor:
        """p(y | x) of eq. 3, [B, C] (see :meth:`log_predictive`)."""
        return self.log_predictive(x, depth).exp()

    def prune(self, rule: str = "95", depth: Optional[int] = None) -> "LearntDepthNet":
        """A copy truncated to d_opt blocks (d_opt from ``rule``, or ``depth`` when given).

        The copy's forward runs d_opt blocks and returns [d_opt+1, B, C]; its posterior is
        q'(i) = q(i) for i < d_opt and q'(d_opt) = q(d >= d_opt) (section 2), so its :meth:`predict` is
        eq. 3. d_opt may be 0 (the input and output blocks only). Parameters are copied: training the
        copy leaves this network unchanged.
        """
        d = self.depth(rule) if depth is None else self._check_depth(depth, "depth", "LearntDepthNet.prune")
        out = copy.deepcopy(self)
        out.blocks = nn.ModuleList(list(out.blocks)[:d])
        out.posterior = self.posterior.pruned(d)
        return out


class ResNet(nn.Module):
    """The deterministic-depth baseline: the same blocks, a prediction from the last activation only.

    ``forward(x) = output_block(a_d)`` with d = len(blocks) >= 0 (d = 0 is the input block followed by
    the output block: a linear model for :class:`FCBlocks`).

    Shapes:
        x: [B, *in] -> [B, C]; :meth:`layer_logits` -> [d+1, B, C].
    """

    def __init__(self, input_block: nn.Module, blocks: Sequence[nn.Module], output_block: nn.Module):
        super().__init__()
        _check_module("input_block", input_block, "ResNet")
        _check_module("output_block", output_block, "ResNet")
        self.input_block = input_block
        self.blocks = nn.ModuleList(_check_blocks(blocks, "ResNet"))
        self.output_block = output_block

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def extra_repr(self) -> str:
        return f"depth={self.depth}"

    def forward(self, x: Tensor) -> Tensor:
        acts = _activations(self.input_block, self.blocks, x, self.depth)
        return self.output_block(acts[-1])

    def layer_logits(self, x: Tensor) -> Tensor:
        """The output block applied to every intermediate activation a_0..a_d, [d+1, B, C]: what each
        layer of a deterministic network computes (figure 3, bottom). Only the last is trained."""
        acts = _activations(self.input_block, self.blocks, x, self.depth)
        return _apply_output_block(self.output_block, acts, "ResNet.layer_logits")


# ----------------------------------------------------------------------------------------------
# the block families of appendix B
# ----------------------------------------------------------------------------------------------


class Residual(nn.Module):
    """x + fn(x)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = _check_module("fn", fn, "Residual")

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fn(x)


class PreActBottleneck(nn.Sequential):
    """The pre-activation bottleneck residual function of He et al. (2016), without its skip:
    BN-ReLU-conv1x1(C -> c), BN-ReLU-conv kxk(c -> c), BN-ReLU-conv1x1(c -> C), stride 1 ('same' padding).

    Shapes: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, channels: int = 64, bottleneck: int = 32, kernel_size: int = 3):
        _checks.check_int("channels", channels, "PreActBottleneck", 1)
        _checks.check_int("bottleneck", bottleneck, "PreActBottleneck", 1)
        _checks.check_int("kernel_size", kernel_size, "PreActBottleneck", 1)
        if kernel_size % 2 == 0:
            raise ValueError(f"PreActBottleneck: kernel_size must be odd (same padding), got {kernel_size}")
        super().__init__(
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, bottleneck, 1, bias=False),
            nn.BatchNorm2d(bottleneck),
            nn.ReLU(),
            nn.Conv2d(bottleneck, bottleneck, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(bottleneck),
            nn.ReLU(),
            nn.Conv2d(bottleneck, channels, 1, bias=False),
        )


def _fc_block(width: int) -> nn.Module:
    # Appendix B: a fully connected layer followed by ReLU and then BatchNorm (in that order).
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.BatchNorm1d(width))


class FCBlocks:
    """Appendix B's fully connected family (spirals): f_0 = Linear(in, w); f_i = Linear(w, w) -> ReLU ->
    BatchNorm1d(w); f_{D+1} = Linear(w, C). Depth 0 is a linear model. Default PyTorch initialisation."""

    def __init__(self, in_features: int, num_classes: int, width: int = 20):
        self.in_features = _checks.check_int("in_features", in_features, "FCBlocks", 1)
        self.num_classes = _checks.check_int("num_classes", num_classes, "FCBlocks", 1)
        self.width = _checks.check_int("width", width, "FCBlocks", 1)

    def __repr__(self) -> str:
        return f"FCBlocks(in_features={self.in_features}, num_classes={self.num_classes}, width={self.width})"

    def input_block(self) -> nn.Module:
        return nn.Linear(self.in_features, self.width)

    def block(self) -> nn.Module:
        return _fc_block(self.width)

    def output_block(self) -> nn.Module:
        return nn.Linear(self.width, self.num_classes)


class ConvBlocks:
    """Appendix B's CNN family (images).

    f_0 = Conv2d(in, C_out, 5x5, 'same' padding) -> AvgPool2d(2); f_i = :class:`PreActBottleneck`
    (C_out = 64 outer, 32 inner channels, 3x3; no further down-sampling); f_{D+1} = global average
    pool -> fully connected residual block (x + BatchNorm(ReLU(Linear(x)))) -> Linear(C_out, classes).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 64,
        bottleneck: int = 32,
        kernel_size: int = 3,
    ):
        self.in_channels = _checks.check_int("in_channels", in_channels, "ConvBlocks", 1)
        self.num_classes = _checks.check_int("num_classes", num_classes, "ConvBlocks", 1)
        self.channels = _checks.check_int("channels", channels, "ConvBlocks", 1)
        self.bottleneck = _checks.check_int("bottleneck", bottleneck, "ConvBlocks", 1)
        self.kernel_size = _checks.check_int("kernel_size", kernel_size, "ConvBlocks", 1)

    def __repr__(self) -> str:
        return (
            f"ConvBlocks(in_channels={self.in_channels}, num_classes={self.num_classes}, "
            f"channels={self.channels}, "
            f"bottleneck={self.bottleneck}, kernel_size={self.kernel_size})"
        )

    def input_block(self) -> nn.Module:
        return nn.Sequential(nn.Conv2d(self.in_channels, self.channels, 5, padding=2), nn.AvgPool2d(2))

    def block(self) -> nn.Module:
        return PreActBottleneck(self.channels, self.bottleneck, self.kernel_size)

    def output_block(self) -> nn.Module:
        return nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            Residual(_fc_block(self.channels)),
            nn.Linear(self.channels, self.num_classes),
        )


Family = Union[FCBlocks, ConvBlocks]


def learnt_depth_net(
    family: Family, max_depth: int, prior: PriorLike = "geometric", gamma: float = 0.85
) -> LearntDepthNet:
    """A :class:`LearntDepthNet` of ``max_depth`` fresh blocks of ``family``, with a
    :class:`DepthPosterior`."""
    _checks.check_int("max_depth", max_depth, "learnt_depth_net", 1)
    posterior = DepthPosterior(max_depth, prior=prior, gamma=gamma)
    blocks = [family.block() for _ in range(max_depth)]
    return LearntDepthNet(family.input_block(), blocks, family.output_block(), posterior)


def resnet(family: Family, depth: int) -> ResNet:
    """The deterministic baseline: a :class:`ResNet` of ``depth`` >= 0 fresh blocks of ``family``."""
    _checks.check_int("depth", depth, "resnet", 0)
    return ResNet(family.input_block(), [family.block() for _ in range(depth)], family.output_block())
