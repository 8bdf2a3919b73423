"""The one-shot model of Bender et al. (2018, seed 004 §3.1), scaled for a CPU.

The network: a stem convolution, then ``num_stages`` stages of ``cells_per_stage`` identical cells,
a fixed reduction (both cell inputs average-pooled by 2 and widened 2x) between stages, and a
BN-ReLU-pool-linear head. Every convolution is preceded by its BatchNorm and ReLU (BN-ReLU-Conv).

A cell has ``num_blocks`` *choice blocks*. Block i can read 2 + i inputs: 0 is the output of the
cell two back, 1 that of the previous cell, 2 + j that of block j of the same cell. It

1. concatenates the inputs it uses and applies BN-ReLU-Conv1x1 to ``channels``. Because BN and ReLU
   act per channel, this equals the sum over used inputs k of BN_k-ReLU-Conv1x1_k(input_k), so an
   input is removed by dropping one term, which is how it is computed here;
2. applies the operations it uses to the result and sums them. The menu (:data:`OPERATIONS`):
   identity; pairs of depthwise-separable 3x3, 5x5 and 7x7 convolutions; a 1x7 then a 7x1
   convolution; 3x3 max and average pooling.

The cell's output is BN-ReLU-Conv1x1 of the concatenation of all its blocks. An
:class:`Architecture` fixes which inputs and operations each block uses; it is shared by every cell
(the paper drops the same operations in every cell).

One model class serves both roles:

* ``OneShotNet(arch=None)``: the one-shot model holding every input path and every operation.
  ``forward(x, masks)`` takes :class:`PathMasks`, 0/1 per example, constant within each ghost
  batch, so different ghost batches run different architectures. With ``fused=True`` each path
  runs only on the ghost batches that keep it (:func:`bnas_fast.nn.mix.mix_modules` over
  :func:`bnas_fast.mix_sparse`) and batch norm is the fused ghost-batch op; with ``fused=False`` it
  is the plain-PyTorch model that runs every path on every example and multiplies by the masks.
* ``OneShotNet(arch=a)``: the stand-alone model of architecture ``a``, holding only the paths ``a``
  uses, under the same state-dict keys (so :meth:`OneShotNet.extract` copies the shared weights).

Batch norm (§3.2): in the one-shot model statistics are always those of the current ghost batch of
``ghost_batch_size`` consecutive examples, in training and evaluation alike, because a candidate's
statistics are not known in advance. Since statistics never mix ghost batches, running a path only
on the ghost batches that keep it gives exactly what the masked dense model gives. A stand-alone
model trained from scratch uses ordinary ``nn.BatchNorm2d`` (``norm="batch"``).
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnas_fast import _checks
from bnas_fast.nn.mix import mix_modules
from bnas_fast.ops.arch_batch_norm import arch_batch_norm
from bnas_fast.sampling import PathDropoutSchedule, path_dropout_mask

__all__ = [
    "OPERATIONS",
    "ChoiceBlock",
    "Architecture",
    "PathMasks",
    "GhostBatchNorm2d",
    "OneShotNet",
    "sample_path_dropout_masks",
]

OPERATIONS: Tuple[str, ...] = ("identity", "sep3", "sep5", "sep7", "conv1x7_7x1", "max3", "avg3")


# ----------------------------------------------------------------------------------------------
# architectures: plain data
# ----------------------------------------------------------------------------------------------


def _sequence(value: Any, what: str) -> Sequence[Any]:
    """``value`` if it is a list or tuple; a clear error naming ``what`` otherwise (a string would be
    read character by character, a number or None would fail inside tuple())."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"Architecture: {what} must be a list, got {type(value).__name__} {value!r}")
    return value


@dataclass(frozen=True)
class ChoiceBlock:
    """Which inputs (0, 1: the two previous cells; 2 + j: block j) and operations one block uses."""

    inputs: Tuple[int, ...]
    ops: Tuple[str, ...]


@dataclass(frozen=True)
class Architecture:
    """A cell: one :class:`ChoiceBlock` per choice block, validated on construction.

    Serialises to JSON (:meth:`to_json` / :meth:`from_json`) and builds a stand-alone model through
    ``OneShotNet(arch=...)``. Inputs and operations are stored sorted (in menu order), so equal
    cells compare and hash equal.
    """

    blocks: Tuple[ChoiceBlock, ...]
    operations: Tuple[str, ...] = OPERATIONS

    def __post_init__(self) -> None:
        ops_menu = tuple(_sequence(self.operations, "operations"))
        if not ops_menu or len(set(ops_menu)) != len(ops_menu):
            raise ValueError(f"Architecture: operations must be a non-empty menu without repeats, got {ops_menu!r}")
        unknown = [o for o in ops_menu if o not in _OP_BUILDERS]
        if unknown:
            raise ValueError(f"Architecture: unknown operation(s) {unknown} in operations; known: {list(_OP_BUILDERS)}")
        blocks = []
        if not _sequence(self.blocks, "blocks"):
            raise ValueError("Architecture: blocks must hold at least one choice block")
        for i, block in enumerate(self.blocks):
            if isinstance(block, dict):
                unknown_keys = sorted(set(block) - {"inputs", "ops"})
                if unknown_keys:
                    raise ValueError(f"Architecture: blocks[{i}] has unknown keys {unknown_keys}; a block is "
                                     "{'inputs': [...], 'ops': [...]}")
                block = ChoiceBlock(block.get("inputs", ()), block.get("ops", ()))
            if not isinstance(block, ChoiceBlock):
                raise TypeError(f"Architecture: blocks[{i}] must be a ChoiceBlock or a dict, got {type(block).__name__}")
            inputs = tuple(_sequence(block.inputs, f"blocks[{i}].inputs"))
            ops = tuple(_sequence(block.ops, f"blocks[{i}].ops"))
            # integers of any integral type (a JSON reader may give numpy's)
            inputs = tuple(int(k) if isinstance(k, numbers.Integral) and not isinstance(k, bool) else k for k in inputs)
            if not inputs:
                raise ValueError(f"Architecture: blocks[{i}].inputs is empty; a block needs at least one input")
            if not ops:
                raise ValueError(f"Architecture: blocks[{i}].ops is empty; a block needs at least one operation")
            for k in inputs:
                if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < 2 + i:
                    raise ValueError(
                        f"Architecture: blocks[{i}].inputs references input {k!r}, which block {i} does not have "
                        f"(it can read 0..{1 + i}: 0 and 1 are the two previous cells, 2 + j is block j < {i})"
                    )
            if len(set(inputs)) != len(inputs):
                raise ValueError(f"Architecture: blocks[{i}].inputs repeats an input: {inputs}")
            for o in ops:
                if o not in ops_menu:
                    raise ValueError(f"Architecture: blocks[{i}].ops has {o!r}, not in the menu {list(ops_menu)}")
            if len(set(ops)) != len(ops):
                raise ValueError(f"Architecture: blocks[{i}].ops repeats an operation: {ops}")
            blocks.append(ChoiceBlock(tuple(sorted(inputs)), tuple(sorted(ops, key=ops_menu.index))))
        object.__setattr__(self, "blocks", tuple(blocks))
        object.__setattr__(self, "operations", ops_menu)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @classmethod
    def all_on(cls, num_blocks: int, operations: Sequence[str] = OPERATIONS) -> "Architecture":
        """Every input and every operation: the reference of §5's KL divergences."""
        _checks.check_int("num_blocks", num_blocks, "Architecture.all_on", 1)
        return cls(tuple(ChoiceBlock(tuple(range(2 + i)), tuple(operations)) for i in range(num_blocks)), tuple(operations))

    @classmethod
    def sample(
        cls,
        num_blocks: int,
        generator: Optional[torch.Generator] = None,
        max_inputs: int = 2,
        max_ops: int = 2,
        operations: Sequence[str] = OPERATIONS,
    ) -> "Architecture":
        """A random cell of the search space: block i takes n inputs of its 2 + i, n uniform in
        1..max_inputs, then a uniform subset of that size; likewise 1..max_ops operations."""
        op = "Architecture.sample"
        for name, value in (("num_blocks", num_blocks), ("max_inputs", max_inputs), ("max_ops", max_ops)):
            _checks.check_int(name, value, op, 1)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{op}: generator must be None or a torch.Generator, got {type(generator).__name__}")
        operations = tuple(operations)

        def subset(n_available: int, at_most: int) -> List[int]:
            n = 1 + int(torch.randint(min(at_most, n_available), (1,), generator=generator))
            return torch.randperm(n_available, generator=generator)[:n].tolist()

        blocks = []
        for i in range(num_blocks):
            inputs = subset(2 + i, max_inputs)
            ops = [operations[j] for j in subset(len(operations), max_ops)]
            blocks.append(ChoiceBlock(tuple(inputs), tuple(ops)))
        return cls(tuple(blocks), operations)

    def build(self, norm: str = "batch", **network: Any) -> "OneShotNet":
        """The stand-alone model of this cell: ``OneShotNet(arch=self, norm=norm, **network)``, by
        default with ordinary BatchNorm for training from scratch. ``network`` takes the other
        arguments of :class:`OneShotNet` (channels, cells_per_stage, ...); num_blocks and operations
        come from the architecture."""
        return OneShotNet(num_blocks=self.num_blocks, operations=self.operations, arch=self, norm=norm, **network)

    def to_dict(self) -> Dict[str, Any]:
        return {"operations": list(self.operations),
                "blocks": [{"inputs": list(b.inputs), "ops": list(b.ops)} for b in self.blocks]}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Architecture":
        if not isinstance(data, dict) or "blocks" not in data:
            raise ValueError("Architecture.from_dict: expected a dict with a 'blocks' list")
        unknown_keys = sorted(set(data) - {"blocks", "operations"})
        if unknown_keys:
            raise ValueError(f"Architecture.from_dict: unknown keys {unknown_keys}; expected 'blocks' and 'operations'")
        return cls(tuple(_sequence(data["blocks"], "blocks")), tuple(_sequence(data.get("operations", OPERATIONS), "operations")))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "Architecture":
        return cls.from_dict(json.loads(text))

    def __str__(self) -> str:
        return " | ".join(f"in{list(b.inputs)} {'+'.join(b.ops)}" for b in self.blocks)

    def path_masks(self, batch_size: int, dtype: torch.dtype = torch.float32, device=None) -> "PathMasks":
        """The masks that make the one-shot model run this architecture on every example."""
        _checks.check_int("batch_size", batch_size, "Architecture.path_masks", 0)
        inputs, ops = [], []
        for i, b in enumerate(self.blocks):
            m_in = torch.zeros(2 + i, dtype=dtype, device=device)
            m_in[list(b.inputs)] = 1
            m_op = torch.zeros(len(self.operations), dtype=dtype, device=device)
            m_op[[self.operations.index(o) for o in b.ops]] = 1
            inputs.append(m_in.expand(batch_size, -1))
            ops.append(m_op.expand(batch_size, -1))
        return PathMasks(inputs, ops)


@dataclass
class PathMasks:
    """Per-example keep masks of the one-shot model: ``inputs[i]`` [B, 2 + i] and ``ops[i]`` [B, K]
    for block i (K operations), 0 or 1, shared by every cell."""

    inputs: List[Tensor]
    ops: List[Tensor]

    @staticmethod
    def cat(masks: Sequence["PathMasks"]) -> "PathMasks":
        """Concatenate along the batch: the rows of masks[0], then masks[1], ..."""
        n = len(masks[0].ops)
        return PathMasks(
            [torch.cat([m.inputs[i] for m in masks]) for i in range(n)],
            [torch.cat([m.ops[i] for m in masks]) for i in range(n)],
        )

    def to(self, *args, **kwargs) -> "PathMasks":
        """Every mask through ``Tensor.to`` (0/1 are exact in any floating dtype)."""
        return PathMasks([m.to(*args, **kwargs) for m in self.inputs], [m.to(*args, **kwargs) for m in self.ops])


def sample_path_dropout_masks(
    batch_size: int,
    num_blocks: int,
    schedule: PathDropoutSchedule,
    step: int,
    ghost_batch_size: int,
    num_ops: int = len(OPERATIONS),
    generator: Optional[torch.Generator] = None,
) -> PathMasks:
    """Path dropout for one training batch (§3.2): per ghost batch, each input of block i is dropped
    with probability ``schedule.rate(step, 2 + i)`` and each operation with ``schedule.rate(step, K)``
    (the r^(1/k) rule, so the chance of dropping all k is r at the end of the schedule). A block that
    dropped all its inputs (or operations) keeps one chosen uniformly, so every ghost batch runs an
    architecture of the search space."""
    if not isinstance(ghost_batch_size, int) or ghost_batch_size < 1 or batch_size % ghost_batch_size:
        raise ValueError(
            f"sample_path_dropout_masks: ghost_batch_size must be a positive int dividing the batch of {batch_size}, "
            f"got {ghost_batch_size!r}"
        )
    inputs, ops = [], []
    for i in range(num_blocks):
        inputs.append(path_dropout_mask(batch_size, 2 + i, schedule.rate(step, 2 + i), ghost_batch_size,
                                        keep_at_least_one=True, generator=generator))
        ops.append(path_dropout_mask(batch_size, num_ops, schedule.rate(step, num_ops), ghost_batch_size,
                                     keep_at_least_one=True, generator=generator))
    return PathMasks(inputs, ops)


# ----------------------------------------------------------------------------------------------
# layers
# ----------------------------------------------------------------------------------------------


class GhostBatchNorm2d(nn.Module):
    """Batch norm over each ghost batch of ``ghost_batch_size`` consecutive examples, in training
    and evaluation alike (no running statistics, §3.2): for ghost batch G and channel c,
    ``y = (x - mean_G,c) / sqrt(var_G,c + eps) * weight[c] + bias[c]`` (biased variance).

    ``fused=True`` runs :func:`bnas_fast.functional.arch_batch_norm` with one architecture and
    ``group_size=ghost_batch_size``; ``fused=False`` is the plain-PyTorch reshape-mean-var version.
    Parameter names match ``nn.BatchNorm2d`` (``weight``, ``bias``).

    Shapes: x [B, C, H, W] with B a multiple of ``ghost_batch_size``.
    """

    def __init__(self, num_features: int, ghost_batch_size: int, eps: float = 1e-5, fused: bool = True):
        super().__init__()
        if not isinstance(ghost_batch_size, int) or ghost_batch_size < 2:
            raise ValueError(
                f"GhostBatchNorm2d: ghost_batch_size must be an int >= 2 (one example has no variance), got {ghost_batch_size!r}"
            )
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
            raise ValueError(f"GhostBatchNorm2d: eps must be a positive finite number, got {eps!r}")
        _checks.check_int("num_features", num_features, "GhostBatchNorm2d", 1)
        _checks.check_bool("fused", fused, "GhostBatchNorm2d")
        self.num_features, self.ghost_batch_size, self.eps, self.fused = num_features, ghost_batch_size, eps, fused
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def extra_repr(self) -> str:
        return f"{self.num_features}, ghost_batch_size={self.ghost_batch_size}, eps={self.eps}, fused={self.fused}"

    def forward(self, x: Tensor) -> Tensor:
        g = self.ghost_batch_size
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"GhostBatchNorm2d: x must be [B, C = {self.num_features}, H, W], got {tuple(x.shape)}")
        if x.shape[0] % g:
            raise ValueError(
                f"GhostBatchNorm2d: the batch of {x.shape[0]} is not a multiple of ghost_batch_size = {g}"
            )
        if self.fused:
            arch = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
            return arch_batch_norm(x, arch, self.weight.unsqueeze(0), self.bias.unsqueeze(0), training=True,
                                   eps=self.eps, group_size=g)
        B, C = x.shape[:2]
        xg = x.reshape(B // g, g, C, -1)  # reshape: x may be non-contiguous (e.g. transposed)
        mean = xg.mean(dim=(1, 3), keepdim=True)
        var = xg.var(dim=(1, 3), unbiased=False, keepdim=True)
        y = (xg - mean) * torch.rsqrt(var + self.eps)
        return (y.view(B, C, -1) * self.weight.view(1, C, 1) + self.bias.view(1, C, 1)).view(x.shape)


def _bn_relu_conv(make_norm: Callable[[int], nn.Module], c_in: int, c_out: int, kernel, padding=0, groups: int = 1) -> List[nn.Module]:
    return [make_norm(c_in), nn.ReLU(), nn.Conv2d(c_in, c_out, kernel, padding=padding, groups=groups, bias=False)]


def _separable_pair(make_norm, c: int, k: int) -> nn.Module:
    """Two depthwise-separable convolutions, each BN-ReLU-depthwise kxk-pointwise 1x1."""
    layers: List[nn.Module] = []
    for _ in range(2):
        layers += _bn_relu_conv(make_norm, c, c, k, padding=k // 2, groups=c)
        layers.append(nn.Conv2d(c, c, 1, bias=False))
    return nn.Sequential(*layers)


_OP_BUILDERS: Dict[str, Callable[[Callable[[int], nn.Module], int], nn.Module]] = {
    "identity": lambda make_norm, c: nn.Identity(),
    "sep3": lambda make_norm, c: _separable_pair(make_norm, c, 3),
    "sep5": lambda make_norm, c: _separable_pair(make_norm, c, 5),
    "sep7": lambda make_norm, c: _separable_pair(make_norm, c, 7),
    "conv1x7_7x1": lambda make_norm, c: nn.Sequential(
        *_bn_relu_conv(make_norm, c, c, (1, 7), padding=(0, 3)), *_bn_relu_conv(make_norm, c, c, (7, 1), padding=(3, 0))
    ),
    "max3": lambda make_norm, c: nn.MaxPool2d(3, stride=1, padding=1),
    "avg3": lambda make_norm, c: nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
}


def _masked_sum(paths: Sequence[nn.Module], inputs: Sequence[Tensor], weights: Tensor, fused: bool) -> Tensor:
    """sum_k weights[:, k] * paths[k](inputs[k]): fused runs path k only on the rows that keep it;
    plain runs every path on every row and multiplies by its column of the mask."""
    if fused:
        return mix_modules(paths, list(inputs), weights, sparse=True)
    out = None
    for k, (path, x) in enumerate(zip(paths, inputs)):
        term = path(x) * weights[:, k].view(-1, 1, 1, 1)
        out = term if out is None else out + term
    return out


class _Block(nn.Module):
    """One choice block: the input paths (ModuleDict keyed by input index) and operations (keyed by name)."""

    def __init__(self, make_norm, input_channels: Sequence[int], channels: int, inputs: Sequence[int], ops: Sequence[str]):
        super().__init__()
        self.input_ids, self.op_names = tuple(inputs), tuple(ops)
        self.inputs = nn.ModuleDict({str(k): nn.Sequential(*_bn_relu_conv(make_norm, input_channels[k], channels, 1)) for k in inputs})
        self.ops = nn.ModuleDict({name: _OP_BUILDERS[name](make_norm, channels) for name in ops})

    def forward(self, states: List[Tensor], input_mask: Optional[Tensor], op_mask: Optional[Tensor], fused: bool) -> Tensor:
        if input_mask is None:  # stand-alone (or all-on): every path this block holds
            h = sum(self.inputs[str(k)](states[k]) for k in self.input_ids)
            return sum(op(h) for op in self.ops.values())
        h = _masked_sum(list(self.inputs.values()), [states[k] for k in self.input_ids], input_mask, fused)
        return _masked_sum(list(self.ops.values()), [h] * len(self.op_names), op_mask, fused)


class _Cell(nn.Module):
    def __init__(self, make_norm, c_prev_prev: int, c_prev: int, channels: int, arch: Architecture):
        super().__init__()
        input_channels = [c_prev_prev, c_prev] + [channels] * arch.num_blocks
        self.blocks = nn.ModuleList(
            _Block(make_norm, input_channels, channels, b.inputs, b.ops) for b in arch.blocks
        )
        self.output = nn.Sequential(*_bn_relu_conv(make_norm, arch.num_blocks * channels, channels, 1))

    def forward(self, s0: Tensor, s1: Tensor, masks: Optional[PathMasks], fused: bool) -> Tensor:
        states = [s0, s1]
        for i, block in enumerate(self.blocks):
            m_in = None if masks is None else masks.inputs[i]
            m_op = None if masks is None else masks.ops[i]
            states.append(block(states, m_in, m_op, fused))
        return self.output(torch.cat(states[2:], dim=1))


class _Reduction(nn.Module):
    """Between stages: each of the two cell inputs goes through BN-ReLU-avgpool 2-Conv1x1 to 2C."""

    def __init__(self, make_norm, c_prev_prev: int, c_prev: int, c_out: int):
        super().__init__()

        def reduce(c_in: int) -> nn.Module:
            norm, relu, conv = _bn_relu_conv(make_norm, c_in, c_out, 1)
            return nn.Sequential(norm, relu, nn.AvgPool2d(2), conv)

        self.reduce0, self.reduce1 = reduce(c_prev_prev), reduce(c_prev)

    def forward(self, s0: Tensor, s1: Tensor) -> Tuple[Tensor, Tensor]:
        return self.reduce0(s0), self.reduce1(s1)


class OneShotNet(nn.Module):
    """The one-shot model (``arch=None``) or the stand-alone model of one architecture (module docstring).

    Args:
        in_channels, num_classes: of the data (e.g. 1 and 10 for Fashion-MNIST).
        channels: C of the first stage (doubled at each reduction).
        num_blocks: choice blocks per cell (N_choice; 4 in the paper).
        cells_per_stage, num_stages: cells per stage and stages (a reduction between stages).
        operations: the menu of operations (names from :data:`OPERATIONS`).
        ghost_batch_size: examples per ghost batch (batch-norm statistics and path masks).
        arch: None for the one-shot model, else the stand-alone model of that architecture.
        norm: "ghost" (ghost-batch statistics always; the one-shot model's) or "batch"
            (``nn.BatchNorm2d`` with running statistics; stand-alone models trained from scratch).
            A one-shot model with "batch" normalises each path over the examples that run it, so
            its fused and plain forms then differ (as for :class:`~bnas_fast.nn.MixedOp`).
        fused: the bnas_fast kernels (sparse path execution, fused ghost batch norm) or plain PyTorch.
        stem_stride: stride of the 3x3 stem convolution (2 halves the resolution of every cell).

    Shapes: x [B, in_channels, H, W] -> logits [B, num_classes]; B a multiple of
    ``ghost_batch_size`` when ``norm="ghost"``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: int = 16,
        num_blocks: int = 4,
        cells_per_stage: int = 2,
        num_stages: int = 2,
        operations: Sequence[str] = OPERATIONS,
        ghost_batch_size: int = 32,
        arch: Optional[Architecture] = None,
        norm: str = "ghost",
        fused: bool = True,
        stem_stride: int = 2,
    ):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("channels", channels),
                            ("num_blocks", num_blocks), ("cells_per_stage", cells_per_stage), ("num_stages", num_stages),
                            ("stem_stride", stem_stride), ("ghost_batch_size", ghost_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"OneShotNet: {name} must be a positive int, got {value!r}")
        if norm not in ("ghost", "batch"):
            raise ValueError(f"OneShotNet: norm must be 'ghost' or 'batch', got {norm!r}")
        operations = tuple(operations)
        if arch is not None:
            if not isinstance(arch, Architecture):
                raise TypeError(f"OneShotNet: arch must be an Architecture or None, got {type(arch).__name__}")
            if arch.num_blocks != num_blocks or arch.operations != operations:
                raise ValueError(
                    f"OneShotNet: arch has {arch.num_blocks} blocks over the menu {list(arch.operations)}, "
                    f"but the network has num_blocks = {num_blocks} over {list(operations)}"
                )
        cell_arch = arch if arch is not None else Architecture.all_on(num_blocks, operations)
        if norm == "ghost":
            GhostBatchNorm2d(1, ghost_batch_size)  # validates ghost_batch_size
            make_norm = lambda c: GhostBatchNorm2d(c, ghost_batch_size, fused=fused)  # noqa: E731
        else:
            make_norm = nn.BatchNorm2d
        self.config = dict(in_channels=in_channels, num_classes=num_classes, channels=channels, num_blocks=num_blocks,
                           cells_per_stage=cells_per_stage, num_stages=num_stages, operations=operations,
                           ghost_batch_size=ghost_batch_size, stem_stride=stem_stride)
        self.arch, self.norm, self.fused = arch, norm, fused
        self.num_blocks, self.operations, self.ghost_batch_size = num_blocks, operations, ghost_batch_size

        self.stem = nn.Conv2d(in_channels, channels, 3, stride=stem_stride, padding=1, bias=False)
        layers: List[nn.Module] = []
        c_pp = c_p = c = channels
        for stage in range(num_stages):
            if stage > 0:
                c *= 2
                layers.append(_Reduction(make_norm, c_pp, c_p, c))
                c_pp = c_p = c
            for _ in range(cells_per_stage):
                layers.append(_Cell(make_norm, c_pp, c_p, c, cell_arch))
                c_pp, c_p = c_p, c
        self.layers = nn.ModuleList(layers)
        self.head_norm = make_norm(c)
        self.classifier = nn.Linear(c, num_classes)

    def extra_repr(self) -> str:
        kind = "one-shot" if self.arch is None else f"stand-alone [{self.arch}]"
        return f"{kind}, norm={self.norm}, fused={self.fused}"

    def forward(self, x: Tensor, masks: Optional[PathMasks] = None) -> Tensor:
        if masks is not None:
            if self.arch is not None:
                raise ValueError("OneShotNet: masks are for the one-shot model (arch=None); this is a stand-alone model")
            self._check_masks(masks, x.shape[0])
            masks = masks.to(dtype=x.dtype, device=x.device)
        if self.norm == "ghost" and x.shape[0] % self.ghost_batch_size:
            raise ValueError(f"OneShotNet: the batch of {x.shape[0]} is not a multiple of ghost_batch_size = {self.ghost_batch_size}")
        s0 = s1 = self.stem(x)
        for layer in self.layers:
            if isinstance(layer, _Reduction):
                s0, s1 = layer(s0, s1)
            else:
                s0, s1 = s1, layer(s0, s1, masks, self.fused)
        h = F.relu(self.head_norm(s1))
        return self.classifier(h.mean(dim=(2, 3)))

    def _check_masks(self, masks: PathMasks, batch: int) -> None:
        if not isinstance(masks, PathMasks) or len(masks.inputs) != self.num_blocks or len(masks.ops) != self.num_blocks:
            raise ValueError(f"OneShotNet: masks must be PathMasks with {self.num_blocks} blocks")
        for i, (m_in, m_op) in enumerate(zip(masks.inputs, masks.ops)):
            for name, m, width in ((f"masks.inputs[{i}]", m_in, 2 + i), (f"masks.ops[{i}]", m_op, len(self.operations))):
                _checks.check_tensor(name, m, "OneShotNet")
                if m.shape != (batch, width):
                    raise ValueError(f"OneShotNet: {name} must have shape [{batch}, {width}], got {tuple(m.shape)}")
                if torch.compiler.is_compiling():
                    continue
                # Both checks in one read of the result (one sync when all is well). 0/1 is reported
                # first: a fractional mask would silently scale paths, and a NaN one would look
                # not constant (NaN != NaN) to the ghost-batch check.
                binary = (m == 0) | (m == 1)
                g = self.ghost_batch_size
                ghosts = m.reshape(batch // g, g, width) if batch % g == 0 else None
                constant = (ghosts == ghosts[:, :1]).all() if ghosts is not None else torch.tensor(True, device=m.device)
                if bool(binary.all() & constant):
                    continue
                if not bool(binary.all()):
                    row, col = (~binary).nonzero()[0].tolist()
                    raise ValueError(
                        f"OneShotNet: {name} must hold only 0 and 1 (keep or drop a path per example), "
                        f"got {float(m[row, col])} at [{row}, {col}]"
                    )
                raise ValueError(f"OneShotNet: {name} must be constant within each ghost batch of {g} examples")

    # ------------------------------------------------------------------------------------------

    def l2_penalty(self, masks: Optional[PathMasks] = None) -> Tensor:
        """sum over convolution and linear weights of u * ||w||^2, where u is the fraction of the
        batch whose architecture uses the weight (1 for weights every architecture has). Adding
        ``weight_decay / 2`` times this to the mean loss is L2 "only on the parts the current
        architecture uses" (§3.2), averaged over the ghost batches' architectures."""
        total = self.classifier.weight.pow(2).sum() + self.stem.weight.pow(2).sum()
        for layer in self.layers:
            if isinstance(layer, _Reduction):
                total = total + _weights_sq(layer)
                continue
            total = total + _weights_sq(layer.output)
            for i, block in enumerate(layer.blocks):
                for k in block.input_ids:
                    u = 1.0 if masks is None else masks.inputs[i][:, k].mean()
                    total = total + u * _weights_sq(block.inputs[str(k)])
                for name, op in block.ops.items():
                    u = 1.0 if masks is None else masks.ops[i][:, self.operations.index(name)].mean()
                    total = total + u * _weights_sq(op)
        return total

    def extract(self, arch: Architecture, fused: bool = False) -> "OneShotNet":
        """The stand-alone model of ``arch`` (ghost-batch norm, like the one-shot model) carrying the
        one-shot model's weights for the paths ``arch`` uses; in the same mode as this model. It
        computes what ``self(x, arch.path_masks(len(x)))`` computes."""
        if self.arch is not None:
            raise ValueError("OneShotNet.extract: call it on the one-shot model (arch=None)")
        reference = next(self.parameters())
        model = OneShotNet(**self.config, arch=arch, norm=self.norm, fused=fused).to(reference)  # its dtype and device
        own = self.state_dict()
        model.load_state_dict({key: own[key] for key in model.state_dict()})
        return model.train(self.training)

    def num_parameters(self, arch: Optional[Architecture] = None) -> int:
        """Parameters of the stand-alone model of ``arch`` (of this model when None)."""
        if arch is None:
            return sum(p.numel() for p in self.parameters())
        return OneShotNet(**self.config, arch=arch, norm=self.norm).num_parameters()


def _weights_sq(module: nn.Module) -> Tensor:
    return sum(m.weight.pow(2).sum() for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
