"""BayesNAS (seed 003, issue 6): a small cell-based super-network with edge and operation switches,
its pruned ("derived") architectures and stand-alone networks built from them.

    net = BayesNASSupernet(in_channels=1, num_classes=10, channels=8)
    groups = net.switch_groups()            # {"normal/in0->n0/edge": [Switch, Switch], ...}
    arch = {"normal": {"in0->n0": ["conv3"], ...}, "reduction": {...}}
    child = build_network(arch, 1, 10, channels=8)   # only the kept operations, no switches

The macro structure (sized for a CPU): stem (3x3 conv + BN), then the cells of ``layout`` (default
normal, reduction, normal; a reduction cell halves the resolution and doubles the channels), global
average pooling and a linear layer. A cell takes the two previous cell outputs (the stem output
stands in for missing ones), preprocesses each to C channels by ReLU-1x1 conv-BN (stride 2 when its
resolution is twice the cell's input resolution), and has 4 intermediate nodes over the restricted
edge set of the authors' code (notes section 1):

* normal: n0, n1, n2 <- {in0, in1}; n3 <- {in1, n0};
* reduction: n0 <- {in0, in1} (stride 2); n1, n2, n3 <- {in1 (stride 2), n0}.

On an edge i -> j of the super-network, an *edge switch* s_ij multiplies the edge input (it is the
"zero operation": s_ij -> 0 removes the edge, notes section 4), and each operation o has its own
*operation switch*: the edge's output is sum_o s_ij^o o(s_ij x_i). A node is the sum of its edges.
The cell output is the concatenation of the (live) nodes mapped back to C channels by a 1x1 conv+BN.
Every parametrised layer is a Conv2d, BatchNorm2d, Linear or Switch, so
:class:`bnas_fast.curvature.GGNBlocks` supports the whole super-network.
"""

from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from bnas_fast.curvature import Switch

__all__ = [
    "OPERATIONS", "CELL_EDGES", "NUM_NODES", "BayesNASSupernet", "DerivedNetwork", "build_network",
    "full_architecture", "random_architecture", "architecture_to_json", "architecture_from_json",
    "count_parameters", "node_inputs", "edge_key",
]

OPERATIONS: Tuple[str, ...] = ("conv3", "conv5", "max3", "avg3", "skip")
NUM_NODES = 4
CELL_EDGES: Dict[str, Tuple[str, ...]] = {
    "normal": ("in0->n0", "in1->n0", "in0->n1", "in1->n1", "in0->n2", "in1->n2", "in1->n3", "n0->n3"),
    "reduction": ("in0->n0", "in1->n0", "in1->n1", "n0->n1", "in1->n2", "n0->n2", "in1->n3", "n0->n3"),
}
CELL_TYPES = ("normal", "reduction")


def edge_key(edge: str) -> str:
    """The ModuleDict key of an edge name ("in0->n0" -> "in0_to_n0"; module names cannot hold '.')."""
    return edge.replace("->", "_to_")


def _ends(edge: str) -> Tuple[str, str]:
    src, dst = edge.split("->")
    return src, dst


def node_inputs(cell_type: str) -> Dict[str, List[str]]:
    """{node: [incoming edge names]} of the full edge set of ``cell_type``, nodes in order."""
    out: Dict[str, List[str]] = {f"n{j}": [] for j in range(NUM_NODES)}
    for edge in CELL_EDGES[cell_type]:
        out[_ends(edge)[1]].append(edge)
    return out


def _op(name: str, channels: int, stride: int) -> nn.Module:
    if name in ("conv3", "conv5"):
        k = 3 if name == "conv3" else 5
        return nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, k, stride, k // 2, bias=False), nn.BatchNorm2d(channels))
    if name == "max3":
        return nn.MaxPool2d(3, stride, 1)
    if name == "avg3":
        return nn.AvgPool2d(3, stride, 1, count_include_pad=False)
    if name == "skip":
        if stride == 1:
            return nn.Identity()
        # the identity of a stride-2 edge: ReLU-1x1 conv (stride 2)-BN, as the authors' reduction cells
        return nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1, 2, bias=False), nn.BatchNorm2d(channels))
    raise ValueError(f"unknown operation {name!r}; known: {OPERATIONS}")


class Edge(nn.Module):
    """The operations of one edge; with ``switches`` an edge switch and one switch per operation."""

    def __init__(self, ops: Sequence[str], channels: int, stride: int, switches: bool):
        super().__init__()
        self.ops = nn.ModuleDict({o: _op(o, channels, stride) for o in ops})
        self.edge_switch = Switch() if switches else None
        self.op_switches = nn.ModuleDict({o: Switch() for o in ops}) if switches else None
        self.alive = {o: True for o in ops}  # pruning mask (switch networks only)

    def forward(self, x: Tensor) -> Tensor:
        if self.edge_switch is not None:
            x = self.edge_switch(x)
        out = None
        for name, op in self.ops.items():
            if not self.alive[name]:
                continue
            y = op(x)
            if self.op_switches is not None:
                y = self.op_switches[name](y)
            out = y if out is None else out + y
        return out


class Cell(nn.Module):
    """One cell over the edges ``edges`` ({edge: [operations]}; edges missing or empty are absent)."""

    def __init__(self, cell_type: str, edges: Dict[str, List[str]], c_prev_prev: int, c_prev: int, channels: int,
                 reduce_prev: bool, switches: bool):
        super().__init__()
        self.cell_type, self.reduction = cell_type, cell_type == "reduction"

        def pre(c_in: int, stride: int) -> nn.Module:
            return nn.Sequential(nn.ReLU(), nn.Conv2d(c_in, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))

        self.pre0 = pre(c_prev_prev, 2 if reduce_prev else 1)
        self.pre1 = pre(c_prev, 1)
        self.edges = nn.ModuleDict()
        self.edge_names: List[str] = []
        for edge in CELL_EDGES[cell_type]:
            ops = list(edges.get(edge, []))
            if not ops:
                continue
            src = _ends(edge)[0]
            stride = 2 if self.reduction and src.startswith("in") else 1
            self.edges[edge_key(edge)] = Edge(ops, channels, stride, switches)
            self.edge_names.append(edge)
        self.live_nodes = self._live_nodes()
        if not self.live_nodes:
            raise ValueError(f"{cell_type} cell: no intermediate node has a live input; edges {edges}")
        self.post = nn.Sequential(nn.Conv2d(channels * len(self.live_nodes), channels, 1, bias=False), nn.BatchNorm2d(channels))

    def _live_nodes(self) -> List[str]:
        """Nodes with at least one live incoming edge from a live source, in order."""
        live = {"in0", "in1"}
        for j in range(NUM_NODES):
            node = f"n{j}"
            for edge in self.edge_names:
                src, dst = _ends(edge)
                if dst == node and src in live and any(self.edges[edge_key(edge)].alive.values()):
                    live.add(node)
        return [f"n{j}" for j in range(NUM_NODES) if f"n{j}" in live]

    def forward(self, s0: Tensor, s1: Tensor) -> Tensor:
        states = {"in0": self.pre0(s0), "in1": self.pre1(s1)}
        for j in range(NUM_NODES):
            node, total = f"n{j}", None
            for edge in self.edge_names:
                src, dst = _ends(edge)
                if dst != node or src not in states:
                    continue
                e = self.edges[edge_key(edge)]
                if e.edge_switch is not None and not any(e.alive.values()):
                    continue
                y = e(states[src])
                total = y if total is None else total + y
            if total is not None:
                states[node] = total
        return self.post(torch.cat([states[n] for n in self.live_nodes], 1))


class _CellNetwork(nn.Module):
    def __init__(self, arch: Dict[str, Dict[str, List[str]]], in_channels: int, num_classes: int, channels: int,
                 layout: Sequence[str], switches: bool):
        super().__init__()
        for t in layout:
            if t not in CELL_TYPES:
                raise ValueError(f"layout: unknown cell type {t!r}; known: {CELL_TYPES}")
        self.layout = tuple(layout)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels))
        c_pp, c_p, c = channels, channels, channels
        reduce_prev = False
        self.cells = nn.ModuleList()
        for t in self.layout:
            if t == "reduction":
                c *= 2
            self.cells.append(Cell(t, arch.get(t, {}), c_pp, c_p, c, reduce_prev, switches))
            reduce_prev = t == "reduction"
            c_pp, c_p = c_p, c
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_p, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(self.pool(s1).flatten(1))


def full_architecture(ops: Sequence[str] = OPERATIONS) -> Dict[str, Dict[str, List[str]]]:
    """Every edge with every operation: the super-network's architecture."""
    return {t: {e: list(ops) for e in CELL_EDGES[t]} for t in CELL_TYPES}


class BayesNASSupernet(_CellNetwork):
    """The super-network: every edge of :data:`CELL_EDGES` with every operation of ``ops``, with
    switches (module docstring)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 8,
                 layout: Sequence[str] = ("normal", "reduction", "normal"), ops: Sequence[str] = OPERATIONS):
        for o in ops:
            if o not in OPERATIONS:
                raise ValueError(f"ops: unknown operation {o!r}; known: {OPERATIONS}")
        self.op_names = tuple(ops)
        super().__init__(full_architecture(ops), in_channels, num_classes, channels, layout, switches=True)

    def switch_groups(self) -> Dict[str, List[Switch]]:
        """{"<cell type>/<edge>/edge" or "<cell type>/<edge>/<op>": the switches at that position in
        every cell of that type, in cell order}. Groups of a cell type absent from the layout are absent."""
        groups: Dict[str, List[Switch]] = {}
        for cell in self.cells:
            for edge in cell.edge_names:
                e = cell.edges[edge_key(edge)]
                groups.setdefault(f"{cell.cell_type}/{edge}/edge", []).append(e.edge_switch)
                for o, s in e.op_switches.items():
                    groups.setdefault(f"{cell.cell_type}/{edge}/{o}", []).append(s)
        return groups

    def switch_names(self) -> Dict[str, str]:
        """{module name of a switch (as in named_modules): its group key}."""
        ids = {id(s): key for key, members in self.switch_groups().items() for s in members}
        return {name: ids[id(m)] for name, m in self.named_modules() if isinstance(m, Switch)}

    def switch_parameters(self) -> List[nn.Parameter]:
        return [m.weight for m in self.modules() if isinstance(m, Switch)]

    def weight_parameters(self) -> List[nn.Parameter]:
        ids = {id(p) for p in self.switch_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]

    def apply_architecture(self, arch: Optional[Dict[str, Dict[str, List[str]]]]) -> None:
        """The pruning mask: every switch not in ``arch`` (edge switch: edge absent or empty; op switch:
        op not listed) is fixed to 0 (value 0, ``requires_grad`` off) and its operation is no longer
        computed; nodes left without live input drop out of the cell output. ``None`` turns every
        switch back on (switches keep their values; dead ones stay 0 until retrained). A node once
        dropped cannot come back (its columns of the cell's output convolution are gone): asking for
        it raises ValueError and leaves the network unchanged.
        Note: a masked super-network cannot be passed to GGNBlocks (the dead switches never run)."""
        # 1. the new alive flags of every cell, checked before any weight changes
        snapshot = [(e, dict(e.alive)) for cell in self.cells for e in cell.edges.values()]
        kept_by_edge, live_by_cell = {}, []
        for cell in self.cells:
            kept_edges = None if arch is None else arch.get(cell.cell_type, {})
            for edge in cell.edge_names:
                e = cell.edges[edge_key(edge)]
                kept = set(e.ops) if kept_edges is None else set(kept_edges.get(edge, []))
                kept_by_edge[id(e)] = kept
                for o in e.ops:
                    e.alive[o] = o in kept
            live = cell._live_nodes()
            if not all(n in cell.live_nodes for n in live):
                for e, alive in snapshot:
                    e.alive.clear()
                    e.alive.update(alive)
                raise ValueError("apply_architecture: cannot revive nodes of an already masked super-network (its "
                                 "output convolution lost their columns); build a new super-network instead")
            live_by_cell.append(live)
        # 2. the switches and the output convolutions
        for cell, live in zip(self.cells, live_by_cell):
            for edge in cell.edge_names:
                e = cell.edges[edge_key(edge)]
                kept = kept_by_edge[id(e)]
                for o in e.ops:
                    if not e.alive[o]:
                        with torch.no_grad():
                            e.op_switches[o].weight.zero_()
                    e.op_switches[o].weight.requires_grad_(e.alive[o])
                if not kept:
                    with torch.no_grad():
                        e.edge_switch.weight.zero_()
                e.edge_switch.weight.requires_grad_(bool(kept))
            if live != cell.live_nodes:
                # the output 1x1 conv's input channels follow the live nodes: keep the columns of the kept ones
                conv = cell.post[0]
                c = conv.out_channels
                cols = torch.cat([torch.arange(i * c, (i + 1) * c) for i, n in enumerate(cell.live_nodes) if n in live])
                new = nn.Conv2d(c * len(live), c, 1, bias=False, device=conv.weight.device, dtype=conv.weight.dtype)
                with torch.no_grad():
                    new.weight.copy_(conv.weight[:, cols.to(conv.weight.device)])
                cell.post[0] = new
                cell.live_nodes = live


class DerivedNetwork(_CellNetwork):
    """A stand-alone network of a derived architecture: only the kept operations, no switches."""

    def __init__(self, arch: Dict[str, Dict[str, List[str]]], in_channels: int, num_classes: int, channels: int = 8,
                 layout: Sequence[str] = ("normal", "reduction", "normal")):
        check_architecture(arch)
        self.architecture = {t: {e: list(v) for e, v in arch.get(t, {}).items() if v} for t in CELL_TYPES}
        super().__init__(arch, in_channels, num_classes, channels, layout, switches=False)


def build_network(arch, in_channels: int, num_classes: int, channels: int = 8,
                  layout: Sequence[str] = ("normal", "reduction", "normal")) -> DerivedNetwork:
    """:class:`DerivedNetwork` from an architecture dict or its JSON string."""
    if isinstance(arch, str):
        arch = architecture_from_json(arch)
    return DerivedNetwork(arch, in_channels, num_classes, channels, layout)


def check_architecture(arch: Dict[str, Dict[str, List[str]]]) -> None:
    if not isinstance(arch, dict):
        raise ValueError(f"architecture must be a dict {{cell type: {{edge: [ops]}}}}, got {type(arch).__name__}")
    for t, edges in arch.items():
        if t not in CELL_TYPES:
            raise ValueError(f"architecture: unknown cell type {t!r}; known: {CELL_TYPES}")
        for e, ops in edges.items():
            if e not in CELL_EDGES[t]:
                raise ValueError(f"architecture: {t} cell has no edge {e!r}; edges: {CELL_EDGES[t]}")
            for o in ops:
                if o not in OPERATIONS:
                    raise ValueError(f"architecture: {t} edge {e}: unknown operation {o!r}; known: {OPERATIONS}")


def architecture_to_json(arch: Dict[str, Dict[str, List[str]]]) -> str:
    check_architecture(arch)
    return json.dumps({t: {e: list(v) for e, v in arch[t].items()} for t in arch}, sort_keys=True)


def architecture_from_json(text: str) -> Dict[str, Dict[str, List[str]]]:
    arch = json.loads(text)
    check_architecture(arch)
    return arch


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def random_architecture(generator: torch.Generator, ops: Sequence[str] = OPERATIONS,
                        edge_keep: float = 0.5, op_keep: float = 0.5) -> Dict[str, Dict[str, List[str]]]:
    """A random architecture: each edge kept with probability ``edge_keep`` (at least one input per
    node, drawn uniformly when none is), each operation of a kept edge with probability ``op_keep``
    (at least one, drawn uniformly when none is)."""
    arch: Dict[str, Dict[str, List[str]]] = {}
    for t in CELL_TYPES:
        arch[t] = {}
        for node, edges in node_inputs(t).items():
            keep = [e for e in edges if float(torch.rand((), generator=generator)) < edge_keep]
            if not keep:
                keep = [edges[int(torch.randint(len(edges), (), generator=generator))]]
            for e in keep:
                mask = torch.rand(len(ops), generator=generator) < op_keep
                if not bool(mask.any()):
                    mask[int(torch.randint(len(ops), (), generator=generator))] = True
                arch[t][e] = [o for o, m in zip(ops, mask.tolist()) if m]
    return arch
