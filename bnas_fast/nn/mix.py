"""MixedOp: K candidate operations on one edge, each run only on the examples that use it."""

from __future__ import annotations

from typing import List, Sequence, Union

import torch
from torch import Tensor, nn

from bnas_fast import _checks
from bnas_fast.ops.mix import mix, mix_sparse

__all__ = ["MixedOp", "mix_modules"]


class MixedOp(nn.Module):
    """``out[b] = sum_k weights[b, k] * candidates[k](x)[b]`` with per-example weights.

    With ``sparse=True`` (the default) candidate k runs only on the examples whose weight
    ``weights[:, k]`` is non-zero, and the fused :func:`bnas_fast.mix_sparse` scatters and weights
    the results in one pass: with half the paths dropped, forward and backward do about half the
    candidates' work. When a candidate is used by every example it runs on ``x`` itself (no
    gather); when it is used by none it does not run at all. (If no example uses any candidate, the
    first is probed on one example in eval mode without autograd, only for the output shape.)

    What sparse execution changes, knowingly:

    * a zero weight is structural (a dropped path): its gradient is 0, because the candidate was
      not evaluated on that example. Use ``sparse=False`` to differentiate through zero weights.
    * a BatchNorm inside a candidate sees only the examples that run it, as in Bender et al.'s
      ghost batches; in dense mode it also sees the examples whose output is discarded.
    * choosing the examples reads ``weights`` (one host sync). Under ``torch.compile`` the module
      takes the dense path, which has no data-dependent shapes, so ``fullgraph=True`` holds.

    Candidates may also read different inputs (the incoming edges of a node, each with its own
    transform): pass ``x`` as a list of K tensors, candidate k reading ``x[k]``.

    Args:
        candidates: K modules mapping [B, *in] to [B, *out] (the same output shape for all).
        sparse: run candidates only where they are used (see above).

    Shapes:
        x: [B, *in], or a list of K tensors [B, *in_k]; weights: [B, K] with the dtype and device
        of the candidates' outputs; returns [B, *out].
    """

    def __init__(self, candidates: Sequence[nn.Module], sparse: bool = True):
        super().__init__()
        candidates = list(candidates)
        if not candidates:
            raise ValueError("MixedOp: candidates must hold at least one module")
        for k, c in enumerate(candidates):
            if not isinstance(c, nn.Module):
                raise TypeError(f"MixedOp: candidates[{k}] must be an nn.Module, got {type(c).__name__}")
        _checks.check_bool("sparse", sparse, "MixedOp")
        self.candidates = nn.ModuleList(candidates)
        self.sparse = sparse

    def extra_repr(self) -> str:
        return f"num_candidates={len(self.candidates)}, sparse={self.sparse}"

    def forward(self, x: Union[Tensor, Sequence[Tensor]], weights: Tensor) -> Tensor:
        return mix_modules(self.candidates, x, weights, sparse=self.sparse)


def mix_modules(
    candidates: Sequence[nn.Module], x: Union[Tensor, Sequence[Tensor]], weights: Tensor, sparse: bool = True
) -> Tensor:
    """What :class:`MixedOp` computes, for modules held elsewhere (e.g. in an ``nn.ModuleDict`` whose
    state-dict keys a stand-alone model shares): ``sum_k weights[:, k] * candidates[k](x_k)``, with
    candidate k run only on the rows it is used by when ``sparse`` (see :class:`MixedOp`)."""
    candidates = list(candidates)
    num_candidates = len(candidates)
    if not isinstance(weights, Tensor) or weights.dim() != 2 or weights.shape[1] != num_candidates:
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"MixedOp: weights must have shape [B, {num_candidates}], got {shape}")
    if not torch.compiler.is_compiling():
        # before any candidate runs: a refused call must not have moved a BatchNorm's statistics
        _checks.check_floating("weights", weights, "MixedOp")
        _checks.check_finite_values("weights", weights, "MixedOp")
    inputs = [x] * num_candidates if isinstance(x, Tensor) else list(x)
    if len(inputs) != num_candidates or not all(isinstance(t, Tensor) for t in inputs):
        raise ValueError(f"MixedOp: x must be a tensor or a list of {num_candidates} tensors, one per candidate")
    for k, t in enumerate(inputs):
        if t.shape[0] != weights.shape[0]:
            name = "x" if isinstance(x, Tensor) else f"x[{k}]"
            raise ValueError(f"MixedOp: weights has B = {weights.shape[0]} rows but {name} has batch {t.shape[0]}")
    if not sparse or torch.compiler.is_compiling():
        return mix([candidate(t) for candidate, t in zip(candidates, inputs)], weights)
    return _mix_sparse_modules(candidates, inputs, weights)


def _mix_sparse_modules(candidates: List[nn.Module], inputs: List[Tensor], weights: Tensor) -> Tensor:
    batch, num_candidates = weights.shape
    active = weights != 0
    counts = active.sum(0).tolist()  # the one host sync: which candidates run on how many examples
    if sum(counts) == 0:
        # Every path dropped for every example: the output is zero. Its shape comes from one
        # candidate probed on an empty batch in eval mode without autograd, so that no
        # BatchNorm statistics move (a single example would not do: a ghost batch norm rejects
        # it); the zeros stay connected to `weights` through mix_sparse.
        probe = candidates[0]
        modes = [(m, m.training) for m in probe.modules()]  # each submodule's own mode, restored as it was
        with torch.no_grad():
            probe.eval()
            try:
                rest = tuple(probe(inputs[0][:0]).shape[1:])
            finally:
                for m, training in modes:
                    m.training = training
        empty = weights.new_empty((0,) + rest)
        no_rows = torch.empty(0, dtype=torch.int64, device=weights.device)
        return mix_sparse([empty] * num_candidates, [no_rows] * num_candidates, weights)
    ys: List[Tensor] = []
    indices: List[Tensor] = []
    missing: List[int] = []
    for k, (candidate, x) in enumerate(zip(candidates, inputs)):
        if counts[k] == batch:
            indices.append(torch.arange(batch, device=x.device))
            ys.append(candidate(x))
        elif counts[k] == 0:
            indices.append(torch.empty(0, dtype=torch.int64, device=x.device))
            ys.append(x)  # placeholder, replaced below once an output shape is known
            missing.append(k)
        else:
            idx = active[:, k].nonzero().flatten()
            indices.append(idx)
            ys.append(candidate(x.index_select(0, idx)))
    computed = next(y for k, y in enumerate(ys) if k not in missing)
    for k in missing:
        ys[k] = computed.new_empty((0,) + tuple(computed.shape[1:]))
    return mix_sparse(ys, indices, weights)
