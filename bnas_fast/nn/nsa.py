"""Networks with stochastic architectures (NSA, seed 002): the wiring space and the model.

An architecture of a stage is a directed acyclic graph over nodes 0..N: node 0 is the stage's input,
nodes 1..N are operations. Node j sums the outputs of its predecessors (adjacency[i, j] = 1, i < j)
and applies ReLU -> Conv3x3 -> BatchNorm; the stage's output is node N. Architectures come from an
Erdős–Rényi sampler (each possible edge on with probability p = 0.3) plus the chain (j - 1 -> j), and
a fixed training space of S of them is drawn once from a seed (section 2).

Every example b of a batch runs its own architecture arch[b] in [0, S) (NSA-i, eq. 3; NSA runs one
per batch, which is the special case of a constant arch). The per-example sum over predecessors is
``bnas_fast.mix(outputs, weights, relu=True)`` (the sum and the node's ReLU in one pass) with
weights[b, i] = coefficient[arch[b], i, j]: the fused op skips
the reads of zero weights, so absent edges cost nothing. NSA-id (``conditional=True``) learns those
coefficients per architecture (initialised to the adjacency, confined to its edges) and uses
architecture-conditional BatchNorm (:class:`bnas_fast.nn.ArchBatchNorm2d`).

``fused=False`` builds the same model from plain PyTorch (a stacked weighted sum, nn.BatchNorm2d
followed by a gathered affine): the baseline of the training-step benchmark and a parity check.
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bnas_fast
from bnas_fast import _checks
from bnas_fast.nn.arch_batch_norm import ArchBatchNorm2d, _affine_in_dtype_of

__all__ = ["sample_architectures", "NSAStage", "NSANet", "VARIANTS"]

VARIANTS = ("nsa", "nsa_i", "nsa_id")


def sample_architectures(num_archs: int, num_nodes: int, p: float = 0.3, seed: int = 0) -> Tensor:
    """S adjacency matrices over nodes 0..N, [S, N+1, N+1] float32 with entries in {0, 1}.

    Each edge i -> j with i < j is on with probability p (Erdős–Rényi), and the chain edges
    (j - 1) -> j are always on, so every node is reachable from the input and reaches node N.
    Drawn from a torch.Generator seeded with ``seed``; the global RNG is not touched.
    """
    for name, value in (("num_archs", num_archs), ("num_nodes", num_nodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"sample_architectures: {name} must be an int >= 1, got {value!r}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"sample_architectures: p must be in [0, 1], got {p!r}")
    gen = torch.Generator().manual_seed(seed)
    n = num_nodes + 1
    edges = (torch.rand(num_archs, n, n, generator=gen) < p).float().triu(diagonal=1)
    chain = torch.diag(torch.ones(num_nodes), diagonal=1)
    return torch.maximum(edges, chain.expand(num_archs, n, n))


class _PlainArchBN(nn.Module):
    """F.batch_norm without affine, then weight[arch] and bias[arch]: the plain-PyTorch twin of
    ArchBatchNorm2d with shared running statistics (same state_dict names and shapes). With a single
    affine map it is plain F.batch_norm with its fused affine, as a user would write NSA-i."""

    #: recalibrate_batch_norm resets and recomputes its running statistics, as nn.BatchNorm2d's
    #: (it keeps them as nn.BatchNorm2d does: track_running_stats, reset_running_stats, momentum None).
    recalibrated_like_batch_norm = True
    track_running_stats = True

    def __init__(self, channels: int, num_archs: int, momentum: Optional[float] = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(num_archs, channels))
        self.bias = nn.Parameter(torch.zeros(num_archs, channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def forward(self, x: Tensor, arch: Tensor) -> Tensor:
        momentum = self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # a cumulative average, as nn.BatchNorm2d (recalibrate_batch_norm sets it)
                momentum = 1.0 / float(self.num_batches_tracked)
        momentum = 0.0 if momentum is None else momentum
        if self.weight.shape[0] == 1:  # one affine map (NSA, NSA-i): nn.BatchNorm2d's own fused affine
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight[0], self.bias[0], self.training, momentum, self.eps)
        y = F.batch_norm(x, self.running_mean, self.running_var, None, None, self.training, momentum, self.eps)
        return y * self.weight[arch][:, :, None, None] + self.bias[arch][:, :, None, None]


class _PerArchStatsBN(nn.Module):
    """Batch norm with per-architecture running statistics but one shared affine map: NSA / NSA-i
    with ``running_stats="per_arch"`` (only NSA-id makes the affine parameters per architecture)."""

    def __init__(self, channels: int, num_archs: int, momentum_per: str = "batch"):
        super().__init__()
        self.norm = ArchBatchNorm2d(channels, num_archs=num_archs, affine=False, running_stats="per_arch",
                                    momentum_per=momentum_per)
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, arch: Tensor) -> Tensor:
        return self.norm(x, arch) * self.weight[None, :, None, None] + self.bias[None, :, None, None]


class _FusedBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d (same parameters, buffers and state_dict) computed by the fused
    :func:`bnas_fast.arch_batch_norm` with a single architecture: the stem's and the down-samplings'
    BatchNorm of the fused NSANet. Training mode with running statistics, as nn.BatchNorm2d;
    anything else (eval mode, no running statistics) is nn.BatchNorm2d's own forward."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.track_running_stats and self.affine):
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        arch = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        weight, bias = _affine_in_dtype_of(x, self.weight, self.bias)
        return bnas_fast.arch_batch_norm(
            x, arch, weight.unsqueeze(0), bias.unsqueeze(0), self.running_mean, self.running_var,
            training=True, momentum=momentum, eps=self.eps,
        )


class NSAStage(nn.Module):
    """One stage: N nodes wired by the architecture of each example (module docstring).

    Args:
        channels: channels of every node.
        adjacency: [S, N+1, N+1] 0/1 (from :func:`sample_architectures`).
        conditional: NSA-id: learnable per-architecture aggregation coefficients and per-architecture
            BN affine parameters.
        running_stats: "shared" or "per_arch" running statistics of the BatchNorms (per_arch keeps
            the affine parameters shared unless ``conditional``).
        fused: bnas_fast ops (True) or the plain-PyTorch twin (False; shared statistics only).
        momentum_per: with per_arch statistics, "batch" (an architecture met again after t batches
            moves by 1 - (1 - momentum)^t) or "update" (by momentum whenever met); see ArchBatchNorm2d.
    """

    def __init__(
        self, channels: int, adjacency: Tensor, conditional: bool, running_stats: str = "shared", fused: bool = True,
        momentum_per: str = "batch",
    ):
        super().__init__()
        if adjacency.dim() != 3 or adjacency.shape[1] != adjacency.shape[2] or adjacency.shape[1] < 2:
            raise ValueError(f"NSAStage: adjacency must be [S, N+1, N+1] with N >= 1, got {tuple(adjacency.shape)}")
        if not bool(((adjacency == 0) | (adjacency == 1)).all()) or bool(adjacency.tril().any()):
            raise ValueError("NSAStage: adjacency must hold 0 and 1 only, above the diagonal (edge i -> j for i < j, "
                             "as sample_architectures makes them)")
        if not fused and running_stats != "shared":
            raise ValueError("NSAStage: the plain-PyTorch twin (fused=False) supports running_stats='shared' only")
        if momentum_per not in ("batch", "update"):
            raise ValueError(f"NSAStage: momentum_per must be 'batch' or 'update', got {momentum_per!r}")
        self.num_archs, self.num_nodes = adjacency.shape[0], adjacency.shape[1] - 1
        self.conditional, self.fused = conditional, fused
        self.register_buffer("adjacency", adjacency.float().clone())
        if conditional:
            self.coefficients = nn.Parameter(adjacency.float().clone())  # [S, N+1, N+1], used on the edges only
        else:
            self.register_parameter("coefficients", None)
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1, bias=False) for _ in range(self.num_nodes))
        # The BatchNorms see the example's architecture when it selects something: per-architecture
        # affine parameters (NSA-id) or running statistics (running_stats="per_arch").
        self.bn_uses_arch = conditional or running_stats == "per_arch"
        bn_archs = self.num_archs if conditional else 1
        if not fused:
            self.norms = nn.ModuleList(_PlainArchBN(channels, bn_archs) for _ in range(self.num_nodes))
        elif running_stats == "per_arch" and not conditional:
            self.norms = nn.ModuleList(
                _PerArchStatsBN(channels, self.num_archs, momentum_per) for _ in range(self.num_nodes)
            )
        else:
            self.norms = nn.ModuleList(
                ArchBatchNorm2d(channels, num_archs=self.num_archs if self.bn_uses_arch else 1,
                                running_stats=running_stats, momentum_per=momentum_per)
                for _ in range(self.num_nodes)
            )

    def aggregation_table(self) -> Tensor:
        """[S, N+1, N+1]: the weight of edge i -> j for each architecture (0 off the edges)."""
        if self.conditional:
            return self.coefficients * self.adjacency
        return self.adjacency

    def forward(self, x: Tensor, arch: Tensor) -> Tensor:
        table = self.aggregation_table()
        bn_arch = arch if self.bn_uses_arch else torch.zeros_like(arch)
        outputs: List[Tensor] = [x]
        for j in range(1, self.num_nodes + 1):
            weights = bnas_fast.arch_weights(arch, table[:, :j, j])  # [B, j]
            if self.fused:  # the sum and its ReLU in one pass
                h = bnas_fast.mix(outputs, weights, relu=True)
            else:
                h = torch.relu((torch.stack(outputs, 1) * weights[:, :, None, None, None]).sum(1))
            outputs.append(self.norms[j - 1](self.convs[j - 1](h), bn_arch))
        return outputs[-1]


class NSANet(nn.Module):
    """stem (Conv3x3 -> BN) -> stage -> [down-sampling -> stage] ... -> ReLU -> global average pool -> linear.

    Stage k has ``width * 2**k`` channels and its own training space of S architectures (drawn from
    ``(seed, k)``); a network architecture is an index a in [0, S) that selects architecture a in
    every stage. Down-sampling between stages is ReLU -> Conv3x3 stride 2 -> BN (explicit, so every
    node of a stage has the same spatial size and any wiring is valid).

    Args:
        variant: "nsa" and "nsa_i" (shared weights only; they differ in how training samples
            architectures) or "nsa_id" (plus per-architecture aggregation and BN affine parameters).
        running_stats: "shared" or "per_arch" running statistics in the stages' BatchNorms (the
            stem's and the down-samplings' BatchNorms keep shared statistics).
        momentum_per: with per_arch statistics, how their momentum counts: "batch" (default) or
            "update" (see :class:`bnas_fast.nn.ArchBatchNorm2d`).
        fused: the bnas_fast ops (True) or the plain-PyTorch twin (False).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int = 16,
        num_stages: int = 3,
        num_nodes: int = 4,
        num_archs: int = 50,
        variant: str = "nsa_i",
        running_stats: str = "shared",
        p: float = 0.3,
        seed: int = 0,
        fused: bool = True,
        momentum_per: str = "batch",
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"NSANet: variant must be one of {VARIANTS}, got {variant!r}")
        if running_stats not in ("shared", "per_arch"):
            raise ValueError(f"NSANet: running_stats must be 'shared' or 'per_arch', got {running_stats!r}")
        if momentum_per not in ("batch", "update"):
            raise ValueError(f"NSANet: momentum_per must be 'batch' or 'update', got {momentum_per!r}")
        for name, value in (("width", width), ("num_stages", num_stages), ("num_nodes", num_nodes), ("num_archs", num_archs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NSANet: {name} must be an int >= 1, got {value!r}")
        self.variant, self.num_archs, self.running_stats = variant, num_archs, running_stats
        conditional = variant == "nsa_id"
        # the stem's and down-samplings' BatchNorm: nn.BatchNorm2d, or the same over the fused kernel
        batch_norm = _FusedBatchNorm2d if fused else nn.BatchNorm2d
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), batch_norm(width))
        stages, downs = [], []
        for k in range(num_stages):
            channels = width * 2**k
            adjacency = sample_architectures(num_archs, num_nodes, p, seed=seed * 1000 + k)
            stages.append(NSAStage(channels, adjacency, conditional, running_stats, fused, momentum_per))
            if k + 1 < num_stages:
                downs.append(
                    nn.Sequential(
                        nn.ReLU(), nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False), batch_norm(2 * channels)
                    )
                )
        self.stages, self.downs = nn.ModuleList(stages), nn.ModuleList(downs)
        self.head = nn.Linear(width * 2 ** (num_stages - 1), num_classes)

    def forward(self, x: Tensor, arch: Union[Tensor, int]) -> Tensor:
        """x [B, in_channels, H, W]; arch [B] int64 in [0, S) (one per example) or an int (the whole
        batch). Returns logits [B, num_classes]."""
        if isinstance(arch, bool) or not isinstance(arch, (int, Tensor)):
            raise TypeError(f"NSANet: arch must be an int or an int64 tensor [B], got {type(arch).__name__}")
        if isinstance(arch, int):
            if not 0 <= arch < self.num_archs:
                raise IndexError(f"NSANet: arch = {arch} is out of range for S = {self.num_archs}")
            arch = torch.full((x.shape[0],), arch, dtype=torch.long, device=x.device)
        elif not torch.compiler.is_compiling():
            # before the stem runs: a refused call must not have moved its BatchNorm's statistics
            if arch.dtype != torch.long or arch.dim() != 1 or arch.shape[0] != x.shape[0]:
                raise ValueError(f"NSANet: arch must be an int64 tensor [B] with B = {x.shape[0]} (x's batch), got "
                                 f"{arch.dtype} {tuple(arch.shape)}")
            _checks.check_index_range("arch", arch, self.num_archs, "NSANet", "S")
        h = self.stem(x)
        for k, stage in enumerate(self.stages):
            h = stage(h, arch)
            if k < len(self.downs):
                h = self.downs[k](h)
        return self.head(torch.relu(h).mean((2, 3)))

    def with_architectures(self, adjacencies: List[Tensor]) -> "NSANet":
        """A copy sharing every weight but running other architectures (one [S', N+1, N+1] per stage):
        for evaluating architectures outside the training space. Shared-weight variants only."""
        if self.variant == "nsa_id" or self.running_stats != "shared":
            raise ValueError("NSANet.with_architectures: needs shared weights and statistics (variant nsa/nsa_i, shared)")
        where = "NSANet.with_architectures"
        if not isinstance(adjacencies, (list, tuple)) or len(adjacencies) != len(self.stages):
            raise ValueError(f"{where}: adjacencies must be a list of {len(self.stages)} tensors (one per stage), got "
                             f"{len(adjacencies) if isinstance(adjacencies, (list, tuple)) else type(adjacencies).__name__}")
        for k, (stage, adjacency) in enumerate(zip(self.stages, adjacencies)):
            size = stage.num_nodes + 1
            if not isinstance(adjacency, Tensor) or adjacency.dim() != 3 or tuple(adjacency.shape[1:]) != (size, size):
                raise ValueError(f"{where}: adjacencies[{k}] must be [S', {size}, {size}] (stage {k} has {stage.num_nodes} "
                                 f"nodes), got {tuple(adjacency.shape) if isinstance(adjacency, Tensor) else type(adjacency).__name__}")
            if adjacency.shape[0] != adjacencies[0].shape[0] or adjacency.shape[0] < 1:
                raise ValueError(f"{where}: every stage needs the same number S' >= 1 of architectures, got "
                                 f"{[a.shape[0] for a in adjacencies]}")
            if not bool(((adjacency == 0) | (adjacency == 1)).all()) or bool(torch.tril(adjacency).any()):
                raise ValueError(f"{where}: adjacencies[{k}] must hold 0/1 entries above the diagonal only (edges i -> j, i < j)")
        import copy

        other = copy.copy(self)
        other._modules = dict(self._modules)
        other.stages = nn.ModuleList()
        for stage, adjacency in zip(self.stages, adjacencies):
            clone = copy.copy(stage)
            clone._buffers = dict(stage._buffers)
            clone._buffers["adjacency"] = adjacency.float().to(stage.adjacency.device)
            clone.num_archs = adjacency.shape[0]
            other.stages.append(clone)
        other.num_archs = adjacencies[0].shape[0]
        return other
