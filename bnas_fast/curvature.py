"""Per-filter Gauss-Newton (GGN) blocks of a network's layers (BayesNAS, seed 003; issue 6, in progress).

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
estimate); ``mode="exact"`` all C.

Supported layers, and what a block is:

* ``nn.Conv2d`` (any stride, padding, dilation and groups; zero padding) and ``nn.Linear``: the
  weights of filter o, flattened as ``weight[o].flatten()``, then ``bias[o]``: [C_out, D', D'].
* ``nn.BatchNorm1d/2d`` with affine parameters: (weight[c], bias[c]) of channel c: [C, 2, 2]. In
  eval mode the normalised input uses the running statistics; in train mode the batch statistics,
  and then every example's output depends on every other example's input: the factors are
  back-propagated per (example, factor) over the whole batch (N K backward passes, batched), and
  every layer's blocks sum over all examples' contributions. That is exact, and slower.
* :class:`Switch` (a scalar gate y = s x, BayesNAS's architecture parameters): [1, 1, 1], the
  switch Hessian H_s = sum_{n,k} (sum x * S)^2 of notes section 2.1.

A module that has parameters of its own and is none of these raises ``TypeError`` naming it, when
the context is entered (never silently skipped). Parameter-free modules (ReLU, pooling, reshapes)
need nothing: autograd carries the factors through them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnas_fast import reference
from bnas_fast.ops.unfolded_gram import unfolded_gram

__all__ = ["GGNBlocks", "Switch", "SUPPORTED"]


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
    output: Optional[Tensor] = None  # layer output, in the graph
    calls: int = 0  # forward calls since the context was entered


def _batch_norm_input(module: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """x normalised as the module normalised it (batch statistics in training, running ones in eval)."""
    dims = [0] + list(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if module.training or not module.track_running_stats:
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
    else:
        mean, var = module.running_mean, module.running_var
    return (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + module.eps)


class GGNBlocks:
    """Records the supported layers' inputs and outputs during a forward pass, then computes every
    layer's per-output-channel GGN blocks (module docstring).

    Args:
        model: the network; its logits must be the output passed to :meth:`compute`.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.records: List[_Record] = []
        self._handles: list = []
        for name, module in model.named_modules():
            own = list(module.parameters(recurse=False))
            if not own:
                continue
            if not isinstance(module, SUPPORTED):
                raise TypeError(
                    f"GGNBlocks: layer {name!r} ({type(module).__name__}) has parameters but is not supported; "
                    f"supported: {', '.join(t.__name__ for t in SUPPORTED)}"
                )
            if isinstance(module, nn.Conv2d) and (isinstance(module.padding, str) or module.padding_mode != "zeros"):
                raise TypeError(f"GGNBlocks: layer {name!r}: only numeric zero padding is supported, got "
                                f"padding={module.padding!r}, padding_mode={module.padding_mode!r}")
            self.records.append(_Record(name or type(module).__name__, module))

    def __enter__(self) -> "GGNBlocks":
        for record in self.records:
            record.input, record.output, record.calls = None, None, 0
            self._handles.append(record.module.register_forward_hook(self._hook(record)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @staticmethod
    def _hook(record: _Record):
        def hook(module, inputs, output):
            record.input = inputs[0].detach()
            record.output = output
            record.calls += 1

        return hook

    def compute(
        self, logits: Tensor, mode: str = "exact", generator: Optional[torch.Generator] = None, diagonal: bool = False
    ) -> Dict[str, Tensor]:
        """{layer name: blocks} for the last forward pass; ``mode`` "exact" or "mc". With
        ``diagonal`` only the blocks' diagonals ([C_out, D']; the exact diagonal GGN, as BackPACK's
        DiagGGNExact, without the Gram products)."""
        if mode not in ("exact", "mc"):
            raise ValueError(f"GGNBlocks.compute: mode must be 'exact' or 'mc', got {mode!r}")
        missing = [r.name for r in self.records if r.output is None]
        if missing:
            raise RuntimeError(f"GGNBlocks.compute: no forward pass recorded for {missing}; run the model inside the context first")
        shared = [f"{r.name} ({r.calls} times)" for r in self.records if r.calls > 1]
        if shared:
            raise RuntimeError(
                f"GGNBlocks.compute: layers ran more than once inside the context: {shared}; run exactly one forward "
                "pass per context (a layer applied twice in one pass, i.e. weight sharing, is not supported)"
            )
        if logits.dim() != 2 or not logits.requires_grad:
            raise ValueError(f"GGNBlocks.compute: logits must be the model's [N, C] output (in the autograd graph), got {tuple(logits.shape)}")
        if not bool(torch.isfinite(logits).all()):
            raise ValueError("GGNBlocks.compute: the logits contain NaN or infinity")
        for r in self.records:
            if not bool(torch.isfinite(r.input).all()):
                raise ValueError(f"GGNBlocks.compute: the input of layer {r.name!r} contains NaN or infinity")
        v = reference.softmax_ce_hessian_factors(logits.detach(), mode, generator)  # [N, K, C]
        # batch statistics couple the examples: every example's output depends on every input
        coupled = any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
            for m in self.model.modules()
        )
        outputs = [r.output for r in self.records]
        if coupled:
            blocks = self._coupled(logits, v, outputs)
            return {k: b.diagonal(dim1=1, dim2=2).clone() for k, b in blocks.items()} if diagonal else blocks
        # No coupling between examples: one backward pass per factor k gives every example's factor.
        K = v.shape[1]
        per_layer: List[List[Tensor]] = [[] for _ in outputs]
        for k in range(K):
            grads = torch.autograd.grad(logits, outputs, v[:, k], retain_graph=True, allow_unused=True)
            for i, (g, out) in enumerate(zip(grads, outputs)):
                per_layer[i].append(torch.zeros_like(out) if g is None else g)
        return {r.name: self._blocks(r, torch.stack(s, 1), diagonal) for r, s in zip(self.records, per_layer)}

    def _blocks(self, r: _Record, factors: Tensor, diagonal: bool) -> Tensor:
        """Blocks (or their diagonals) of one layer from its input and its factors [N, K, *output]."""
        m, x = r.module, r.input
        if isinstance(m, nn.Conv2d):
            return unfolded_gram(x, factors, m.kernel_size, m.stride, m.padding, m.dilation, m.groups, m.bias is not None, diagonal)
        if isinstance(m, nn.Linear):
            if x.dim() != 2:
                x, factors = x.reshape(-1, x.shape[-1]), factors.movedim(1, -2).reshape(-1, factors.shape[1], factors.shape[-1])
            return unfolded_gram(x, factors, bias=m.bias is not None, diagonal=diagonal)
        if isinstance(m, Switch):
            j = (x.unsqueeze(1) * factors).flatten(2).sum(2)  # [N, K]
            h = j.square().sum()
            return h.reshape(1, 1) if diagonal else h.reshape(1, 1, 1)
        # BatchNorm: a depthwise 1x1 "convolution" of the normalised input, with bias
        xhat = _batch_norm_input(m, x)
        if xhat.dim() == 2:
            xhat, factors = xhat[:, :, None, None], factors[:, :, :, None, None]
        elif xhat.dim() == 3:
            xhat, factors = xhat[:, :, :, None], factors[..., None]
        return unfolded_gram(xhat, factors, groups=xhat.shape[1], bias=True, diagonal=diagonal)

    def _coupled(self, logits: Tensor, v: Tensor, outputs: List[Tensor]) -> Dict[str, Tensor]:
        """Train-mode BatchNorm: back-propagate each (example n, factor k) separately over the whole
        batch (batched by autograd), then sum every example m's contribution: j_{n,k} = sum_m
        (unfolded input of m) x (factor of (n, k) at m)."""
        N, K, C = v.shape
        cotangents = torch.zeros(N * K, N, C, dtype=logits.dtype, device=logits.device)
        idx = torch.arange(N, device=logits.device).repeat_interleave(K)
        cotangents[torch.arange(N * K), idx] = v.reshape(N * K, C)
        grads = torch.autograd.grad(logits, outputs, cotangents, retain_graph=True, is_grads_batched=True, allow_unused=True)
        result = {}
        for r, g, out in zip(self.records, grads, outputs):
            g = torch.zeros((N * K,) + tuple(out.shape), dtype=out.dtype, device=out.device) if g is None else g
            # Treat the batch as one "example" whose positions are (m, p): factors [1, N K, C_out, N, P].
            result[r.name] = self._blocks_coupled(r, g)
        return result

    def _blocks_coupled(self, r: _Record, g: Tensor) -> Tensor:
        """g [R = N K, N, *output]: the factor of each (n, k) at every example's output."""
        m, x = r.module, r.input
        R = g.shape[0]
        if isinstance(m, Switch):
            j = (x.unsqueeze(0) * g).flatten(1).sum(1)  # [R]
            return j.square().sum().reshape(1, 1, 1)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            x = _batch_norm_input(m, x)
            cols = x.reshape(x.shape[0], x.shape[1], 1, -1)  # [N, C, 1, P]
            cols = torch.cat([cols, torch.ones_like(cols)], 2)  # (xhat, 1) per channel
            S = g.reshape(R, x.shape[0], x.shape[1], -1)  # [R, N, C, P]
            j = torch.einsum("rmcp,mcdp->rcd", S, cols)  # [R, C, 2]
            return torch.einsum("rcd,rce->cde", j, j)
        if isinstance(m, nn.Linear):
            x2 = x.reshape(-1, x.shape[-1])
            S = g.reshape(R, -1, g.shape[-1])  # [R, M, C_out]
            cols = torch.cat([x2, torch.ones_like(x2[:, :1])], 1) if m.bias is not None else x2
            j = torch.einsum("rmo,md->rod", S, cols)
            return torch.einsum("rod,roe->ode", j, j)
        # Conv2d: unfold every example once; sum over examples and positions
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)  # [N, C_in k, P]
        G, N = m.groups, x.shape[0]
        cols = cols.reshape(N, G, -1, cols.shape[-1])
        if m.bias is not None:
            cols = torch.cat([cols, torch.ones_like(cols[:, :, :1])], 2)
        S = g.reshape(R, N, G, m.out_channels // G, -1)  # [R, N, G, O_g, P]
        j = torch.einsum("rmgop,mgdp->rgod", S, cols)
        blocks = torch.einsum("rgod,rgoe->gode", j, j)
        return blocks.reshape(m.out_channels, blocks.shape[-1], blocks.shape[-1])
