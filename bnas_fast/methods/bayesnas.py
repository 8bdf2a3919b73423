"""BayesNAS (Zhou et al. 2019; seed 003, issue 6): search with switch Hessians, prune, retrain.

    from bnas_fast.methods import bayesnas
    results = bayesnas.run({"dataset": "digits", "seed": 0, "out_dir": "runs/bayesnas/seed0"})

or ``bnas-fast run bayesnas [--seeds 0 1] [--search-epochs E] ...``. One run, after
the BayesNAS notes (``shared/notes/bayesnas.md`` beside this repository) sections 1, 3 and 4 (the algorithm as in the authors' code):

1. data: Fashion-MNIST from the Debian package (a subset), else sklearn digits. The search and the
   retraining both use the training split; accuracies are on the test split (nothing is selected on it);
2. a :class:`~bnas_fast.nn.bayesnas.BayesNASSupernet` (edge switches = the zero operation, one switch
   per operation after it); ``warmup_epochs`` of weights-only training (the code's "epoch A"), then
   for each of ``search_epochs``: one epoch of SGD on weights and switches on
   NLL + sum_g lambda_g omega_g ||s_g||_2 (groups = the same switch in every cell of one type;
   lambda_edge for edge switches, lambda_op for operation switches), then the switch Hessians H_s
   (exact or Monte-Carlo GGN by :class:`bnas_fast.curvature.GGNBlocks`, or with
   ``hessian_mode="diag_recursion"`` the authors' truncated diagonal recursion by
   :func:`bnas_fast.curvature.diagonal_recursion_hessians`; per example, averaged over
   ``hessian_batches`` batches) and the Laplace update of notes 3.2 per group
   (:func:`laplace_update`), then the hierarchical coupling gamma_op <- (1/gamma_op + 1/gamma_edge)^-1
   (:func:`couple`);
3. pruning by a threshold on gamma that keeps the cell connected (:func:`prune`);
4. the derived cells trained from scratch (``retrain_epochs``) and a random architecture of about the
   same parameter count on the same budget; the test accuracy of both;
5. ``results.json`` and PNG plots: gamma of every edge and operation per cell type (heat map) and the
   derived cells drawn as graphs.

Everything random derives from ``seed`` (initialisation under ``fork_rng``, batch orders, the
Hessian batches and the random architecture from ``torch.Generator``s): the same seed gives the same run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnas_fast.curvature import GGNBlocks, diagonal_recursion_hessians
from bnas_fast.data.images import fashion_mnist_available, load_images
from bnas_fast.methods._config import check_int_fields, config_from_any, eval_accuracy, save_run, torch_threads, keeps_global_rng
from bnas_fast.nn.arch_batch_norm import recalibrate_batch_norm as calibrate_batch_norm
from bnas_fast.nn.bayesnas import (
    CELL_EDGES, CELL_TYPES, NUM_NODES, OPERATIONS, BayesNASSupernet, build_network, count_parameters,
    node_inputs, random_architecture,
)

#: ``hessian_mode`` values: see :func:`switch_hessians`.
HESSIAN_MODES = ("exact", "mc", "diag_recursion")

__all__ = ["BayesNASConfig", "run", "laplace_update", "couple", "prune", "add_arguments", "main"]


@dataclass
class BayesNASConfig:
    """Every knob of a run. ``None`` means the default for the data (see :meth:`resolved`).

    Defaults: Fashion-MNIST on a 5,000 / 2,000 subset, 1 warm-up + 3 search epochs, 5 retraining
    epochs; digits (its 1,438 / 359 split) 2 + 8 search epochs and 20 retraining epochs. C = 8 channels,
    cells normal-reduction-normal over conv3, conv5, max3, avg3, skip; batch 64; SGD lr 0.05
    momentum 0.9 weight decay 3e-4 on weights (cosine schedule when retraining, constant while
    searching, as the authors' code), SGD lr 0.05 momentum 0.9 on the switches; lambda = 0.01 for
    edge and operation switches; exact GGN on 4 batches of 64; gamma = omega = 1 at the start;
    threshold 0.1 on gamma (see :func:`prune`).
    """

    dataset: str = "fashion"
    seed: int = 0
    channels: int = 8
    layout: Tuple[str, ...] = ("normal", "reduction", "normal")
    ops: Tuple[str, ...] = OPERATIONS
    warmup_epochs: Optional[int] = None
    search_epochs: Optional[int] = None
    retrain_epochs: Optional[int] = None
    batch_size: int = 64
    lr: float = 0.05
    switch_lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 3e-4
    lambda_edge: float = 0.01
    lambda_op: float = 0.01
    hessian_mode: str = "exact"
    hessian_batches: Optional[int] = None
    hessian_batch_size: int = 64
    init_gamma: float = 1.0
    init_omega: float = 1.0
    threshold: float = 0.1
    keep_one_input: bool = True
    random_candidates: int = 200
    n_train: Optional[int] = None
    n_test: Optional[int] = None
    data_root: Optional[str] = None
    out_dir: Optional[str] = None
    plots: bool = True
    progress: bool = True
    threads: int = 1
    quick: bool = False

    @classmethod
    def from_any(cls, config: Union["BayesNASConfig", Dict[str, Any], None]) -> "BayesNASConfig":
        return config_from_any(cls, config, "bayesnas")

    def resolved(self) -> "BayesNASConfig":
        c = copy.deepcopy(self)
        if c.dataset not in ("fashion", "digits"):
            raise ValueError(f"bayesnas: dataset must be 'fashion' or 'digits', got {c.dataset!r}")
        fashion = c.dataset == "fashion" and fashion_mnist_available(c.data_root or "/usr/share/datasets/fashion-mnist")
        if c.warmup_epochs is None:
            c.warmup_epochs = 0 if c.quick else (1 if fashion else 2)
        if c.search_epochs is None:
            c.search_epochs = 1 if c.quick else (3 if fashion else 8)
        if c.retrain_epochs is None:
            c.retrain_epochs = 1 if c.quick else (5 if fashion else 20)
        if c.n_train is None:
            c.n_train = 256 if c.quick else (5_000 if fashion else None)
        if c.n_test is None:
            c.n_test = 128 if c.quick else (2_000 if fashion else None)
        if c.hessian_batches is None:
            c.hessian_batches = 1 if c.quick else 4
        if c.quick:
            c.random_candidates = min(c.random_candidates, 20)
        if not isinstance(c.layout, (tuple, list)) or not c.layout or any(t not in CELL_TYPES for t in c.layout):
            raise ValueError(f"bayesnas: layout must be a non-empty sequence of {CELL_TYPES}, got {c.layout!r}")
        if not isinstance(c.ops, (tuple, list)) or not c.ops or any(o not in OPERATIONS for o in c.ops) or len(set(c.ops)) != len(c.ops):
            raise ValueError(f"bayesnas: ops must be distinct operations of {OPERATIONS}, got {c.ops!r}")
        c.layout, c.ops = tuple(c.layout), tuple(c.ops)
        check_int_fields("bayesnas", c, (
            ("channels", 1), ("warmup_epochs", 0), ("search_epochs", 1), ("retrain_epochs", 0), ("batch_size", 2),
            ("hessian_batches", 1), ("hessian_batch_size", 1), ("random_candidates", 1), ("threads", 1),
        ))
        for key in ("n_train", "n_test"):
            value = getattr(c, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
                raise ValueError(f"bayesnas: {key} must be None or an int >= 2, got {value!r}")
        if isinstance(c.seed, bool) or not isinstance(c.seed, int):
            raise ValueError(f"bayesnas: seed must be an int, got {c.seed!r}")

        def number(key: str, ok: Callable[[float], bool], what: str) -> None:
            value = getattr(c, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
                raise ValueError(f"bayesnas: {key} must be a finite number {what}, got {value!r}")

        for key in ("lr", "switch_lr", "lambda_edge", "lambda_op", "init_gamma", "init_omega"):
            number(key, lambda v: v > 0, "> 0")
        number("momentum", lambda v: 0 <= v < 1, "in [0, 1)")
        number("weight_decay", lambda v: v >= 0, ">= 0")
        number("threshold", lambda v: v >= 0, ">= 0")
        if c.hessian_mode not in HESSIAN_MODES:
            raise ValueError(f"bayesnas: hessian_mode must be one of {HESSIAN_MODES}, got {c.hessian_mode!r}")
        if not isinstance(c.keep_one_input, bool):
            raise ValueError(f"bayesnas: keep_one_input must be a bool, got {c.keep_one_input!r}")
        return c


# ----------------------------------------------------------------------------------------------
# the update rules (notes section 3.2) and pruning (notes sections 3.4 and 4)
# ----------------------------------------------------------------------------------------------


def laplace_update(gamma: float, hessians: Sequence[float], switches: Sequence[float], lam: float) -> Dict[str, Any]:
    """One group's hyper-parameter update (notes 3.2), in float64:

    c_k = (1/gamma + H_k/lam)^-1, omega = sqrt(sum_k |1/gamma - c_k/gamma^2|), gamma' = ||s||_2 / omega.

    ``gamma`` is the group's current (shared) prior variance, ``hessians`` and ``switches`` the H_k and
    s_k of its members. Returns {"gamma", "omega", "cov"}. omega is floored at 1e-12 so that a group
    with zero curvature gets a large but finite gamma. gamma = 0 (a group whose switches were all
    0 at the last update) takes the limit gamma -> 0: c_k = 0 and |1/gamma - c_k/gamma^2| =
    (H_k/lam) / (1 + gamma H_k/lam) -> H_k/lam (the formula itself would divide by 0).
    """
    g = float(gamma)
    h = torch.tensor([float(v) for v in hessians], dtype=torch.float64)
    s = torch.tensor([float(v) for v in switches], dtype=torch.float64)
    if g == 0.0:
        cov = torch.zeros_like(h)
        omega = max(float(torch.sqrt((h / lam).abs().sum())), 1e-12)
        return {"gamma": float(s.norm()) / omega, "omega": omega, "cov": cov.tolist()}
    cov = 1.0 / (1.0 / g + h / lam)
    omega = max(float(torch.sqrt((1.0 / g - cov / g**2).abs().sum())), 1e-12)
    return {"gamma": float(s.norm()) / omega, "omega": omega, "cov": cov.tolist()}


def couple(gamma_op: float, gamma_edge: float) -> float:
    """The hierarchical (HARD) prior: the operation's precision plus its edge's, (1/g_op + 1/g_edge)^-1."""
    if gamma_op <= 0 or gamma_edge <= 0:
        return 0.0
    return 1.0 / (1.0 / gamma_op + 1.0 / gamma_edge)


def prune(gammas: Dict[str, Dict[str, Dict[str, float]]], threshold: float, keep_one_input: bool = True,
          ops: Sequence[str] = OPERATIONS) -> Tuple[Dict[str, Dict[str, List[str]]], List[str]]:
    """The derived architecture from ``gammas`` ({cell type: {edge: {"edge": gamma, op: gamma}}}, the
    operation gammas already coupled), and the list of decisions forced by the connectivity rule.

    Nodes are visited in order; an edge is a candidate only if its source is alive (a cell input, or
    a node that kept an input: a node with no live input kills its outgoing edges). A candidate edge
    lives if its gamma >= threshold and at least one of its operations does; its operations with
    gamma >= threshold are kept (an operation dies with its edge). When the threshold kills every
    candidate of a node and ``keep_one_input`` is on, the candidate with the largest edge gamma is
    kept with its single best operation (recorded in the returned list). With ``keep_one_input`` off
    such a node dies (it leaves the cell output), except that a cell always keeps one node: if all
    die, n0 keeps its best input as above.
    """
    arch: Dict[str, Dict[str, List[str]]] = {}
    forced: List[str] = []
    for cell_type, cell in gammas.items():
        live = {"in0", "in1"}
        kept: Dict[str, List[str]] = {}

        def best(edges: List[str]) -> Tuple[str, List[str]]:
            e = max(edges, key=lambda k: (cell[k]["edge"], -edges.index(k)))
            o = max((o for o in ops if o in cell[e]), key=lambda k: cell[e][k])
            return e, [o]

        for node, edges in node_inputs(cell_type).items():
            candidates = [e for e in edges if e in cell and e.split("->")[0] in live]
            mine = {}
            for e in candidates:
                if cell[e]["edge"] >= threshold:
                    alive = [o for o in ops if o in cell[e] and cell[e][o] >= threshold]
                    if alive:
                        mine[e] = alive
            if not mine and candidates and keep_one_input:
                e, o = best(candidates)
                mine[e] = o
                forced.append(f"{cell_type}/{e}/{o[0]}")
            if mine:
                live.add(node)
                kept.update(mine)
        if len(live) == 2:  # no node kept an input
            e, o = best([e for e in node_inputs(cell_type)["n0"] if e in cell])
            kept[e] = o
            forced.append(f"{cell_type}/{e}/{o[0]}")
        arch[cell_type] = {e: kept[e] for e in CELL_EDGES[cell_type] if e in kept}
    return arch, forced


# ----------------------------------------------------------------------------------------------
# training, curvature, evaluation
# ----------------------------------------------------------------------------------------------


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _train(model: nn.Module, x: Tensor, y: Tensor, c: BayesNASConfig, epochs: int, label: str, seed_shift: int,
           switches: Optional[List[nn.Parameter]] = None, penalty: Optional[Callable[[], Tensor]] = None,
           cosine: bool = False, generator: Optional[torch.Generator] = None) -> Dict[str, Any]:
    """SGD (momentum, weight decay) on the weights; with ``switches``, a second SGD (no weight decay) on
    them and the loss NLL + ``penalty()``. Returns the mean loss and penalty per epoch."""
    from tqdm import tqdm

    ids = {id(p) for p in (switches or [])}
    weights = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    optimizers = [torch.optim.SGD(weights, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)]
    if switches:
        optimizers.append(torch.optim.SGD(switches, lr=c.switch_lr, momentum=c.momentum))
    steps = max(epochs * math.ceil(x.shape[0] / c.batch_size), 1)
    schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=steps) for o in optimizers] if cosine else []
    gen = generator if generator is not None else torch.Generator().manual_seed(c.seed * 7919 + seed_shift)
    model.train()
    nll_hist, pen_hist = [], []
    bar = tqdm(range(epochs), desc=f"{label} seed={c.seed}", unit="epoch", disable=not c.progress, file=sys.stderr, leave=False)
    for _ in bar:
        order = torch.randperm(x.shape[0], generator=gen)
        nll_sum, pen_sum, batches = 0.0, 0.0, 0
        for i in range(0, x.shape[0], c.batch_size):
            idx = order[i : i + c.batch_size]
            if idx.numel() < 2:
                continue  # batch statistics need two examples
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            nll = F.cross_entropy(model(x[idx]), y[idx])
            loss = nll
            if penalty is not None:
                pen = penalty()
                loss = loss + pen
                pen_sum += float(pen.detach())
            loss.backward()
            for o in optimizers:
                o.step()
            for s in schedules:
                s.step()
            nll_sum += float(nll.detach()) * idx.numel()
            batches += 1
        nll_hist.append(nll_sum / x.shape[0])
        pen_hist.append(pen_sum / max(batches, 1))
        bar.set_postfix(nll=f"{nll_hist[-1]:.4f}", refresh=False)
    bar.close()
    return {"epoch_nll": nll_hist, "epoch_penalty": pen_hist}


def recalibrate_batch_norm(model: nn.Module, x_train: Tensor, batches: int = 20, batch_size: int = 256) -> None:
    """Recompute every BatchNorm's running statistics of ``model`` in place on the first ``batches``
    training batches with the weights fixed (:func:`bnas_fast.nn.recalibrate_batch_norm`: a
    cumulative average; Bender et al.'s "statistics computed on the fly"). The running statistics
    lag the switches while they move; training itself uses batch statistics, so this changes only
    what eval mode sees."""
    count = min(batches, math.ceil(x_train.shape[0] / batch_size))
    calibrate_batch_norm(model, (x_train[i * batch_size : (i + 1) * batch_size] for i in range(count)))


def recalibrated_accuracy(model: nn.Module, x_train: Tensor, x_test: Tensor, y_test: Tensor, batches: int = 20,
                          batch_size: int = 256) -> float:
    """Test accuracy of a copy of ``model`` after :func:`recalibrate_batch_norm`: tells a BatchNorm
    mismatch apart from a bad network."""
    twin = copy.deepcopy(model)
    recalibrate_batch_norm(twin, x_train, batches, batch_size)
    return eval_accuracy(twin, x_test, y_test)


def switch_hessians(model: BayesNASSupernet, batches: Sequence[Tensor], mode: str,
                    generator: Optional[torch.Generator] = None) -> Dict[str, List[float]]:
    """{group key: [H_s of each member, in cell order]}: the GGN of the cross-entropy with the model's
    predictive, per example (the summed-over-batch GGN divided by the batch size, matching the mean
    NLL of the search objective), averaged over ``batches``.

    ``mode`` is "exact" or "mc" (:class:`GGNBlocks`: the exact GGN diagonal entry of each switch, or
    its one-sample Monte-Carlo estimate), or "diag_recursion" (:func:`diagonal_recursion_hessians`:
    the authors' cheaper recursion, the pre-activation Gauss-Newton truncated to its diagonal at
    every layer, without their bugs; ``generator`` is unused).

    The model is put in eval mode: BatchNorm then uses its running statistics, so examples do not
    interact and GGNBlocks needs K backward passes per batch instead of N K (the train-mode path),
    and H_s is the curvature of the network as it predicts at test time. The search recalibrates the
    running statistics first (:func:`recalibrate_batch_norm`): they lag the moving switches.
    """
    was_training = model.training
    model.eval()
    names = {id(m): n for n, m in model.named_modules()}
    groups = model.switch_groups()
    switches = [s for members in groups.values() for s in members]
    total: Dict[str, float] = {}
    for xb in batches:
        if mode == "diag_recursion":
            blocks = diagonal_recursion_hessians(model, xb)
        else:
            # only the switches' blocks: the convolutions' would double the time and go unused
            with GGNBlocks(model, layers=switches) as curvature:
                logits = model(xb)
            # eval mode and no batch-mixing layer in the supernet: no probe pass needed
            blocks = curvature.compute(logits, mode, generator, couples_examples=False)
        for key, members in groups.items():
            for s in members:
                n = names[id(s)]
                total[n] = total.get(n, 0.0) + float(blocks[n].reshape(())) / xb.shape[0]
    model.train(was_training)
    return {key: [total[names[id(s)]] / len(batches) for s in members] for key, members in groups.items()}


def _group_kind(key: str) -> Tuple[str, str, str]:
    cell_type, edge, what = key.split("/")
    return cell_type, edge, what


def _nested(values: Dict[str, Any]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """{group key: v} -> {cell type: {edge: {"edge" or op: v}}}."""
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for key, v in values.items():
        t, e, w = _group_kind(key)
        out.setdefault(t, {}).setdefault(e, {})[w] = v
    return out


def _split(c: BayesNASConfig):
    data = load_images(c.dataset, c.data_root, n_train=c.n_train, n_test=c.n_test, seed=c.seed)
    return data, data.train.tensors, data.test.tensors


@keeps_global_rng
def run(config: Union[BayesNASConfig, Dict[str, Any], None] = None) -> Dict[str, Any]:
    """Run BayesNAS, its derived network and the random baseline (module docstring). Writes
    results.json and PNGs to ``out_dir`` when it is set; returns the results."""
    c = BayesNASConfig.from_any(config).resolved()
    with torch_threads(c.threads):
        return _run(c)


def _run(c: BayesNASConfig) -> Dict[str, Any]:
    t0 = time.perf_counter()
    data, (x, y), (x_test, y_test) = _split(c)
    in_channels, classes = data.input_shape[0], data.num_classes
    net_kw = dict(channels=c.channels, layout=c.layout)

    model = _seeded(c.seed, lambda: BayesNASSupernet(in_channels, classes, ops=c.ops, **net_kw))
    groups = model.switch_groups()
    switch_params = model.switch_parameters()
    lam = {k: (c.lambda_edge if _group_kind(k)[2] == "edge" else c.lambda_op) for k in groups}
    # Deterministic start (the authors' code draws gamma and omega from torch.rand): every group at
    # gamma = init_gamma and omega = init_omega, so the first epoch's penalty is lambda ||s_g||.
    gamma = {k: float(c.init_gamma) for k in groups}
    omega = {k: float(c.init_omega) for k in groups}

    def penalty() -> Tensor:
        return sum(lam[k] * omega[k] * torch.stack([s.weight for s in members]).norm() for k, members in groups.items())

    data_gen = torch.Generator().manual_seed(c.seed * 7919 + 1)
    hess_gen = torch.Generator().manual_seed(c.seed * 7919 + 2)
    search_start = time.perf_counter()
    warmup = {}
    if c.warmup_epochs:
        for p in switch_params:
            p.requires_grad_(False)
        warmup = _train(model, x, y, c, c.warmup_epochs, "bayesnas warm-up", 0, generator=data_gen)
        for p in switch_params:
            p.requires_grad_(True)
    history = []
    from tqdm import tqdm

    for epoch in tqdm(range(c.search_epochs), desc=f"bayesnas search seed={c.seed}", disable=not c.progress,
                      file=sys.stderr, leave=False):
        training = _train(model, x, y, c, 1, f"search epoch {epoch}", 0, switches=switch_params, penalty=penalty,
                          generator=data_gen)
        order = torch.randperm(x.shape[0], generator=hess_gen)
        size = min(c.hessian_batch_size, x.shape[0])
        batches = [x[order[i * size : (i + 1) * size]] for i in range(min(c.hessian_batches, x.shape[0] // size))]
        # H_s in eval mode (see switch_hessians), so with running statistics that match the switches
        recalibrate_batch_norm(model, x)
        H = switch_hessians(model, batches, c.hessian_mode, hess_gen)
        values = {k: [float(s.weight.detach()) for s in members] for k, members in groups.items()}
        updates = {k: laplace_update(gamma[k], H[k], values[k], lam[k]) for k in groups}
        for k in groups:
            gamma[k], omega[k] = updates[k]["gamma"], updates[k]["omega"]
        for k in groups:  # hierarchical coupling, with the edge's new gamma
            t, e, w = _group_kind(k)
            if w != "edge":
                gamma[k] = couple(gamma[k], gamma[f"{t}/{e}/edge"])
        history.append({
            "epoch": epoch, "nll": training["epoch_nll"][0], "penalty": training["epoch_penalty"][0],
            "gamma": dict(gamma), "omega": dict(omega), "hessian": H, "switches": values,
        })
    search_seconds = time.perf_counter() - search_start
    supernet_test = eval_accuracy(model, x_test, y_test)
    supernet_recalibrated = recalibrated_accuracy(model, x, x_test, y_test)
    supernet_params = count_parameters(model)

    arch, forced = prune(_nested(gamma), c.threshold, c.keep_one_input, c.ops)
    masked = copy.deepcopy(model)
    masked.apply_architecture(arch)
    masked_test = eval_accuracy(masked, x_test, y_test)
    masked_recalibrated = recalibrated_accuracy(masked, x, x_test, y_test)

    # the derived network from scratch, and a random architecture of about its size, same budget
    derived = _seeded(c.seed + 1, lambda: build_network(arch, in_channels, classes, **net_kw))
    derived_params = count_parameters(derived)
    arch_gen = torch.Generator().manual_seed(c.seed * 7919 + 3)
    best = None
    for _ in range(c.random_candidates):
        # keep probabilities drawn per candidate, so that the candidates' sizes span the derived one's
        keep = (0.2 + 0.8 * torch.rand(2, generator=arch_gen, dtype=torch.float64)).tolist()
        cand = random_architecture(arch_gen, c.ops, edge_keep=keep[0], op_keep=keep[1])
        n = count_parameters(build_network(cand, in_channels, classes, **net_kw))
        if best is None or abs(n - derived_params) < abs(best[1] - derived_params):
            best = (cand, n)
    random_arch = best[0]
    rand_net = _seeded(c.seed + 1, lambda: build_network(random_arch, in_channels, classes, **net_kw))
    derived_training = _train(derived, x, y, c, c.retrain_epochs, "derived", 11, cosine=True)
    random_training = _train(rand_net, x, y, c, c.retrain_epochs, "random", 11, cosine=True)

    results: Dict[str, Any] = {
        "config": dataclasses.asdict(c),
        "data": {"source": data.source, "n_train": int(x.shape[0]), "n_test": int(x_test.shape[0]),
                 "input_shape": list(data.input_shape)},
        "supernet": {"parameters": supernet_params, "test_accuracy": supernet_test,
                     "test_accuracy_bn_recalibrated": supernet_recalibrated,
                     "pruned_test_accuracy_no_retraining": masked_test,
                     "pruned_test_accuracy_no_retraining_bn_recalibrated": masked_recalibrated, "warmup": warmup,
                     "search_seconds": search_seconds},
        "search": history,
        "gamma": _nested(gamma),
        "omega": _nested(omega),
        "hessian": _nested(history[-1]["hessian"]),
        "switches": _nested(history[-1]["switches"]),
        "architecture": arch,
        "forced_by_connectivity": forced,
        "derived": {"parameters": derived_params, "test_accuracy": eval_accuracy(derived, x_test, y_test),
                    "training": derived_training},
        "random": {"architecture": random_arch, "parameters": count_parameters(rand_net),
                   "test_accuracy": eval_accuracy(rand_net, x_test, y_test), "training": random_training},
        "seconds": 0.0,
        "files": {},
    }
    results["seconds"] = time.perf_counter() - t0
    save_run(c.out_dir, results, (lambda: _plots(c, results)) if c.plots else None)
    return results


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------


def _plots(c: BayesNASConfig, r: Dict[str, Any]) -> Dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    types = [t for t in CELL_TYPES if t in r["gamma"]]
    cols = ["edge"] + list(c.ops)
    fig, axes = plt.subplots(1, len(types), figsize=(5.5 * len(types), 4.2), squeeze=False)
    for ax, t in zip(axes[0], types):
        edges = [e for e in CELL_EDGES[t] if e in r["gamma"][t]]
        vals = torch.tensor([[r["gamma"][t][e][k] for k in cols] for e in edges], dtype=torch.float64)
        logv = vals.clamp_min(1e-12).log10()
        im = ax.imshow(logv.numpy(), cmap="viridis", aspect="auto")
        for i, e in enumerate(edges):
            for j, k in enumerate(cols):
                kept = e in r["architecture"][t] and (k == "edge" or k in r["architecture"][t][e])
                ax.text(j, i, f"{float(vals[i, j]):.2g}", ha="center", va="center", fontsize=7,
                        color="white", fontweight="bold" if kept else "normal")
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels(cols)
        ax.set_yticks(range(len(edges)))
        ax.set_yticklabels(edges)
        ax.set_title(f"{t} cell: gamma (log10 colour; bold = kept, threshold {c.threshold:g})", fontsize=9)
        fig.colorbar(im, ax=ax, label="log10 gamma")
    fig.tight_layout()
    files["gamma"] = os.path.join(c.out_dir, "gamma.png")
    fig.savefig(files["gamma"], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(types), figsize=(7.5 * len(types), 4.0), squeeze=False)
    for ax, t in zip(axes[0], types):
        _draw_cell(ax, t, r["architecture"].get(t, {}))
    fig.tight_layout()
    files["cells"] = os.path.join(c.out_dir, "derived_cells.png")
    fig.savefig(files["cells"], dpi=120)
    plt.close(fig)
    return files


_SHORT = {"conv3": "c3", "conv5": "c5", "max3": "mp", "avg3": "ap", "skip": "id"}


def _draw_cell(ax, cell_type: str, edges: Dict[str, List[str]]) -> None:
    """The cell as a graph: circles for the nodes, an arrow per kept edge labelled with its operations
    (c3/c5 = conv 3x3/5x5, mp/ap = max/avg pool, id = skip), dashed arrows from the live nodes to the output."""
    pos = {"in0": (0.0, 2.0), "in1": (0.0, -2.0), "out": (1.6 * NUM_NODES + 1.6, 0.0)}
    for j in range(NUM_NODES):
        pos[f"n{j}"] = (1.6 + 1.6 * j, 1.0 if j % 2 == 0 else -1.0)
    live = {"in0", "in1"} | {e.split("->")[1] for e in edges}
    for name, (px, py) in pos.items():
        on = name in live or name == "out"
        ax.add_patch(_circle(px, py, on))
        ax.text(px, py, name, ha="center", va="center", fontsize=9, color="black" if on else "gray")
    for k, (e, ops) in enumerate(edges.items()):
        src, dst = e.split("->")
        (x0, y0), (x1, y1) = pos[src], pos[dst]
        rad = 0.2 if k % 2 else -0.2
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="->", shrinkA=16, shrinkB=16, connectionstyle=f"arc3,rad={rad}", color="tab:blue"))
        # the label near the middle of the arc: the chord's midpoint moved along its normal
        mx, my = (x0 + x1) / 2 + rad * (y1 - y0) / 2, (y0 + y1) / 2 - rad * (x1 - x0) / 2  # as matplotlib's arc3
        ax.text(mx, my, ",".join(_SHORT.get(o, o) for o in ops), fontsize=7, ha="center", va="center", color="tab:blue",
                bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.85))
    for j in range(NUM_NODES):
        n = f"n{j}"
        if n in live:
            ax.annotate("", xy=pos["out"], xytext=pos[n],
                        arrowprops=dict(arrowstyle="->", shrinkA=16, shrinkB=16, ls="--", color="gray"))
    ax.set_xlim(-0.7, pos["out"][0] + 0.7)
    ax.set_ylim(-2.7, 2.7)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"derived {cell_type} cell (c3/c5 conv, mp/ap pool, id skip; out = concat, 1x1 conv)", fontsize=9)


def _circle(x: float, y: float, on: bool):
    from matplotlib.patches import Circle

    return Circle((x, y), 0.28, fc="lightyellow" if on else "whitesmoke", ec="black" if on else "lightgray")


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def _fmt_arch(arch: Dict[str, List[str]]) -> str:
    return "; ".join(f"{e}: {'+'.join(ops)}" for e, ops in arch.items())


def summary_table(runs: Sequence[Dict[str, Any]]) -> str:
    lines = ["| seed | supernet test acc | derived params / test acc | random params / test acc | derived normal cell | derived reduction cell |",
             "|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(
            f"| {r['config']['seed']} | {100 * r['supernet']['test_accuracy']:.2f}% "
            f"| {r['derived']['parameters']:,} / {100 * r['derived']['test_accuracy']:.2f}% "
            f"| {r['random']['parameters']:,} / {100 * r['random']['test_accuracy']:.2f}% "
            f"| {_fmt_arch(r['architecture'].get('normal', {}))} | {_fmt_arch(r['architecture'].get('reduction', {}))} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``bnas-fast run bayesnas``."""
    d = BayesNASConfig
    parser.add_argument("--dataset", choices=("fashion", "digits"), default="fashion", help="fashion (Debian idx files; digits if absent) or digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--channels", type=int, default=d.channels)
    parser.add_argument("--warmup-epochs", type=int, default=None, help="weights-only epochs first (default 1 Fashion-MNIST, 2 digits)")
    parser.add_argument("--search-epochs", type=int, default=None, help="default 3 Fashion-MNIST, 8 digits")
    parser.add_argument("--retrain-epochs", type=int, default=None, help="default 5 Fashion-MNIST, 20 digits")
    parser.add_argument("--lambda-edge", type=float, default=d.lambda_edge)
    parser.add_argument("--lambda-op", type=float, default=d.lambda_op)
    parser.add_argument("--threshold", type=float, default=d.threshold, help="prune switches whose gamma is below this")
    parser.add_argument("--no-keep-one-input", action="store_true", help="let a node whose inputs are all pruned die")
    parser.add_argument("--hessian-mode", choices=HESSIAN_MODES, default=d.hessian_mode,
                        help="exact or mc: GGN of the switches (GGNBlocks); diag_recursion: the authors' truncated diagonal recursion")
    parser.add_argument("--hessian-batches", type=int, default=None, help="default 4 (1 with --quick)")
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--switch-lr", type=float, default=d.switch_lr)
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--threads", type=int, default=d.threads)
    parser.add_argument("--out", default=os.path.join(".", "runs", "bayesnas"))
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: small budgets and subsets, and caps on the numbers of architectures or candidates (even when given)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    runs = []
    for seed in args.seeds:
        config = BayesNASConfig(
            dataset=args.dataset, seed=seed, channels=args.channels, warmup_epochs=args.warmup_epochs,
            search_epochs=args.search_epochs, retrain_epochs=args.retrain_epochs, lambda_edge=args.lambda_edge,
            lambda_op=args.lambda_op, threshold=args.threshold, keep_one_input=not args.no_keep_one_input,
            hessian_mode=args.hessian_mode, hessian_batches=args.hessian_batches, lr=args.lr, switch_lr=args.switch_lr,
            n_train=args.n_train, n_test=args.n_test, data_root=args.data_root, threads=args.threads, quick=args.quick,
            plots=not args.no_plots, progress=not args.no_progress, out_dir=os.path.join(args.out, f"seed{seed}"),
        )
        runs.append(run(config))
        print(f"bayesnas seed {seed}: {runs[-1]['seconds']:.0f} s -> {config.out_dir}", file=sys.stderr)
    print(summary_table(runs))
    return 0
