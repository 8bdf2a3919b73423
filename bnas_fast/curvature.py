"""Per-filter Gauss-Newton (GGN) blocks of a network's layers (BayesNAS, seed 003; issue 6).

    with bnas_fast.curvature.GGNBlocks(model) as curvature:
        logits = model(x)
    blocks = curvature.compute(logits, mode="exact")     # {layer name: [C_out, D', D']}

For the summed softmax cross-entropy with the model's own predictive p (the GGN does not use the
labels), the GGN is G = sum_n J_n^T (diag(p_n) - p_n p_n^T) J_n. Written with its square-root
factors v_{n,k} (sum_k v v^T = diag(p) - p p^T; :func:`bnas_fast.reference.softmax_ce_hessian_factors`),
the block of the parameters of one output channel o of a layer is

    G_o = sum_n sum_k j_{n,k,o} j_{n,k,o}^T,   j_{n,k,o} = d(v_{n,k}^T f_n) / d theta_o,

and j is the unfolded layer input weighted by the factor back-propagated to the layer's output
(:func:`bnas_fast.unfolded_gram`). ``mode="mc"`` uses one sampled factor per example (an unbiased
estimate); ``mode="exact"`` C - 1 (the rank of the softmax Hessian), which give the exact blocks.

Supported layers, and what a block is:

* ``nn.Conv2d`` (any stride, padding, dilation and groups; zero padding, "valid" and even "same") and ``nn.Linear``: the
  weights of filter o, flattened as ``weight[o].flatten()``, then ``bias[o]``: [C_out, D', D'].
  A Linear layer may take [N, *, F] inputs: an example's gradient sums over its positions.
* ``nn.BatchNorm1d/2d`` with affine parameters: (weight[c], bias[c]) of channel c: [C, 2, 2]. In
  eval mode the normalised input uses the running statistics; in train mode the batch statistics,
  and then every example's output depends on every other example's input: the factors are
  back-propagated per (example, factor) over the whole batch (N K backward passes, batched in
  chunks that ``max_factor_bytes`` bounds), and every layer's blocks sum over all examples'
  contributions. That is exact, and slower: its work grows as N^2.
  ``GGNBlocks(model, batch_norm_path="statistics")`` is exact as well and grows as N: the batch
  statistics become leaves, and 2 C cotangents per BatchNorm add their effect (class docstring).
* :class:`Switch` (a scalar gate y = s x, BayesNAS's architecture parameters): [1, 1, 1], the
  switch Hessian H_s = sum_{n,k} (sum x * S)^2 of notes section 2.1.

Examples that interact: the fast path back-propagates each factor for all examples at once, which
is exact only while no example's logits depend on another example's layer outputs. Batch
statistics break that (train-mode BatchNorm, bnas_fast's ghost and architecture-conditional batch
norms, ``x - x.mean(0)``): ``compute`` finds them in the autograd graph, or else by one probe
pass, and then takes the exact per-(example, factor) path (``couples_examples`` to decide yourself).

In-place operations: each recorded layer hands the rest of the model a copy of its output, so a
later ``ReLU(inplace=True)`` or ``out += identity`` does not change the output whose factors are
taken; a layer input changed in place after the layer ran is refused (``RuntimeError``). A frozen
layer (no parameter requires a gradient) still gets its blocks.

A module that has parameters of its own and is none of these raises ``TypeError`` naming it, when
the context is entered (never silently skipped); so does a subclass of one of them that overrides
``forward`` or holds other parameters (its blocks would be the plain layer's). Every recorded
layer must run once, on the N examples of the logits along its first dimension, with a weight
and bias of its own that nothing else uses; ``compute`` raises otherwise (a folded or
sequence-first batch, tied weights). ``GGNBlocks(model, layers=[...])`` computes the
blocks of the named layers only (each must be supported; the others may be anything
differentiable), with the same values and without the other layers' Gram products.
Parameter-free modules (ReLU, pooling, reshapes) need nothing: autograd carries the factors
through them.

:func:`diagonal_recursion_hessians` (``diagonal_recursion_hessians(model, x)``, its own forward pass)
is the cheaper curvature of BayesNAS's code (notes section 2.1): the diagonal of the pre-activation
Gauss-Newton back-propagated from the loss through squared-Jacobian products, truncated to its
diagonal at every layer; it returns the same layout as ``compute(..., diagonal=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from bnas_fast import _checks, reference
from bnas_fast.ops.rank_one import rank_one_conv_input_grad, rank_one_split
from bnas_fast.ops.unfolded_gram import unfolded_gram

__all__ = ["GGNBlocks", "Switch", "SUPPORTED", "diagonal_recursion_hessians", "DIAG_RECURSION_LAYERS", "MAX_FACTOR_BYTES"]


class Switch(nn.Module):
    """y = s x with a learnable scalar s (initialised to 1): a BayesNAS architecture switch."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * x


SUPPORTED = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, Switch)


@dataclass
class _Record:
    name: str
    module: nn.Module
    input: Optional[Tensor] = None  # detached layer input
    input_version: int = 0  # its version counter when the layer ran (in-place changes are refused)
    graph_input: Optional[Tensor] = None  # the layer input itself, in the graph (the rank-one route starts there)
    output: Optional[Tensor] = None  # layer output, in the graph; the model goes on with a copy
    node: object = None  # the autograd node of that copy: how the logits reach this layer
    calls: int = 0  # forward calls since the context was entered
    batch_stats: bool = False  # a BatchNorm that normalised with batch statistics when it ran
    running: Optional[Tuple[Tensor, Tensor]] = None  # otherwise a copy of the running statistics it used


@dataclass
class _LeafNorm:
    """A BatchNorm that normalised with batch statistics inside a context with
    ``batch_norm_path="statistics"``: its statistics enter the model as leaves."""

    name: str
    module: nn.Module
    stats: Optional[Tensor] = None  # [2 C]: mean and biased variance of its input, in the graph
    leaves: Optional[Tuple[Tensor, Tensor]] = None  # per-example copies [N, C] of both, leaves
    buffers_before: Optional[Dict[str, Tensor]] = None  # its running statistics before the context's pass (restored on refusal)


#: Default bound on the bytes of back-propagated factors held at once (GGNBlocks.compute).
MAX_FACTOR_BYTES = 2**27

#: How GGNBlocks takes train-mode BatchNorm (class docstring).
BATCH_NORM_PATHS = ("pairs", "statistics")


def _accumulate(sums: Dict[str, Tensor], name: str, part: Tensor) -> None:
    """sums[name] += part (part itself the first time: every part is a fresh tensor)."""
    if name in sums:
        sums[name].add_(part)
    else:
        sums[name] = part


#: Autograd nodes of normalisations with batch statistics (NativeBatchNormBackward0 too, when it
#: normalised with them): every example's output then depends on every example's input.
_BATCH_STATISTICS_NODES = frozenset({"_ArchBatchNormFunctionBackward", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0"})


def _has_batch_statistics(nodes: set) -> bool:
    """Whether any of these autograd nodes normalises with batch statistics. InstanceNorm runs
    batch_norm on a batch of one ([1, N C, ...]): per example, no coupling."""
    return any(
        type(node).__name__ in _BATCH_STATISTICS_NODES
        or (type(node).__name__ == "NativeBatchNormBackward0" and bool(getattr(node, "_saved_training", False))
            and _batch_size_of_saved_input(node) != 1)
        for node in nodes
    )


def _batch_size_of_saved_input(node) -> Optional[int]:
    """The batch size a batch_norm node normalised over; None when its saved input is gone (a
    graph already back-propagated), which then counts as coupling."""
    try:
        return node._saved_input.shape[0]
    except RuntimeError:
        return None


#: Registry of BatchNorm modules (by id) under a leaf hook of an entered
#: ``GGNBlocks(batch_norm_path="statistics")``: a second such context would replace the first's leaves.
_LEAF_HOOKED: set = set()


def _tolerance(dtype: torch.dtype) -> float:
    """Agreement expected between a BatchNorm's output and its recomputation from the leaves."""
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 3e-2)


def _conv_padding(m: nn.Conv2d, where: str, label: str) -> Tuple[int, int]:
    """The Conv2d's zero padding as two ints: "valid" is 0; "same" is dilation (k - 1) / 2 per
    side where that is whole (stride 1; PyTorch pads unevenly for the rest, which is not supported)."""
    if m.padding_mode != "zeros":
        raise TypeError(f"{where}: layer {label!r}: only zero padding is supported, got padding_mode={m.padding_mode!r}")
    if m.padding == "valid":
        return (0, 0)
    if m.padding == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        if any(t % 2 for t in total):
            raise TypeError(f"{where}: layer {label!r}: padding='same' with kernel_size={m.kernel_size} and "
                            f"dilation={m.dilation} pads unevenly, which is not supported; pad explicitly")
        return (total[0] // 2, total[1] // 2)
    return tuple(m.padding)


def _graph_nodes(root, stop=None) -> set:
    """Every autograd node that ``root`` reaches (root included; empty for None), without going
    through the node ``stop`` (which is left out)."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node is stop or node in seen:
            continue
        seen.add(node)
        stack.extend(child for child, _ in node.next_functions)
    return seen


def _batch_norm_input(module: nn.modules.batchnorm._BatchNorm, x: Tensor, batch_stats: bool) -> Tensor:
    """x normalised as the module normalised it: with batch statistics (``batch_stats``, recorded
    when it ran: training, or no running statistics) or the running ones."""
    dims = [0] + list(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if batch_stats:
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
    else:
        mean, var = module.running_mean, module.running_var
    return (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + module.eps)


class GGNBlocks:
    """Records the supported layers' inputs and outputs during a forward pass, then computes every
    layer's per-output-channel GGN blocks (module docstring).

    Args:
        model: the network; its logits must be the output passed to :meth:`compute`.
        layers: the layers whose blocks to compute, as modules of ``model`` or their names (as in
            ``model.named_modules()``); by default every module with parameters of its own. Each
            one must be supported; the other layers of the model can be anything differentiable
            (the factors pass through them). The factors' backward pass through the whole network
            is paid either way; the blocks of the layers left out are not (BayesNAS needs only its
            switches: half the time per batch).
        batch_norm_path: how BatchNorm layers that normalise with batch statistics (train mode)
            are taken, both exact. "pairs" (the default) back-propagates every (example, factor)
            pair over the whole batch: N K cotangents, work growing as N^2, and right for any
            operation that couples examples. "statistics" makes each such BatchNorm's batch mean
            and variance leaves of the graph (per-example copies) and adds their effect from
            2 C cotangents per BatchNorm: K + 2 sum C cotangents in all, work growing as N (about
            4x faster on ``benchmarks/curvature_chunks.py``'s network at batch 32, README). It
            needs BatchNorm to be the only thing that couples examples, and refuses otherwise
            (``couples_examples=False`` skips that check). It back-propagates fewer cotangents
            when 2 sum C < (N - 1) K, but each factor also holds every layer's per-example rows
            (N C_out D' numbers in double), which ``max_factor_bytes`` counts: wide layers cost
            more than the count of cotangents says.
        rank_one_backward: whether the factors may cross one convolution with
            :func:`bnas_fast.rank_one_conv_input_grad` instead of autograd (the default; the same
            values up to rounding). At the last convolution of most classifiers (followed only by
            elementwise operations, a global average pool and Linear layers) the K factors of each
            (example, output channel) are K scalings of one map, so the transposed convolution that
            carries them to the convolution's input can convolve each map once instead of K times.
            ``compute`` takes that route at the last recorded Conv2d of stride 1 whose input reaches
            the logits only through it (no skip connection around it, a weight and bias that are
            parameters, not computed) and that has recorded layers before it, when the factors
            there prove to be of rank one; otherwise, and with False,
            autograd carries the factors all the way. A backward pass of fewer than
            ``RANK_ONE_MIN_COTANGENTS`` cotangents (4: Monte Carlo mode's one factor and the
            probe, or small chunks) keeps autograd: with 1 to 3 the split and the op cost about as
            much as ATen's transposed convolution or more (README). After each ``compute``,
            ``last_route`` names the layer where the route was taken (None if it was not).
    """

    #: Fewest cotangents per backward pass for which the rank-one route pays (rank_one_backward).
    RANK_ONE_MIN_COTANGENTS = 4

    def __init__(
        self, model: nn.Module, layers: Optional[Iterable[Union[str, nn.Module]]] = None, batch_norm_path: str = "pairs",
        rank_one_backward: bool = True,
    ):
        if batch_norm_path not in BATCH_NORM_PATHS:
            raise ValueError(f"GGNBlocks: batch_norm_path must be one of {BATCH_NORM_PATHS}, got {batch_norm_path!r}")
        self.model = model
        self.batch_norm_path = batch_norm_path
        if not isinstance(rank_one_backward, bool):
            raise TypeError(f"GGNBlocks: rank_one_backward must be a bool, got {rank_one_backward!r}")
        self.rank_one_backward = rank_one_backward
        self.last_route: Optional[str] = None  # the layer where compute's last call took the rank-one route, if any
        self.records: List[_Record] = []
        self._handles: list = []
        self._norms = [
            _LeafNorm(name or type(m).__name__, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ] if batch_norm_path == "statistics" else []
        self._norm_order: List[_LeafNorm] = []  # the norms that used batch statistics, in forward order
        selected = None if layers is None else self._select(model, layers)
        for name, module in model.named_modules():
            if selected is None:
                if not list(module.parameters(recurse=False)):
                    continue
            elif id(module) not in selected:
                continue
            if not isinstance(module, SUPPORTED):
                raise TypeError(
                    f"GGNBlocks: layer {name!r} ({type(module).__name__}) "
                    + ("has parameters but " if selected is None else "")
                    + f"is not supported; supported: {', '.join(t.__name__ for t in SUPPORTED)}"
                    + ("" if selected is None else " (or leave it out of `layers`)")
                )
            self._check_plain(name, module)
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.affine:
                raise TypeError(f"GGNBlocks: layer {name!r} ({type(module).__name__}) has no affine parameters "
                                "(affine=False), so it has no blocks; leave it out of `layers`")
            if isinstance(module, nn.Conv2d):
                _conv_padding(module, "GGNBlocks", name)  # raises for what is not supported
            self.records.append(_Record(name or type(module).__name__, module))

    @staticmethod
    def _check_plain(name: str, module: nn.Module, types: Tuple[type, ...] = SUPPORTED, where: str = "GGNBlocks",
                     leave_out: str = "or leave the layer out of `layers`") -> None:
        """A supported layer must compute what its class does: the blocks are built from its input
        as that class uses it. A subclass that overrides ``forward`` (a weight-standardised
        convolution), a ``forward`` replaced on the instance, or parameters besides weight and
        bias (a LoRA Linear) would get the blocks of the plain layer, wrong and silently; they
        raise instead. A weight computed from other parameters before the layer runs, by
        ``torch.nn.utils.parametrize`` or the older ``weight_norm`` and ``spectral_norm`` hooks,
        is fine: the blocks are those of the computed weight."""
        base = next(t for t in types if isinstance(module, t))
        overridden = [method for method in ("forward", "_conv_forward")
                      if hasattr(base, method) and getattr(type(module), method) is not getattr(base, method)]
        overridden += [f"{method} (on the instance)" for method in ("forward", "_conv_forward") if method in vars(module)]
        computed = set()  # the parameters that the older weight_norm / spectral_norm hooks compute the weight from
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                computed |= {hook.name + "_g", hook.name + "_v"}
            elif isinstance(hook, SpectralNorm):
                computed.add(hook.name + "_orig")
        extra = [p for p, _ in module.named_parameters(recurse=False) if p not in ("weight", "bias") and p not in computed]
        if overridden or extra:
            what = f"overrides {', '.join(overridden)}" if overridden else f"has parameters {extra} besides weight and bias"
            raise TypeError(f"{where}: layer {name!r} ({type(module).__name__}, a {base.__name__}) {what}, so its "
                            f"curvature would be that of a plain {base.__name__}: not supported (use {base.__name__} "
                            f"itself, {leave_out})")

    @staticmethod
    def _select(model: nn.Module, layers: Iterable[Union[str, nn.Module]]) -> Dict[int, nn.Module]:
        """{id: module} of ``layers``, each checked to be a module of ``model``."""
        if isinstance(layers, (str, nn.Module)):
            raise TypeError(f"GGNBlocks: layers must be an iterable of modules or names, got a single {type(layers).__name__}")
        by_name = dict(model.named_modules())
        ids = {id(m) for m in by_name.values()}
        selected: Dict[int, nn.Module] = {}
        for layer in layers:
            if isinstance(layer, str):
                if layer not in by_name:
                    raise ValueError(f"GGNBlocks: layers: the model has no module named {layer!r}")
                layer = by_name[layer]
            elif not isinstance(layer, nn.Module):
                raise TypeError(f"GGNBlocks: layers must hold modules or names, got {type(layer).__name__}")
            elif id(layer) not in ids:
                raise ValueError(f"GGNBlocks: layers: {type(layer).__name__} module {layer!r} is not a module of the model")
            selected[id(layer)] = layer
        if not selected:
            raise ValueError("GGNBlocks: layers is empty: name at least one layer, or pass None for every layer")
        return selected

    def __enter__(self) -> "GGNBlocks":
        if self._handles:
            raise RuntimeError("GGNBlocks: this context is already entered (it cannot be nested in itself)")
        taken = [norm.name for norm in self._norms if id(norm.module) in _LEAF_HOOKED]
        if taken:
            raise RuntimeError(f"GGNBlocks: BatchNorms {taken} are already under another entered GGNBlocks with "
                               "batch_norm_path='statistics'; two such contexts cannot share a BatchNorm")
        _LEAF_HOOKED.update(id(norm.module) for norm in self._norms)
        # Before the records' hooks: a BatchNorm that is also a recorded layer hands its record the
        # output computed from the leaves.
        self._norm_order = []
        for norm in self._norms:
            norm.stats, norm.leaves, norm.buffers_before = None, None, None
            self._handles.append(norm.module.register_forward_pre_hook(self._snapshot_hook(norm)))
            self._handles.append(norm.module.register_forward_hook(self._leaf_hook(norm), with_kwargs=True))
        for record in self.records:
            record.input, record.output, record.node, record.calls, record.graph_input = None, None, None, 0, None
            self._handles.append(record.module.register_forward_hook(self._hook(record), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for norm in self._norms:
            norm.buffers_before = None
        _LEAF_HOOKED.difference_update(id(norm.module) for norm in self._norms)

    @staticmethod
    def _hook(record: _Record):
        def hook(module, args, kwargs, output):
            x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
            if not isinstance(x, Tensor) or not isinstance(output, Tensor):
                raise TypeError(f"GGNBlocks: layer {record.name!r} must take a tensor and return one")
            record.input, record.input_version, record.graph_input = x.detach(), x._version, x
            record.batch_stats = isinstance(module, nn.modules.batchnorm._BatchNorm) and (
                module.training or not module.track_running_stats)
            record.running = None
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not record.batch_stats:
                # A training pass before compute would change them in place, and autograd's own
                # backward through this BatchNorm reads them then. Their version counters do not
                # tell (the CPU kernel updates them through raw pointers): compute compares copies
                # (C values each).
                record.running = (module.running_mean.detach().clone(), module.running_var.detach().clone())
            if not output.requires_grad:
                # A frozen layer whose input needs no gradient (e.g. a frozen first layer): its
                # output becomes a leaf that requires one, so that the factors can reach it.
                output = output.detach().requires_grad_(True)
            record.output = output
            record.calls += 1
            # The model goes on with a copy. An in-place operation after the layer (ReLU(inplace=True),
            # ``out += identity``) then changes the copy, not the output whose factors we need.
            copy = output.clone()
            record.node = copy.grad_fn
            return copy

        return hook

    @staticmethod
    def _snapshot_hook(norm: _LeafNorm):
        """Copies a training BatchNorm's running statistics the first time it runs in the context
        (C values each), so that a refusal can put back what the refused forward pass changed."""

        def hook(module, args):
            if norm.buffers_before is None and module.training and module.track_running_stats:
                norm.buffers_before = {name: b.clone() for name, b in module.named_buffers(recurse=False)
                                       if b is not None}

        return hook

    def _refuse(self, error: Exception) -> Exception:
        """Puts back the running statistics that the context's BatchNorms updated in the refused
        forward pass (the model is left as before it), and returns the error."""
        with torch.no_grad():
            for norm in self._norms:
                for name, b in norm.module.named_buffers(recurse=False):
                    if norm.buffers_before is not None and name in norm.buffers_before:
                        b.copy_(norm.buffers_before[name])
                norm.buffers_before = None
        return error

    def _leaf_hook(self, norm: _LeafNorm):
        """batch_norm_path="statistics": a BatchNorm that normalises with batch statistics returns
        instead weight (x - mu[n]) / sqrt(var[n] + eps) + bias with mu, var per-example leaf copies
        of the batch mean and biased variance (the same values: the output is unchanged). The
        statistics computed from x stay in the graph, off the path to the logits, for the basis
        passes of compute. The module's own forward already ran and updated its running statistics
        (put back, with those of the pass's earlier BatchNorms, if the hook refuses the module)."""

        def hook(module, args, kwargs, output):
            if not (module.training or not module.track_running_stats):
                return None  # running statistics: nothing couples the examples
            if norm.stats is not None:
                raise self._refuse(RuntimeError(
                    f"GGNBlocks: BatchNorm {norm.name!r} ran more than once inside the context (shared by two places, "
                    "or a second forward pass); run exactly one forward pass per context"))
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
            N, C = x.shape[:2]
            acc = torch.promote_types(x.dtype, torch.float32)
            xa = x.to(acc)
            dims = [0] + list(range(2, x.dim()))
            mean, var = xa.mean(dims), xa.var(dims, unbiased=False)
            norm.stats = torch.cat([mean, var])
            mu, sigma2 = (t.detach().expand(N, C).clone().requires_grad_(True) for t in (mean, var))
            norm.leaves = (mu, sigma2)
            # x * scale + shift with [N, C] scale and shift: a cheaper backward than (x - mu) / sqrt(.)
            scale = torch.rsqrt(sigma2 + module.eps)
            if module.weight is not None:
                scale = scale * module.weight.to(acc)
            shift = -mu * scale
            if module.bias is not None:
                shift = shift + module.bias.to(acc)
            shape = (N, C) + (1,) * (x.dim() - 2)
            y = (xa * scale.reshape(shape) + shift.reshape(shape)).to(x.dtype)
            # The leaves stand for a plain BatchNorm: a subclass that computes something else, or an
            # earlier forward hook that changed the output, would get the wrong blocks silently.
            if not isinstance(output, Tensor) or output.shape != y.shape or output.dtype != y.dtype or not torch.allclose(
                    y, output, rtol=_tolerance(output.dtype), atol=_tolerance(output.dtype)):
                raise self._refuse(ValueError(
                    f"GGNBlocks: BatchNorm {norm.name!r} ({type(module).__name__}) returned something other than "
                    "BatchNorm of its input (a subclass or a forward hook?); batch_norm_path='statistics' needs "
                    "plain BatchNorm: use batch_norm_path='pairs'"))
            self._norm_order.append(norm)
            return y

        return hook

    def compute(
        self, logits: Tensor, mode: str = "exact", generator: Optional[torch.Generator] = None, diagonal: bool = False,
        max_factor_bytes: int = MAX_FACTOR_BYTES, couples_examples: Optional[bool] = None,
    ) -> Dict[str, Tensor]:
        """{layer name: blocks} for the last forward pass; ``mode`` "exact" or "mc". With
        ``diagonal`` only the blocks' diagonals ([C_out, D']; the exact diagonal GGN, as BackPACK's
        DiagGGNExact, without the Gram products).

        ``max_factor_bytes`` bounds the memory of the back-propagated factors. Each factor (one
        cotangent of the logits, back-propagated) fills a tensor the size of every recorded layer's
        output, and holding all K of them at once (N K with train-mode BatchNorm) can take
        gigabytes. They are back-propagated in chunks of at most ``max_factor_bytes`` (at least one
        factor per chunk), and each layer's blocks are summed over the chunks: the same blocks up to
        the order of the sums. Peak memory is then about 2 to 3 times ``max_factor_bytes`` above the forward pass's
        (autograd's intermediate gradients). With the default, 128 MiB, a train-mode BatchNorm
        network at batch 32 took 0.73x to 1.10x the time of one pass over all N K factors, at a
        sixth to a tenth of its memory (``python benchmarks/curvature_chunks.py``; README and
        docs/measurements/curvature.md).

        ``couples_examples`` says whether an example's logits depend on other examples' layer
        outputs (batch statistics). The fast path back-propagates factor k of every example in one
        pass, which is exact only when they do not; otherwise every (example, factor) pair goes
        back on its own, over the whole batch (module docstring). None (the default) decides:
        coupled if the logits' autograd graph holds a batch-statistics normalisation (BatchNorm in
        train mode or without running statistics, bnas_fast's arch_batch_norm and fused
        GhostBatchNorm2d); otherwise a probe tells: a cotangent on one example (``_probe``),
        back-propagated with the first chunk of factors (one cotangent more, about 1/K of their
        backward pass: 4% to 6% of the time on issue 6's network in exact mode, but 28% in "mc"
        mode, whose single factor the probe doubles), must reach no other example. It catches the
        plain GhostBatchNorm2d, ``x - x.mean(0)``, mixing with neighbouring examples, ``x.flip(0)``
        mixup, and any other coupling that carries the probed example's gradient to another
        example; a coupling that leaves that one example alone (a random pairing that pairs it
        with itself; at N = 3, a cumulative sum over the batch) escapes it. Pass True or False to
        skip the probe when you know."""
        self.last_route = None
        if not isinstance(diagonal, bool):
            raise TypeError(f"GGNBlocks.compute: diagonal must be a bool, got {diagonal!r}")
        if couples_examples is not None and not isinstance(couples_examples, bool):
            raise ValueError(f"GGNBlocks.compute: couples_examples must be None, True or False, got {couples_examples!r}")
        if isinstance(max_factor_bytes, bool) or not isinstance(max_factor_bytes, int) or max_factor_bytes < 1:
            raise ValueError(f"GGNBlocks.compute: max_factor_bytes must be a positive int (bytes), got {max_factor_bytes!r}")
        if mode not in ("exact", "mc"):
            raise ValueError(f"GGNBlocks.compute: mode must be 'exact' or 'mc', got {mode!r} (BayesNAS's truncated "
                             "diagonal recursion is diagonal_recursion_hessians(model, x): it needs its own forward pass)")
        missing = [r.name for r in self.records if r.output is None]
        if missing:
            raise RuntimeError(f"GGNBlocks.compute: no forward pass recorded for {missing}; run the model inside the context first")
        shared = [f"{r.name} ({r.calls} times)" for r in self.records if r.calls > 1]
        if shared:
            raise RuntimeError(
                f"GGNBlocks.compute: layers ran more than once inside the context: {shared}; run exactly one forward "
                "pass per context (a layer applied twice in one pass, i.e. weight sharing, is not supported; with "
                "activation checkpointing, call compute after the with block, where recomputation is not recorded)"
            )
        if logits.dim() != 2 or not logits.requires_grad:
            raise ValueError(f"GGNBlocks.compute: logits must be the model's [N, C] output (in the autograd graph), got {tuple(logits.shape)}")
        if not _checks.all_finite(logits):
            raise ValueError("GGNBlocks.compute: the logits contain NaN or infinity")
        for r in self.records:
            if r.input._version != r.input_version:
                raise RuntimeError(
                    f"GGNBlocks.compute: the input of layer {r.name!r} was modified in place after the layer ran, so "
                    "its recorded value is no longer the one the layer saw; avoid the in-place operation on it"
                )
            if not _checks.all_finite(r.input):
                raise ValueError(f"GGNBlocks.compute: the input of layer {r.name!r} contains NaN or infinity")
            if r.running is not None and not (torch.equal(r.running[0], r.module.running_mean)
                                              and torch.equal(r.running[1], r.module.running_var)):
                raise RuntimeError(
                    f"GGNBlocks.compute: the running statistics of BatchNorm {r.name!r} changed after it ran in eval "
                    "mode (a training pass in between?); both its blocks and autograd's backward through it would "
                    "use the new values: run the forward pass again inside the context")
        reached = _graph_nodes(logits.grad_fn)
        if not any(r.node in reached for r in self.records):
            raise ValueError(
                "GGNBlocks.compute: the logits do not depend on any layer output recorded in the context (a tensor "
                "from another forward pass?); pass the output of the forward pass run inside the context"
            )
        self._check_example_dimension(logits.shape[0])
        self._check_unshared_parameters(reached)
        # exact: C - 1 factors per example (the Hessian's rank), not C: a tenth less work at C = 10
        v = reference.softmax_ce_hessian_factors(logits.detach(), mode, generator, minimal=True)  # [N, K, C]
        outputs = [r.output for r in self.records]
        # One back-propagated factor (a cotangent of the logits) fills one tensor per recorded output.
        per_factor = sum(out.numel() * out.element_size() for out in outputs)
        chunk = max(1, max_factor_bytes // max(per_factor, 1))
        if self._norm_order:
            # each factor of this path also holds every layer's per-example rows, in double (and float32)
            rows = sum(logits.shape[0] * c_out * width * 12 for c_out, width in map(self._row_shape, self.records))
            chunk = max(1, max_factor_bytes // max(per_factor + rows, 1))
            return self._statistics_path(logits, v, outputs, chunk, diagonal, reached, couples_examples)
        # The pairs path sums each layer's rows in float32 at least: with half-precision outputs
        # one layer's factors are also held as a float32 copy.
        float32_copy = max((out.numel() * 4 for out in outputs if out.element_size() < 4), default=0)
        coupled_chunk = max(1, max_factor_bytes // max(per_factor + float32_copy, 1))
        if couples_examples is None and _has_batch_statistics(reached):
            couples_examples = True
        if couples_examples:
            return self._coupled(logits, v, outputs, coupled_chunk, diagonal)
        # No coupling between examples (yet known, or to be probed): back-propagating factor k of
        # every example at once gives every example's factor k. The K factors go through batched
        # backward passes of up to ``chunk`` factors; the blocks are sums over factors, so over
        # chunks too. The probe rides along in the first pass (one cotangent more).
        probe = self._probe(logits) if couples_examples is None else None
        cut = self._rank_one_cut(logits)
        K = v.shape[1]
        blocks: Dict[str, Tensor] = {}
        for k0 in range(0, K, chunk):
            cotangents = v[:, k0:k0 + chunk].movedim(1, 0)  # [R, N, C]
            real = cotangents.shape[0]
            if probe is not None:
                cotangents = torch.cat([cotangents, probe[0]])
            compressed = None  # the cut layer's factors compressed to one per example, when the route was taken
            if cut is None or cotangents.shape[0] < self.RANK_ONE_MIN_COTANGENTS:
                grads = self._batched_grads(logits, outputs, cotangents)
            else:
                grads, compressed = self._rank_one_grads(logits, outputs, cotangents, cut, real)
                if compressed is None:  # not of rank one: the later chunks will not be either
                    cut = None
                else:
                    self.last_route = cut[0].name
            if probe is not None:
                if any(self._probe_reached_others(g[-1], probe[1]) for g in grads):
                    self.last_route = None
                    return self._coupled(logits, v, outputs, coupled_chunk, diagonal)
                grads, probe = [g[:-1] for g in grads], None
            # [R, N, *out] handed on as [N, R, *out] views, which unfolded_gram reads in place
            for r, g in zip(self.records, grads):
                factors = compressed if compressed is not None and r is cut[0] else g.movedim(0, 1)
                _accumulate(blocks, r.name, self._blocks(r, factors, diagonal))
        return blocks

    #: The batched inputs each supported layer takes (fewest and most dimensions): the example
    #: index first, then its features.
    _INPUT_DIMS = ((nn.Conv2d, 4, 4, "[N, C_in, H, W]"), (nn.Linear, 2, None, "[N, *, F]"),
                   (nn.modules.batchnorm._BatchNorm, 2, None, "[N, C, *]"), (Switch, 1, None, "[N, *]"))

    def _check_example_dimension(self, N: int) -> None:
        """Every recorded layer must have run on the N examples of the logits along its first
        dimension: the blocks sum per-example products over that dimension. A layer run on a
        folded batch ([T N, ...], two views of each example stacked as one batch), on a
        sequence-first [T, N, F] tensor or on tensors that are not per example (class
        prototypes) has no per-example factors there, and its blocks would be wrong."""
        for r in self.records:
            _, fewest, most, shape = next(k for k in self._INPUT_DIMS if isinstance(r.module, k[0]))
            if r.input.dim() < fewest or (most is not None and r.input.dim() > most):
                raise ValueError(f"GGNBlocks.compute: layer {r.name!r} ({type(r.module).__name__}) ran on an input of "
                                 f"shape {tuple(r.input.shape)}; it needs a batched input {shape}")
            if r.output.shape[0] != N:
                raise ValueError(
                    f"GGNBlocks.compute: layer {r.name!r} ({type(r.module).__name__}) ran on a batch of "
                    f"{r.output.shape[0]} rows but the logits have N = {N} examples; every recorded layer must run on "
                    "the examples along its first dimension (not on a folded batch, a sequence-first tensor or "
                    "tensors that are not per example): leave it out of `layers`, or reshape its input to [N, ...]")

    def _check_unshared_parameters(self, reached: set) -> None:
        """Each recorded layer's weight and bias must be its own and used once, by the layer: the
        blocks are those of the layer's own use of them. Tied weights (``b.weight = a.weight``,
        found by identity anywhere in the model, frozen or not, through a parametrization's
        ``original`` too) or a layer's weight used again elsewhere (``F.linear(h, layer.weight)``,
        found in the autograd graph when the weight requires a gradient) would need the blocks of
        the shared parameter, the sum of every use's Jacobian, which this does not compute. Not
        seen: a frozen weight, or a parametrized one, used again outside its layer (nothing in the
        graph counts those uses)."""
        names: Dict[int, List[str]] = {}
        for pname, param in self.model.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(pname)
        uses: Dict[object, int] = {}
        for node in reached:
            for child, _ in node.next_functions:
                if child is not None and type(child).__name__ == "AccumulateGrad":
                    uses[child] = uses.get(child, 0) + 1
        for r in self.records:
            own = [(p, r.module._parameters[p]) for p in ("weight", "bias") if r.module._parameters.get(p) is not None]
            parametrizations = getattr(r.module, "parametrizations", {})
            own += [(f"parametrizations.{key}.{p}", param) for key in parametrizations
                    for p, param in parametrizations[key].named_parameters(recurse=False)]
            for pname, param in own:
                if len(names.get(id(param), [])) > 1:
                    raise ValueError(f"GGNBlocks.compute: the {pname} of layer {r.name!r} is one parameter under the "
                                     f"names {names[id(param)]} (tied weights); the blocks of a shared parameter are "
                                     "not supported")
                if param.requires_grad and pname in ("weight", "bias"):
                    node = torch.autograd.graph.get_gradient_edge(param).node
                    if uses.get(node, 0) > 1:
                        raise ValueError(
                            f"GGNBlocks.compute: the {pname} of layer {r.name!r} is used {uses[node]} times in the forward "
                            "pass (the parameter used again outside the layer); the blocks of a shared parameter are "
                            "not supported")

    def _rank_one_cut(self, logits: Tensor) -> Optional[Tuple[_Record, List[int], List[int]]]:
        """Where the factors may cross a convolution by the rank-one route (``rank_one_backward``):
        (its record, the indices of the records before it, those of the others), or None.

        The last recorded Conv2d (stride 1, float32 or float64) such that the logits reach its
        input only through it: the autograd nodes the logits reach without passing the
        convolution's node share none with those its input reaches, and its weight and bias are
        leaves (a weight computed from an activation would carry factors around the cut). Then
        the factors at its output, carried to its input by any means, and back-propagated from
        there, give the records before it their factors exactly; the records after it get theirs
        from the logits directly."""
        if not self.rank_one_backward:
            return None
        for r in reversed(self.records):
            m, x, out = r.module, r.graph_input, r.output
            if not isinstance(m, nn.Conv2d) or out.dim() != 4 or out.dtype not in (torch.float32, torch.float64):
                continue  # not a batched convolution in a dtype the rank-one ops take
            if tuple(m.stride) != (1, 1):
                continue  # the op's fast kernel is stride 1 (others expand the factors: no gain)
            conv = out.grad_fn
            if x is None or x.grad_fn is None or conv is None or not hasattr(conv, "_saved_weight"):
                continue  # a first layer (nothing before it needs factors), a frozen one, or no convolution node
            if not conv.next_functions or conv.next_functions[0][0] is not x.grad_fn:
                continue  # the output's node is not the convolution of the recorded input
            if any(f is not None and type(f).__name__ != "AccumulateGrad" for f, _ in conv.next_functions[1:]):
                continue  # a weight or bias computed in the graph
            if conv._saved_weight.dtype != out.dtype:  # (raises, as autograd would, for a weight changed in place)
                continue
            before = _graph_nodes(x.grad_fn)
            upstream = [i for i, q in enumerate(self.records) if q.node in before]
            if not upstream or _graph_nodes(logits.grad_fn, stop=conv) & before:
                continue  # nothing before it, or a path around it (a skip connection)
            return r, upstream, [i for i in range(len(self.records)) if i not in upstream]
        return None

    def _rank_one_grads(
        self, logits: Tensor, outputs: List[Tensor], cotangents: Tensor, cut: Tuple[_Record, List[int], List[int]],
        real: int,
    ) -> Tuple[List[Tensor], Optional[Tensor]]:
        """The batched gradients of ``_batched_grads(logits, outputs, cotangents)``, computed in two
        stages around the cut convolution (``_rank_one_cut``): autograd from the logits to the
        outputs after it (its own included), :func:`rank_one_split` of the factors at its output,
        :func:`rank_one_conv_input_grad` to its input, and autograd from there to the outputs
        before it. Also returns the cut layer's factors compressed for its blocks, maps times
        sqrt(sum_k coeffs^2) over the first ``real`` cotangents ([N, 1, C_out, Ho, Wo]), or None
        when they are not of rank one (autograd then crossed the convolution)."""
        r, upstream, downstream = cut
        m = r.module
        # The weight the convolution saved for its backward: unpacking it raises, as autograd's
        # own backward would, if it was changed in place since; and it is the weight the forward
        # pass used even under a parametrization (m.weight would recompute it).
        weight = r.output.grad_fn._saved_weight
        grads: List[Optional[Tensor]] = [None] * len(outputs)
        for i, g in zip(downstream, self._batched_grads(logits, [outputs[i] for i in downstream], cotangents)):
            grads[i] = g
        at_output = grads[self.records.index(r)]  # [R, N, C_out, Ho, Wo]
        split = rank_one_split(at_output)
        compressed = None
        if split is None:
            before = self._batched_grads(r.output, [outputs[i] for i in upstream], at_output)
        else:
            coeffs, maps = split
            at_input = rank_one_conv_input_grad(coeffs, maps, weight, r.input.shape[-2:], m.stride,
                                                _conv_padding(m, "GGNBlocks", r.name), m.dilation, m.groups)
            before = self._batched_grads(r.graph_input, [outputs[i] for i in upstream], at_input)
            compressed = (maps * coeffs[:real].square().sum(0).sqrt()[:, :, None, None]).unsqueeze(1)
        for i, g in zip(upstream, before):
            grads[i] = g
        return grads, compressed

    @staticmethod
    def _batched_grads(logits: Tensor, outputs: List[Tensor], cotangents: Tensor, fill: bool = True) -> List[Tensor]:
        """[R, *out] at each output for R cotangents of the logits [R, N, C], from one batched
        backward pass (zeros where an output does not reach the logits; None with ``fill=False``)."""
        try:
            grads = torch.autograd.grad(logits, outputs, cotangents, retain_graph=True, allow_unused=True,
                                        is_grads_batched=True)
        except RuntimeError:
            # An op in the graph has no batching rule for vmap (e.g. a custom op): one pass per cotangent.
            each = [torch.autograd.grad(logits, outputs, c, retain_graph=True, allow_unused=True) for c in cotangents]
            grads = tuple(None if each[0][i] is None else torch.stack([g[i] for g in each]) for i in range(len(outputs)))
        R = cotangents.shape[0]
        if not fill:
            return list(grads)
        return [torch.zeros((R,) + tuple(out.shape), dtype=out.dtype, device=out.device) if g is None else g
                for g, out in zip(grads, outputs)]

    @staticmethod
    def _probe(logits: Tensor) -> Optional[Tuple[Tensor, Tuple[slice, slice]]]:
        """A cotangent [1, N, C] on the logits of one example, and the two slices of the others;
        None for one example. Without coupling its gradients at the other examples' outputs are
        exactly zero: nothing in the backward pass mixes rows. (Slices, not a boolean mask: the
        check then reads views instead of gathering a copy.)

        The example is the second (the first with two or three examples). A probe on one example
        catches any coupling that carries that example's gradient to another: batch statistics,
        a mix with the neighbouring example on either side (x + x.roll(1, 0), cumulative sums over
        the batch, in either direction), ``x.flip(0)`` mixup, a random pairing unless it pairs
        that example with itself. The earlier probe, on the first and last examples together,
        missed ``x.flip(0)``, which swaps those two. With three examples the second is the one
        that ``x.flip(0)`` leaves in place, so the first is probed; a cumulative sum over the
        batch (each example mixed only with earlier ones) then escapes, at N = 3 only."""
        N, C = logits.shape
        if N < 2:
            return None
        probe = torch.zeros(1, N, C, dtype=logits.dtype, device=logits.device)
        sent = 0 if N <= 3 else 1
        # a fixed cotangent with distinct entries (no random draw: the caller's generator is untouched)
        probe[0, sent] = torch.linspace(1.0, 2.0, C, dtype=logits.dtype, device=logits.device)
        return probe, (slice(0, sent), slice(sent + 1, N))

    @staticmethod
    def _probe_reached_others(g: Tensor, others: Tuple[slice, slice]) -> bool:
        """Whether the probe's gradient g [N, *out] is non-zero at any example other than its own."""
        return any(bool(g[rows].any()) for rows in others if rows.stop > rows.start)

    def _blocks(self, r: _Record, factors: Tensor, diagonal: bool) -> Tensor:
        """Blocks (or their diagonals) of one layer from its input and its factors [N, K, *output]."""
        m, x = r.module, r.input
        if isinstance(m, nn.Conv2d):
            padding = _conv_padding(m, "GGNBlocks", r.name)
            return unfolded_gram(x, factors, m.kernel_size, m.stride, padding, m.dilation, m.groups, m.bias is not None, diagonal)
        if isinstance(m, nn.Linear):
            if x.dim() != 2:
                # x [N, *T, F]: example n's weight gradient sums over its T positions before the
                # Gram product, as a 1x1 convolution of the image [F, T, 1] does.
                N, K = factors.shape[:2]
                x = x.reshape(N, -1, x.shape[-1]).transpose(1, 2).unsqueeze(-1)  # [N, F, T, 1]
                factors = factors.reshape(N, K, -1, factors.shape[-1]).transpose(2, 3).unsqueeze(-1)  # [N, K, O, T, 1]
            return unfolded_gram(x, factors, bias=m.bias is not None, diagonal=diagonal)
        if isinstance(m, Switch):  # accumulated in float32 at least, as unfolded_gram does
            acc = torch.promote_types(x.dtype, torch.float32)
            j = (x.unsqueeze(1).to(acc) * factors.to(acc)).reshape(factors.shape[0], factors.shape[1], -1).sum(2)  # [N, K]
            h = j.square().sum()
            return h.reshape(1, 1) if diagonal else h.reshape(1, 1, 1)
        # BatchNorm: a depthwise 1x1 "convolution" of the normalised input, with bias
        xhat = _batch_norm_input(m, x, r.batch_stats)
        if xhat.dim() == 2:
            xhat, factors = xhat[:, :, None, None], factors[:, :, :, None, None]
        elif xhat.dim() == 3:
            xhat, factors = xhat[:, :, :, None], factors[..., None]
        return unfolded_gram(xhat, factors, groups=xhat.shape[1], bias=True, diagonal=diagonal)

    def _statistics_path(
        self, logits: Tensor, v: Tensor, outputs: List[Tensor], chunk: int, diagonal: bool, reached: set,
        couples_examples: Optional[bool],
    ) -> Dict[str, Tensor]:
        """batch_norm_path="statistics" (class docstring). With s_l the statistics of BatchNorm l
        (forward order) and f_n example n's logits,

            d f_n / d theta = (d f_n / d theta, every s fixed) + sum_l (d f_n / d s_l) (D s_l / D theta),

        D the total derivative (s_l depends on theta also through earlier statistics). The K
        factors, back-propagated once, give the first term per example and a[n, k, l] =
        d(v_{n,k} . f_n) / d s_l at example n's leaf copies; 2 C_l one-hot cotangents on s_l give
        D s_l / D theta, summed over the examples, built up in forward order. The per-example
        rows and their corrections are summed in double: the two terms cancel to about a tenth of
        their size (README, Known limits)."""
        if couples_examples is True:
            raise ValueError("GGNBlocks.compute: couples_examples=True asks for the (example, factor) pairs, which "
                             "need the true graph; this context made BatchNorm statistics leaves "
                             "(batch_norm_path='statistics'): use batch_norm_path='pairs'")
        other = ("GGNBlocks.compute: something besides nn.BatchNorm couples the examples (batch statistics of "
                 "another kind{}), which batch_norm_path='statistics' cannot take: use batch_norm_path='pairs'")
        if couples_examples is None and _has_batch_statistics(reached):
            raise ValueError(other.format(" in the graph"))
        if couples_examples is None:
            probe = self._probe(logits)
            if probe is not None:
                for g in self._batched_grads(logits, outputs, probe[0], fill=False):
                    if g is not None and self._probe_reached_others(g[0], probe[1]):
                        raise ValueError(other.format(": a probe cotangent on one example reached the others"))
        norms, wide = self._norm_order, torch.float64
        # 1. D s_l / D theta at every recorded layer ([2 C_l, C_out, D'], summed over examples)
        totals: List[Dict[str, Tensor]] = []
        for l, norm in enumerate(norms):
            total: Dict[str, Tensor] = {}
            if norm.stats.requires_grad:
                earlier = [t for e in norms[:l] for t in e.leaves]
                basis = torch.eye(norm.stats.numel(), dtype=norm.stats.dtype, device=norm.stats.device)
                partial: Dict[str, List[Tensor]] = {}
                # d s_l / d (every earlier leaf), summed over its per-example copies: [2 C_l, C_l']
                through: List[List[Tensor]] = [[] for _ in earlier]
                for j0 in range(0, basis.shape[0], chunk):
                    rows = basis[j0:j0 + chunk]
                    grads = self._batched_grads(norm.stats, outputs + earlier, rows, fill=False)
                    for r, g in zip(self.records, grads[:len(outputs)]):
                        if g is None:
                            continue
                        # Summed over the examples in double. Per-example rows in float32 first,
                        # then summed, is faster where they are smaller than the layer's output
                        # (D' <= positions: convolutions); a Linear layer's would be D' times it.
                        c_out, width = self._row_shape(r)
                        if width <= g[0, 0].numel() // c_out:  # D' <= positions per output channel
                            partial.setdefault(r.name, []).append(self._rows(r, g).to(wide).sum(1))
                        else:
                            partial.setdefault(r.name, []).append(self._rows(r, g, summed=True, dtype=wide))
                    for parts, g, leaf in zip(through, grads[len(outputs):], earlier):
                        parts.append(g.to(wide).sum(1) if g is not None
                                     else torch.zeros(rows.shape[0], leaf.shape[1], dtype=wide, device=leaf.device))
                total = {name: torch.cat(parts) for name, parts in partial.items()}
                for lp in range(l):  # through earlier statistics: (d s_l / d s_l') D s_l' / D theta
                    ds = torch.cat([torch.cat(through[2 * lp]), torch.cat(through[2 * lp + 1])], 1)  # [2 C_l, 2 C_l']
                    for name, B in totals[lp].items():
                        _accumulate(total, name, torch.einsum("ij,jod->iod", ds, B))
            totals.append(total)
        # 2. the factors, and the rows corrected by a . D s / D theta
        leaves = [t for norm in norms for t in norm.leaves]
        blocks: Dict[str, Tensor] = {}
        K = v.shape[1]
        for k0 in range(0, K, chunk):
            grads = self._batched_grads(logits, outputs + leaves, v[:, k0:k0 + chunk].movedim(1, 0))
            at_leaves = grads[len(outputs):]
            # d(v . f_n) / d s_l at example n's copies: [R, N, 2 C_l] per BatchNorm
            a = [torch.cat([at_leaves[2 * i], at_leaves[2 * i + 1]], -1).to(wide) for i in range(len(norms))]
            for r, g in zip(self.records, grads[:len(outputs)]):
                j = self._rows(r, g).to(wide)  # [R, N, C_out, D']
                for a_l, total in zip(a, totals):
                    if r.name in total:
                        j = j + torch.einsum("rnj,jod->rnod", a_l, total[r.name])
                part = j.square().sum((0, 1)) if diagonal else torch.einsum("rnod,rnoe->ode", j, j)
                _accumulate(blocks, r.name, part)
        return {r.name: blocks[r.name].to(torch.promote_types(r.input.dtype, torch.float32)) for r in self.records}

    @staticmethod
    def _row_shape(r: _Record) -> Tuple[int, int]:
        """(C_out, D') of layer r's blocks."""
        m = r.module
        if isinstance(m, Switch):
            return 1, 1
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return m.num_features, 2
        bias = int(m.bias is not None)
        if isinstance(m, nn.Linear):
            return m.out_features, m.in_features + bias
        return m.out_channels, m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] + bias

    def _rows(self, r: _Record, g: Tensor, summed: bool = False, dtype: Optional[torch.dtype] = None) -> Tensor:
        """Each example's Jacobian rows of layer r: g [R, N, *output] (cotangents back-propagated
        to its output) -> [R, N, C_out, D']; with ``summed``, their sum over the examples
        [R, C_out, D']. Computed in ``dtype``, by default float32 at least, as unfolded_gram."""
        m = r.module
        acc = torch.promote_types(r.input.dtype, torch.float32) if dtype is None else dtype
        x, g = r.input.to(acc), g.to(acc)
        R, N = g.shape[:2]
        n = "" if summed else "n"  # the example index kept, or summed over
        if isinstance(m, Switch):
            j = (x.unsqueeze(0) * g).reshape(g.shape[0], g.shape[1], -1).sum(2)  # [R, N] (x may be [N]: a gate per example)
            return j.sum(1).reshape(R, 1, 1) if summed else j.reshape(R, N, 1, 1)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            xhat = _batch_norm_input(m, x, r.batch_stats)
            cols = xhat.reshape(N, xhat.shape[1], 1, -1)
            cols = torch.cat([cols, torch.ones_like(cols)], 2)  # (xhat, 1) per channel: [N, C, 2, P]
            return torch.einsum(f"rncp,ncdp->r{n}cd", g.reshape(R, N, xhat.shape[1], -1), cols)
        if isinstance(m, nn.Linear):
            x2 = x.reshape(N, -1, x.shape[-1])  # [N, T, F]: an example's positions sum
            cols = torch.cat([x2, torch.ones_like(x2[..., :1])], -1) if m.bias is not None else x2
            return torch.einsum(f"rnto,ntd->r{n}od", g.reshape(R, N, -1, g.shape[-1]), cols)
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=_conv_padding(m, "GGNBlocks", r.name),
                        stride=m.stride)  # [N, C_in k, P]
        G = m.groups
        cols = cols.reshape(N, G, -1, cols.shape[-1])
        if m.bias is not None:
            cols = torch.cat([cols, torch.ones_like(cols[:, :, :1])], 2)
        S = g.reshape(R, N, G, m.out_channels // G, -1)
        rows = torch.einsum(f"rngop,ngdp->r{n}god", S, cols)
        return rows.reshape((R,) + (() if summed else (N,)) + (m.out_channels, -1))

    def _coupled(self, logits: Tensor, v: Tensor, outputs: List[Tensor], chunk: int, diagonal: bool) -> Dict[str, Tensor]:
        """Train-mode BatchNorm: back-propagate each (example n, factor k) separately over the whole
        batch (batched by autograd, ``chunk`` pairs per pass), then sum every example m's
        contribution: j_{n,k} = sum_m (unfolded input of m) x (factor of (n, k) at m). With
        ``diagonal``, only sum_{n,k} j_{n,k}^2 (no Gram products)."""
        N, K, C = v.shape
        rows = v.reshape(N * K, C)
        example = torch.arange(N, device=logits.device).repeat_interleave(K)  # the example of each row
        result: Dict[str, Tensor] = {}
        for r0 in range(0, N * K, chunk):
            R = min(chunk, N * K - r0)
            cotangents = torch.zeros(R, N, C, dtype=logits.dtype, device=logits.device)
            cotangents[torch.arange(R, device=logits.device), example[r0:r0 + R]] = rows[r0:r0 + R]
            for r, g in zip(self.records, self._batched_grads(logits, outputs, cotangents)):
                _accumulate(result, r.name, self._blocks_coupled(r, g, diagonal))
        return result

    def _blocks_coupled(self, r: _Record, g: Tensor, diagonal: bool) -> Tensor:
        """g [R = N K, N, *output]: the factor of each (n, k) at every example's output. Returns the
        blocks sum_r j_r j_r^T of this chunk ([C_out, D', D']), with j_r = sum_m (rows of example m
        under cotangent r), or with ``diagonal`` their diagonals sum_r j_r^2 ([C_out, D'])."""
        j = self._rows(r, g, summed=True)  # [R, C_out, D']
        return j.square().sum(0) if diagonal else torch.einsum("rod,roe->ode", j, j)


# ----------------------------------------------------------------------------------------------
# BayesNAS's truncated diagonal recursion (notes section 2.1)
# ----------------------------------------------------------------------------------------------

#: Layers with an explicit squared-Jacobian rule in :func:`diagonal_recursion_hessians`.
DIAG_RECURSION_LAYERS = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, Switch, nn.AvgPool2d, nn.AdaptiveAvgPool2d)

#: Autograd operations (by node type) whose local Jacobian has only 0 and 1 entries: for them
#: (J o J)^T h = J^T h, so their ordinary backward already is the squared-Jacobian product. These are
#: the only operations allowed outside the layers of DIAG_RECURSION_LAYERS (ReLU, max pooling, sums
#: of branches, concatenation, reshapes, zero padding, identity).
_ZERO_ONE_OPS = frozenset({
    "AddBackward0", "AddBackward1", "SumBackward0", "SumBackward1", "CatBackward0", "StackBackward0",
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AliasBackward0", "CloneBackward0",
    "ToCopyBackward0", "ExpandBackward0", "PermuteBackward0", "TransposeBackward0", "TBackward0",
    "SliceBackward0", "SelectBackward0", "SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0",
    "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "SqueezeBackward3", "SqueezeBackward4",
    "UnsqueezeBackward0", "ConstantPadNdBackward0", "ReluBackward0", "MaxPool2DWithIndicesBackward0",
})


class _SquaredVJP(torch.autograd.Function):
    """Forward: the layer's output value (already computed), as a function of the layer input x
    only, which cuts the layer's own autograd graph out of the backward pass. Backward: ``rule(h)``,
    the layer's squared-Jacobian product (J o J)^T h (and, as a side effect, its parameters' curvature)."""

    @staticmethod
    def forward(ctx, x, value, rule):
        ctx.rule = rule
        return value.clone()

    @staticmethod
    def backward(ctx, h):
        return ctx.rule(h), None, None


class _OpOwners(torch.overrides.TorchFunctionMode):
    """Records, for every autograd node made during the forward pass, the innermost module whose
    forward made it (``stack[-1]``) and the function's name, to name the layer in error messages."""

    def __init__(self, stack: List[Tuple[str, str]], owners: dict):
        super().__init__()
        self.stack, self.owners = stack, owners

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor) and t.grad_fn is not None and t.grad_fn not in self.owners:
                self.owners[t.grad_fn] = (self.stack[-1] if self.stack else ("", "?"), getattr(func, "__name__", str(func)))
        return out


def _vjp(fn, x: Tensor, g: Tensor) -> Tensor:
    """J^T g of the parameter-free map ``fn`` at ``x`` (ordinary autograd)."""
    with torch.enable_grad():
        xx = x.detach().requires_grad_(True)
        return torch.autograd.grad(fn(xx), xx, g)[0]


def _window_lengths(size: int, out: int, device) -> Tensor:
    """Lengths of adaptive pooling's windows [floor(i size / out), ceil((i + 1) size / out))."""
    i = torch.arange(out, device=device)
    return (((i + 1) * size + out - 1) // out - (i * size) // out)


def _diag_rule(m: nn.Module, x: Tensor, h: Tensor, diag: Optional[Tensor]) -> Tensor:
    """One layer of the recursion: returns h_in = (J o J)^T h_out for the Jacobian J of the output
    wrt the input at ``x`` (per example; h_out, h_in shaped as the layer's output, input), and adds
    the parameters' curvature (J_theta o J_theta)^T h_out, summed over the batch, to ``diag`` in
    place (layout of ``GGNBlocks.compute(..., diagonal=True)``; None for parameter-free layers)."""
    with torch.no_grad():
        if isinstance(m, Switch):  # y = s x: H_s = sum x^2 h_y, h_x = s^2 h_y
            diag += (x.square() * h).sum().reshape(1, 1)
            return m.weight.square() * h
        if isinstance(m, nn.Conv2d):  # h_in = conv_transpose(h, W^2); weight: correlate(x^2, h)
            w2 = m.weight.square()
            padding = _conv_padding(m, "diagonal_recursion_hessians", type(m).__name__)
            h_in = torch.nn.grad.conv2d_input(x.shape, w2, h, m.stride, padding, m.dilation, m.groups)
            cols = [torch.nn.grad.conv2d_weight(x.square(), m.weight.shape, h, m.stride, padding, m.dilation, m.groups).flatten(1)]
            if m.bias is not None:
                cols.append(h.sum((0, 2, 3))[:, None])
            diag += torch.cat(cols, 1)
            return h_in
        if isinstance(m, nn.Linear):  # h_in = h (W^2); weight [O, D]: sum_n h_o x_d^2
            h2, x2 = h.reshape(-1, h.shape[-1]), x.reshape(-1, x.shape[-1])
            cols = [h2.t() @ x2.square()]
            if m.bias is not None:
                cols.append(h2.sum(0)[:, None])
            diag += torch.cat(cols, 1)
            return h @ m.weight.square()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):  # eval: y = gamma (x - mu) / sigma + beta
            shape = (1, -1) + (1,) * (x.dim() - 2)
            inv = torch.rsqrt(m.running_var + m.eps).reshape(shape)
            scale = inv * m.weight.reshape(shape) if m.affine else inv
            if m.affine:
                dims = [0] + list(range(2, x.dim()))
                xhat = (x - m.running_mean.reshape(shape)) * inv
                diag += torch.stack([(xhat.square() * h).sum(dims), h.sum(dims)], 1)
            return h * scale.square()
        if isinstance(m, nn.AvgPool2d):
            # every output o averages its window with one coefficient c_o = 1/divisor_o, so
            # (J o J)^T h = J^T (c h); c = avg_pool(ones) / sum_pool(ones) whatever the divisor rule
            def pool(z, count_include_pad=m.count_include_pad, divisor_override=m.divisor_override):
                return F.avg_pool2d(z, m.kernel_size, m.stride, m.padding, m.ceil_mode, count_include_pad, divisor_override)

            ones = torch.ones_like(x[:1])
            c = pool(ones) / pool(ones, True, 1).clamp_min(1)
            return _vjp(pool, x, h * c)
        if isinstance(m, nn.AdaptiveAvgPool2d):  # c_o = 1 / (window height x width)
            lh = _window_lengths(x.shape[-2], h.shape[-2], x.device)
            lw = _window_lengths(x.shape[-1], h.shape[-1], x.device)
            c = 1.0 / (lh[:, None] * lw[None, :]).to(h.dtype)
            return _vjp(lambda z: F.adaptive_avg_pool2d(z, h.shape[-2:]), x, h * c)
    raise TypeError(f"diagonal_recursion_hessians: no rule for {type(m).__name__}")  # unreachable: checked up front


def diagonal_recursion_hessians(model: nn.Module, x: Tensor) -> Dict[str, Tensor]:
    """BayesNAS's curvature: the diagonal of the pre-activation Gauss-Newton back-propagated from the
    loss to the input, truncated to its diagonal at every layer (Botev et al. 2017's recursion as
    the authors' code uses it, notes section 2.1), and the parameter curvatures it implies.

    Runs its own forward pass ``model(x)`` and returns {module name: curvature, summed over the
    batch} for every Switch ([1, 1]: H_s), Conv2d ([C_out, C_in/groups k_h k_w (+1 bias)]), Linear
    ([out, in (+1)]) and affine BatchNorm ([C, 2]: weight, bias), in the layout of
    ``GGNBlocks.compute(..., diagonal=True)`` so that the two are interchangeable (a layer that does
    not reach the logits gets zeros). Divide by N for the per-example (mean-loss) value.

    Why a function and not a ``GGNBlocks.compute`` mode: GGNBlocks differentiates through the
    model's ordinary autograd graph after a plain forward pass, and ignores parameter-free layers.
    The recursion instead needs every layer's backward replaced by a squared-Jacobian product
    during the forward pass (the hooks must be in place before the graph is built), and needs the
    parameter-free layers too (pooling coefficients are squared); so it owns its forward pass.

    The math, with h = the kept diagonal of d^2 L / d(activation)^2, per example (shape of the
    activation):

    * loss, summed softmax cross-entropy with the model's predictive p (labels not needed):
      h(logits)[n, c] = p_nc (1 - p_nc), the exact diagonal of diag(p) - p p^T. (The authors'
      ``tail_pass`` kept only the target class y_n and set the others to 0.)
    * a layer out = f(in) with Jacobian J (per example): the exact Gauss-Newton pull-back is
      J^T H_out J; the recursion keeps diag(J^T diag(h_out) J) = (J o J)^T h_out. For Conv2d (any
      stride, padding, dilation, groups) that is the transposed convolution of h_out with the squared
      kernel; Linear: h_out W^2; eval BatchNorm: h_out gamma^2 / (running_var + eps) per channel;
      Switch y = s x: s^2 h_y; average pooling: the pooling adjoint of h_out times the squared
      coefficient (1/k^4 per window element, 1/(HW)^2 for a global pool); ReLU: h_out times the 0/1
      derivative; max pooling: h_out routed (and summed) to the arg-max inputs; sums of branches:
      h passed unchanged to each branch; concatenation: split; a tensor read by several layers:
      the sum of their h (the recursion's fan-out rule). The Gauss-Newton "D" term (sigma'' g) is
      zero for all these layers.
    * parameters theta of a layer: (J_theta o J_theta)^T h_out, summed over examples. Switch:
      H_s = sum_{n, elements} x^2 h_y (notes 2.1); Conv2d/Linear weights: sum over examples and
      positions of (input)^2 h_out; bias: sum h_out.

    Unlike the authors' code (notes 2.4) this does NOT reproduce: (1) the NCHW -> (NHW, C) ``view``
    that mixes channels and positions (nothing is reshaped or averaged here); (2) the stride-1 fold
    of strided convolutions (the transposed convolution uses the layer's stride); (3) the dilated
    kernel holding only the last (out, in) slice (the whole kernel is squared); (4) the x_in0 / in1
    mis-wiring (h follows the model's actual autograd graph); (5) batch (and position) means taken
    before squaring, the target-class-only loss curvature, and unsquared pooling factors (the
    authors' 1/k^2 and the constant 0.5 for the global pool). Max pooling sums h when overlapping
    windows pick the same input (``max_unpool2d``, which the authors' code uses, would overwrite).

    Approximations that remain, by design: the diagonal truncation at every layer (cross terms
    between the elements of an activation, e.g. between positions and channels, and between the
    consumers of a shared tensor, are dropped: for a switch the exact GGN is
    sum_n sum_k (sum x S_k)^2 and this is sum_n sum x^2 sum_k S_k^2); the Gauss-Newton (not Hessian)
    curvature; BatchNorm as a fixed affine map (eval mode, running statistics). There is NO batch
    averaging: every example keeps its own h and derivatives, and the result is the exact sum over
    the batch of the per-example truncated recursions.

    Supported: the layers of :data:`DIAG_RECURSION_LAYERS`, and anywhere (in any module's forward)
    operations with 0/1 Jacobians (ReLU, max pooling, +, cat, reshapes, zero padding, identity,
    dropout in eval). Anything else raises naming the layer: a parametrised module of another type,
    Conv2d with non-zero padding modes, BatchNorm in training mode (``model.eval()`` first), and any
    other operation on the path to the logits (tanh, scaling, mean, subtraction, a parameter used
    outside a supported layer, ...), named with the module whose forward ran it. So does a subclass
    of a supported layer that overrides ``forward`` or holds other parameters (``TypeError``: its
    rule would be the plain layer's). Non-finite logits or layer inputs raise ``ValueError``, and a
    layer input changed in place after the layer read it raises ``RuntimeError``. Not seen: a
    forward hook of the user's that changes a layer's output (the rule is the plain layer's).

    Args:
        model: the network, in eval mode as far as BatchNorm is concerned; ``model(x)`` gives [N, C] logits.
        x: the input batch (its gradient is not needed; a detached copy is used).
    """
    modules = dict(model.named_modules())
    rules: Dict[str, nn.Module] = {}  # the layers with a rule, by module name
    diags: Dict[str, Tensor] = {}  # their parameters' curvature (parametrised layers only), filled by the backward pass
    for name, m in modules.items():
        label = name or type(m).__name__
        if list(m.parameters(recurse=False)) and not isinstance(m, DIAG_RECURSION_LAYERS):
            raise TypeError(
                f"diagonal_recursion_hessians: layer {label!r} ({type(m).__name__}) has parameters but is not supported; "
                f"supported: {', '.join(t.__name__ for t in DIAG_RECURSION_LAYERS)}"
            )
        if not isinstance(m, DIAG_RECURSION_LAYERS):
            continue
        GGNBlocks._check_plain(label, m, DIAG_RECURSION_LAYERS, "diagonal_recursion_hessians", "or replace the layer")
        if isinstance(m, nn.Conv2d):
            _conv_padding(m, "diagonal_recursion_hessians", label)  # raises for what is not supported
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats):
            raise ValueError(f"diagonal_recursion_hessians: BatchNorm layer {label!r} uses batch statistics (training mode "
                             "or no running statistics); the recursion treats BatchNorm as a fixed affine map: call model.eval()")
        if isinstance(m, nn.AdaptiveAvgPool2d) and getattr(m, "output_size", None) is None:
            raise TypeError(f"diagonal_recursion_hessians: layer {label!r}: AdaptiveAvgPool2d needs an output size")
        rules[name] = m
        if getattr(m, "weight", None) is not None:  # Switch, Conv2d, Linear, affine BatchNorm
            if isinstance(m, Switch):
                shape = (1, 1)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                shape = (m.num_features, 2)
            else:
                shape = (m.weight.shape[0], m.weight[0].numel() + (m.bias is not None))
            diags[name] = torch.zeros(shape, dtype=m.weight.dtype, device=m.weight.device)

    if torch.is_inference_mode_enabled():
        raise RuntimeError("diagonal_recursion_hessians: it runs its own forward and backward passes, which "
                           "torch.inference_mode() forbids: call it outside")
    with torch.enable_grad():  # its own passes need autograd, also when called under torch.no_grad()
        return _diagonal_recursion(model, x, modules, rules, diags)


def _diagonal_recursion(model: nn.Module, x: Tensor, modules: Dict[str, nn.Module], rules: Dict[str, nn.Module],
                        diags: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """diagonal_recursion_hessians' forward pass with the rules in place, then the backward pass
    that fills ``diags`` (the layers were checked by the caller)."""
    x = x.detach().requires_grad_(True)
    stack: List[Tuple[str, str]] = []
    owners: dict = {}
    handles = []
    read: List[Tuple[str, Tensor, int]] = []  # (layer, its input, that input's version when the layer ran)

    def push(name, m):
        return lambda module, inputs: stack.append((name or type(m).__name__, type(m).__name__))

    def pop(module, inputs, output):
        stack.pop()

    def replace(name, m):
        def hook(module, inputs, output):
            label = name or type(m).__name__
            if len(inputs) != 1 or not isinstance(inputs[0], Tensor) or not isinstance(output, Tensor):
                raise TypeError(f"diagonal_recursion_hessians: layer {label!r} must map one tensor to one tensor")
            if isinstance(m, (nn.Conv2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)) and inputs[0].dim() != 4:
                raise ValueError(f"diagonal_recursion_hessians: layer {label!r} needs a batched [N, C, H, W] input, "
                                 f"got {tuple(inputs[0].shape)}")
            if not inputs[0].requires_grad:
                raise ValueError(f"diagonal_recursion_hessians: the input of layer {label!r} does not depend on the network input")
            if not _checks.all_finite(inputs[0]):
                raise ValueError(f"diagonal_recursion_hessians: the input of layer {label!r} contains NaN or infinity")
            xin, diag = inputs[0].detach(), diags.get(name)
            read.append((label, xin, xin._version))  # its rule reads xin in the backward pass: no in-place change since
            return _SquaredVJP.apply(inputs[0], output.detach(), lambda h: _diag_rule(m, xin, h, diag))

        return hook

    try:
        for name, m in modules.items():
            handles.append(m.register_forward_pre_hook(push(name, m)))
            if name in rules:
                handles.append(m.register_forward_hook(replace(name, m)))
            handles.append(m.register_forward_hook(pop))
        with _OpOwners(stack, owners):
            logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(f"diagonal_recursion_hessians: the model must return [N, C] logits, got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
    if not _checks.all_finite(logits):
        raise ValueError("diagonal_recursion_hessians: the logits contain NaN or infinity")
    if logits.grad_fn is None:
        raise ValueError("diagonal_recursion_hessians: the logits do not depend on the input")
    for label, xin, version in read:
        if xin._version != version:
            raise RuntimeError(f"diagonal_recursion_hessians: the input of layer {label!r} was modified in place after the "
                               "layer ran (e.g. by a later ReLU(inplace=True)); its rule would read the changed values")
    _check_zero_one_graph(logits, x, owners)
    p = torch.softmax(logits.detach(), dim=-1)
    torch.autograd.grad(logits, x, p * (1 - p))
    return {(name or type(model).__name__): d for name, d in diags.items()}


def _check_zero_one_graph(logits: Tensor, x: Tensor, owners: dict) -> None:
    """Every autograd node between the logits and the input must be a layer with a rule
    (:class:`_SquaredVJP`) or a 0/1-Jacobian operation; raise naming the module that ran anything else."""
    seen, todo = set(), [(logits.grad_fn, (("?", "?"), "?"))]
    while todo:
        node, consumer = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kind = type(node).__name__
        # An operation that PyTorch builds from others (AvgPool1d runs avg_pool2d) has no recorded
        # owner: it is named with the layer of the operation that consumed its output.
        (where, where_type), op = owners.get(node, (consumer[0], "?"))
        if kind == "AccumulateGrad":
            if node.variable is not x:
                raise TypeError(f"diagonal_recursion_hessians: a tensor of shape {tuple(node.variable.shape)} that needs a "
                                f"gradient (a parameter?) is used by operation {op!r} in layer {where!r} ({where_type}) "
                                "outside a supported layer")
            continue
        if kind != "_SquaredVJPBackward":
            if kind not in _ZERO_ONE_OPS or getattr(node, "_saved_alpha", 1) != 1:
                raise TypeError(
                    f"diagonal_recursion_hessians: operation {op!r} ({kind}) in layer {where!r} ({where_type}) is not "
                    "supported: outside the layers with a rule (Conv2d, Linear, eval BatchNorm, Switch, AvgPool2d, "
                    "AdaptiveAvgPool2d) only operations with 0/1 Jacobians (ReLU, max pooling, +, cat, reshapes) are allowed"
                )
        todo.extend((f, ((where, where_type), op)) for f, _ in node.next_functions)
