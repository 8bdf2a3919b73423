"""Networks with stochastic architectures (seed 002): the reference training loop and its evaluation.

    from bnas_fast.methods import nsa
    results = nsa.run({"variant": "nsa_i", "seed": 0, "out_dir": "runs/nsa/nsa_i"})
    table = nsa.compare({"seed": 0}, out_dir="runs/nsa")      # every variant on one budget

or ``bnas-fast run nsa --variant nsa_i`` / ``bnas-fast run nsa --compare``. One run:

1. data: Fashion-MNIST from the Debian package, else sklearn digits (:func:`bnas_fast.data.load_images`);
2. an :class:`~bnas_fast.nn.nsa.NSANet` with a training space of S architectures drawn from the seed,
   trained with SGD (momentum 0.9) and cross-entropy, the architectures sampled uniformly per batch
   (``nsa``) or per example (``nsa_i``, eq. 3; ``nsa_id`` adds per-architecture aggregation and BN);
3. evaluation on K architectures of the training space: test accuracy with BN in train mode (batch
   statistics of each test batch, every example running that architecture) and in eval mode (running
   statistics), the Spearman correlation of the two rankings (section 3) and the spread of the
   eval-mode accuracies; the same with BN calibrated per architecture (running statistics recomputed
   from ``calibration_batches`` training batches run with that architecture alone, on a copy of the
   model, as single-path one-shot NAS does); ensembles of the first T = 1..T_max architectures
   (mean of their softmaxes: accuracy and ECE, figure 4); the mutual information H[mean_t p_t] - mean_t H[p_t] over 5
   architectures on the test set and on an out-of-distribution set, and the AUROC of telling them
   apart by it (section 5.2); for shared-weight variants, the accuracies of K unseen architectures and
   the AUC of telling seen from unseen by accuracy (table 1);
4. ``results.json`` and PNG plots: histograms of the architectures' accuracies in the BN modes
   (figures 2-3) and ensemble accuracy against T (figure 4).

The out-of-distribution set: Fashion-MNIST downsampled to 8x8 for a digits model when the Debian
package is present, sklearn digits upsampled to 28x28 for a Fashion-MNIST model; otherwise the test
images with their pixels shuffled by one fixed permutation (same pixel statistics, no object).
``results["uncertainty"]["ood_source"]`` says which.

Everything random derives from ``seed`` (initialisation under ``fork_rng``, the architecture spaces,
the batch order and architecture draws from a ``torch.Generator``): the same seed gives the same run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from bnas_fast.data import load_images
from bnas_fast.data.images import fashion_mnist_available, load_digits, load_fashion_mnist
from bnas_fast.methods._config import check_int_fields, config_from_any, save_run, torch_threads, write_json
from bnas_fast.nn.arch_batch_norm import recalibrate_batch_norm
from bnas_fast.nn.depth import expected_calibration_error
from bnas_fast.nn.nsa import VARIANTS, NSANet, sample_architectures

__all__ = ["NSAConfig", "run", "compare", "compare_table", "spearman", "auroc", "mutual_information", "add_arguments", "main"]


@dataclass
class NSAConfig:
    """Every knob of a run. ``None`` means the default for the data (see :meth:`resolved`).

    Defaults: digits (the fallback here) 40 epochs, Fashion-MNIST 4 epochs on a 10,000 / 2,000
    subset; width 8, 3 stages of 4 nodes, S = 50 training architectures, batch 64, SGD lr 0.05
    momentum 0.9 weight decay 5e-4 with a cosine schedule; K = 20 evaluated architectures, each also
    with BN calibrated on 10 training batches of 256; ensembles up to T = 10. ``quick`` shrinks
    everything for a smoke run.
    """

    dataset: str = "fashion"
    variant: str = "nsa_i"
    running_stats: str = "shared"
    bn_momentum_per: str = "batch"  # per_arch statistics: momentum per training batch or per update
    seed: int = 0
    num_archs: int = 50
    width: int = 8
    num_stages: int = 3
    num_nodes: int = 4
    epochs: Optional[int] = None
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    n_train: Optional[int] = None
    n_test: Optional[int] = None
    eval_archs: int = 20
    max_ensemble: int = 10
    calibration_batches: int = 10
    data_root: Optional[str] = None
    out_dir: Optional[str] = None
    plots: bool = True
    progress: bool = True
    threads: int = 2
    channels_last: bool = False
    quick: bool = False

    @classmethod
    def from_any(cls, config: Union["NSAConfig", Dict[str, Any], None]) -> "NSAConfig":
        return config_from_any(cls, config, "nsa")

    def resolved(self) -> "NSAConfig":
        c = copy.deepcopy(self)
        if c.dataset not in ("fashion", "digits"):
            raise ValueError(f"nsa: dataset must be 'fashion' or 'digits', got {c.dataset!r}")
        if c.variant not in VARIANTS:
            raise ValueError(f"nsa: variant must be one of {VARIANTS}, got {c.variant!r}")
        if c.running_stats not in ("shared", "per_arch"):
            raise ValueError(f"nsa: running_stats must be 'shared' or 'per_arch', got {c.running_stats!r}")
        if c.bn_momentum_per not in ("batch", "update"):
            raise ValueError(f"nsa: bn_momentum_per must be 'batch' or 'update', got {c.bn_momentum_per!r}")
        fashion = c.dataset == "fashion" and fashion_mnist_available(c.data_root or "/usr/share/datasets/fashion-mnist")
        if c.epochs is None:
            c.epochs = 1 if c.quick else (4 if fashion else 40)
        if c.n_train is None:
            c.n_train = 256 if c.quick else (10_000 if fashion else None)
        if c.n_test is None:
            c.n_test = 128 if c.quick else (2_000 if fashion else None)
        if c.quick:
            c.num_archs, c.eval_archs, c.max_ensemble = min(c.num_archs, 6), min(c.eval_archs, 4), min(c.max_ensemble, 3)
            c.calibration_batches = min(c.calibration_batches, 2)
        check_int_fields("nsa", c, (
            ("num_archs", 2), ("width", 1), ("num_stages", 1), ("num_nodes", 1), ("epochs", 1),
            ("batch_size", 2), ("eval_archs", 2), ("max_ensemble", 1), ("threads", 1), ("calibration_batches", 0),
        ))
        if isinstance(c.seed, bool) or not isinstance(c.seed, int):
            raise TypeError(f"nsa: seed must be an int, got {type(c.seed).__name__}")
        if not c.lr > 0 or not 0 <= c.momentum < 1 or not c.weight_decay >= 0:
            raise ValueError(f"nsa: need lr > 0, momentum in [0, 1), weight_decay >= 0; got {c.lr}, {c.momentum}, {c.weight_decay}")
        c.eval_archs = min(c.eval_archs, c.num_archs)
        c.max_ensemble = min(c.max_ensemble, c.num_archs)
        return c


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------


def _ranks(values: Sequence[float]) -> List[float]:
    """Ranks 1..n, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson correlation of the ranks, ties averaged); NaN if a side is constant."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"spearman: need two sequences of equal length >= 2, got {len(a)} and {len(b)}")
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")


def auroc(negatives: Sequence[float], positives: Sequence[float]) -> float:
    """Area under the ROC curve of scoring positives above negatives (Mann-Whitney U / (n m), ties count 1/2)."""
    if not negatives or not positives:
        raise ValueError("auroc: both groups must be non-empty")
    ranks = _ranks(list(negatives) + list(positives))
    n, m = len(negatives), len(positives)
    u = sum(ranks[n:]) - m * (m + 1) / 2
    return u / (n * m)


def mutual_information(probs: Tensor) -> Tensor:
    """MI = H[mean_t p_t] - mean_t H[p_t] per example, probs [T, N, C] -> [N] (nats)."""
    def entropy(p: Tensor) -> Tensor:
        return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)

    return entropy(probs.mean(0)) - entropy(probs).mean(0)


# ----------------------------------------------------------------------------------------------
# training and evaluation
# ----------------------------------------------------------------------------------------------


def _build_model(c: NSAConfig, in_channels: int, num_classes: int) -> NSANet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(c.seed)
        model = NSANet(
            in_channels, num_classes, width=c.width, num_stages=c.num_stages, num_nodes=c.num_nodes,
            num_archs=c.num_archs, variant=c.variant, running_stats=c.running_stats, seed=c.seed,
            momentum_per=c.bn_momentum_per,
        )
    if c.channels_last:
        # channels-last convolution weights make every activation channels-last (the stem's
        # output follows its weight for a 1-channel input); the fused ops keep that layout
        return model.to(memory_format=torch.channels_last)
    return model


def _train(model: NSANet, x: Tensor, y: Tensor, c: NSAConfig) -> Dict[str, Any]:
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(c.seed + 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    steps_per_epoch = math.ceil(x.shape[0] / c.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=c.epochs * steps_per_epoch)
    model.train()
    losses, start = [], time.perf_counter()
    bar = tqdm(range(c.epochs), desc=f"{c.variant} seed={c.seed}", unit="epoch", disable=not c.progress, file=sys.stderr, leave=False)
    for _ in bar:
        order = torch.randperm(x.shape[0], generator=gen)
        total = 0.0
        for i in range(0, x.shape[0], c.batch_size):
            idx = order[i : i + c.batch_size]
            if idx.numel() < 2:
                continue  # batch statistics need two examples
            if c.variant == "nsa":  # one architecture for the whole batch
                arch = torch.randint(0, c.num_archs, (1,), generator=gen).expand(idx.numel()).contiguous()
            else:  # one per example (eq. 3)
                arch = torch.randint(0, c.num_archs, (idx.numel(),), generator=gen)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx], arch), y[idx])
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * idx.numel()
        losses.append(total / x.shape[0])
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    bar.close()
    return {"epoch_losses": losses, "seconds": time.perf_counter() - start}


@torch.no_grad()
def _probs(model: NSANet, x: Tensor, arch: int, bn_train: bool, batch: int = 256) -> Tensor:
    """Softmax of architecture ``arch`` on every example of x, [N, C]. bn_train: BN uses the batch
    statistics of each test batch (running statistics left untouched)."""
    if bn_train:
        saved = copy.deepcopy({k: v for k, v in model.state_dict().items()
                               if "running" in k or "num_batches" in k or "batches_since_update" in k})
        model.train()
    else:
        model.eval()
    out = torch.cat([torch.softmax(model(x[i : i + batch], arch), -1) for i in range(0, x.shape[0], batch)])
    if bn_train:
        model.load_state_dict(saved, strict=False)
        model.eval()
    return out


def _calibrated_probs(
    model: NSANet, x_train: Tensor, x_test: Tensor, arch: int, batches: int, batch: int = 256
) -> Tensor:
    """Softmax of architecture ``arch`` in eval mode after recomputing, on a copy of the model, every
    BN's running statistics from ``batches`` training batches run with that architecture
    (:func:`bnas_fast.nn.recalibrate_batch_norm`): BN calibration per architecture, as single-path
    one-shot NAS does before scoring a candidate."""
    twin = copy.deepcopy(model)
    count = min(batches, math.ceil(x_train.shape[0] / batch))
    recalibrate_batch_norm(twin, ((x_train[i * batch : (i + 1) * batch], arch) for i in range(count)))
    return _probs(twin, x_test, arch, bn_train=False)


def _accuracy(probs: Tensor, y: Tensor) -> float:
    return float((probs.argmax(-1) == y).double().mean())


def _ood_set(c: NSAConfig, x_test: Tensor, input_shape) -> Dict[str, Any]:
    """Out-of-distribution inputs shaped like the test images (module docstring)."""
    n = min(x_test.shape[0], 1000)
    H, W = input_shape[1], input_shape[2]
    root = c.data_root or "/usr/share/datasets/fashion-mnist"
    if (H, W) == (8, 8) and fashion_mnist_available(root):
        other = load_fashion_mnist(root, n_test=n, seed=c.seed).test.tensors[0]
        return {"x": F.adaptive_avg_pool2d(other, (8, 8)), "source": "fashion-mnist downsampled to 8x8"}
    if (H, W) == (28, 28):
        other = load_digits(n_test=min(n, 359), seed=c.seed).test.tensors[0]
        return {"x": F.interpolate(other, size=(28, 28), mode="bilinear", align_corners=False), "source": "sklearn digits upsampled to 28x28"}
    perm = torch.randperm(H * W, generator=torch.Generator().manual_seed(c.seed + 2))
    shuffled = x_test[:n].reshape(n, x_test.shape[1], H * W)[:, :, perm].reshape(n, *x_test.shape[1:])
    return {"x": shuffled, "source": "test images with pixels shuffled by a fixed permutation"}


def run(config: Union[NSAConfig, Dict[str, Any], None] = None) -> Dict[str, Any]:
    """Train one NSA variant and evaluate it (module docstring). Writes results.json and PNGs to
    ``out_dir`` when it is set; returns the results."""
    c = NSAConfig.from_any(config).resolved()
    with torch_threads(c.threads):
        return _run(c)


def _run(c: NSAConfig) -> Dict[str, Any]:
    t0 = time.perf_counter()
    data = load_images(c.dataset, c.data_root, n_train=c.n_train, n_test=c.n_test, seed=c.seed)
    x, y = data.train.tensors
    x_test, y_test = data.test.tensors
    if x.shape[0] < 2:
        raise ValueError(f"nsa: need at least 2 training images (batch statistics), got n_train = {x.shape[0]}")
    model = _build_model(c, data.input_shape[0], data.num_classes)
    training = _train(model, x, y, c)

    K = c.eval_archs
    probs_eval = [_probs(model, x_test, a, bn_train=False) for a in range(K)]
    acc_eval = [_accuracy(p, y_test) for p in probs_eval]
    acc_train_bn = [_accuracy(_probs(model, x_test, a, bn_train=True), y_test) for a in range(K)]
    single_ece = [expected_calibration_error(p, y_test) for p in probs_eval]
    calibrated: Dict[str, Any] = {}
    if c.calibration_batches > 0:
        acc_calibrated = [
            _accuracy(_calibrated_probs(model, x, x_test, a, c.calibration_batches), y_test) for a in range(K)
        ]
        calibrated = {
            "accuracy_calibrated_bn": acc_calibrated,
            "spearman_train_vs_calibrated_bn": spearman(acc_train_bn, acc_calibrated),
            "calibrated_bn_std": statistics.pstdev(acc_calibrated),
            "calibrated_bn_range": max(acc_calibrated) - min(acc_calibrated),
            "mean_calibrated_accuracy": statistics.fmean(acc_calibrated),
        }

    ensemble = []
    # the first architectures' eval-mode softmaxes are already in probs_eval
    extra = [_probs(model, x_test, a, bn_train=False) for a in range(K, c.max_ensemble)]
    stacked = torch.stack((probs_eval + extra)[: c.max_ensemble])
    for T in range(1, c.max_ensemble + 1):
        mean = stacked[:T].mean(0)
        ensemble.append(
            {"T": T, "accuracy": _accuracy(mean, y_test), "ece": expected_calibration_error(mean, y_test),
             "confidence": float(mean.max(-1).values.mean())}
        )

    T_mi = min(5, c.max_ensemble)
    ood = _ood_set(c, x_test, data.input_shape)
    mi_test = mutual_information(stacked[:T_mi])
    mi_ood = mutual_information(torch.stack([_probs(model, ood["x"], a, bn_train=False) for a in range(T_mi)]))
    uncertainty = {
        "T": T_mi,
        "ood_source": ood["source"],
        "mi_test_mean": float(mi_test.mean()),
        "mi_ood_mean": float(mi_ood.mean()),
        "auroc": auroc(mi_test.tolist(), mi_ood.tolist()),
    }

    seen_unseen: Dict[str, Any] = {}
    if c.variant != "nsa_id" and c.running_stats == "shared":
        unseen = [sample_architectures(K, c.num_nodes, 0.3, seed=c.seed * 1000 + k + 500) for k in range(c.num_stages)]
        other = model.with_architectures(unseen)
        acc_unseen = [_accuracy(_probs(other, x_test, a, bn_train=False), y_test) for a in range(K)]
        seen_unseen = {
            "seen_accuracy_mean": statistics.fmean(acc_eval),
            "unseen_accuracy_mean": statistics.fmean(acc_unseen),
            "auc": auroc(acc_unseen, acc_eval),  # 0.5: seen and unseen cannot be told apart
            "unseen_accuracies": acc_unseen,
        }

    results: Dict[str, Any] = {
        "config": dataclasses.asdict(c),
        "data": {"source": data.source, "n_train": len(data.train), "n_test": len(data.test)},
        "training": training,
        "architectures": {
            "accuracy_eval_bn": acc_eval,
            "accuracy_train_bn": acc_train_bn,
            "spearman_train_vs_eval_bn": spearman(acc_train_bn, acc_eval),
            "eval_bn_std": statistics.pstdev(acc_eval),
            "eval_bn_range": max(acc_eval) - min(acc_eval),
            "train_bn_std": statistics.pstdev(acc_train_bn),
            "mean_single_accuracy": statistics.fmean(acc_eval),
            "mean_single_ece": statistics.fmean(single_ece),
            # mean top-class probability: below the accuracy means under-confident
            "mean_single_confidence": statistics.fmean(float(p.max(-1).values.mean()) for p in probs_eval),
            # BN calibrated per architecture (empty when calibration_batches = 0)
            **calibrated,
        },
        "ensemble": ensemble,
        "uncertainty": uncertainty,
        "seen_unseen": seen_unseen,
        "seconds": 0.0,
        "files": {},
    }
    results["seconds"] = time.perf_counter() - t0
    save_run(c.out_dir, results, (lambda: _plots(c, results)) if c.plots else None)
    return results


def _plots(c: NSAConfig, r: Dict[str, Any]) -> Dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    arch = r["architectures"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = 15
    ax.hist([100 * a for a in arch["accuracy_train_bn"]], bins=bins, alpha=0.6, label="BN train mode")
    ax.hist([100 * a for a in arch["accuracy_eval_bn"]], bins=bins, alpha=0.6, label="BN eval mode")
    if "accuracy_calibrated_bn" in arch:
        calibrated = [100 * a for a in arch["accuracy_calibrated_bn"]]
        ax.hist(calibrated, bins=bins, alpha=0.6, label="BN calibrated per architecture")
    ax.set_xlabel("test accuracy of one architecture (%)")
    ax.set_ylabel("architectures")
    stats = _stats_label(c.running_stats, c.bn_momentum_per)
    ax.set_title(f"{c.variant} ({stats} BN statistics): Spearman {arch['spearman_train_vs_eval_bn']:.2f}")
    ax.legend()
    fig.tight_layout()
    files["histogram"] = os.path.join(c.out_dir, "fig2_accuracy_histograms.png")
    fig.savefig(files["histogram"], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    T = [e["T"] for e in r["ensemble"]]
    ax.plot(T, [100 * e["accuracy"] for e in r["ensemble"]], "o-", label="ensemble of T architectures")
    ax.axhline(100 * arch["mean_single_accuracy"], color="gray", ls="--", label="mean single architecture")
    ax.set_xlabel("T")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    fig.tight_layout()
    files["ensemble"] = os.path.join(c.out_dir, "fig4_ensemble.png")
    fig.savefig(files["ensemble"], dpi=120)
    plt.close(fig)
    return files


# ----------------------------------------------------------------------------------------------
# the comparison the issue asks for
# ----------------------------------------------------------------------------------------------

COMPARISON = (
    ("nsa", "shared"),
    ("nsa", "per_arch"),
    ("nsa_i", "shared"),
    ("nsa_i", "per_arch"),
    ("nsa_id", "shared"),
    ("nsa_id", "per_arch"),
)

# (key of a compare row, column title, how a value is printed)
_COMPARE_COLUMNS = (
    ("spearman", "Spearman (train vs eval BN)", lambda v: f"{v:.2f}"),
    ("eval_std", "eval-BN acc std (pts)", lambda v: f"{100 * v:.2f}"),
    ("eval_range", "eval-BN acc range (pts)", lambda v: f"{100 * v:.2f}"),
    ("train_std", "train-BN acc std (pts)", lambda v: f"{100 * v:.2f}"),
    ("spearman_calibrated", "Spearman (train vs calibrated BN)", lambda v: f"{v:.2f}"),
    ("calibrated_std", "calibrated-BN acc std (pts)", lambda v: f"{100 * v:.2f}"),
    ("mean_calibrated_accuracy", "mean calibrated acc", lambda v: f"{100 * v:.2f}%"),
    ("mean_single_accuracy", "mean single acc", lambda v: f"{100 * v:.2f}%"),
    ("mean_single_ece", "mean single ECE", lambda v: f"{v:.4f}"),
    ("ensemble_accuracy", "ensemble of 5 acc", lambda v: f"{100 * v:.2f}%"),
    ("ensemble_ece", "ensemble of 5 ECE", lambda v: f"{v:.4f}"),
    ("mi_auroc", "MI AUROC (OOD)", lambda v: f"{v:.3f}"),
    ("seen_unseen_auc", "seen/unseen AUC", lambda v: f"{v:.2f}"),
)


def _stats_label(running_stats: str, momentum_per: str) -> str:
    """How a run's running statistics are named in directories and tables: "shared", "per_arch"
    (momentum per training batch, the default) or "per_arch_update" (the per-update rule)."""
    if running_stats == "shared" or momentum_per == "batch":
        return running_stats
    return f"{running_stats}_update"


def _compare_row(variant: str, stats: str, seed: int, r: Dict[str, Any]) -> Dict[str, Any]:
    a = r["architectures"]
    five = next((e for e in r["ensemble"] if e["T"] == min(5, len(r["ensemble"]))), r["ensemble"][-1])
    return {
        "variant": variant,
        "running_stats": _stats_label(stats, r["config"]["bn_momentum_per"]),
        "seed": seed,
        "spearman": a["spearman_train_vs_eval_bn"],
        "eval_std": a["eval_bn_std"],
        "eval_range": a["eval_bn_range"],
        "train_std": a.get("train_bn_std"),
        "spearman_calibrated": a.get("spearman_train_vs_calibrated_bn"),
        "calibrated_std": a.get("calibrated_bn_std"),
        "mean_calibrated_accuracy": a.get("mean_calibrated_accuracy"),
        "mean_single_accuracy": a["mean_single_accuracy"],
        "mean_single_ece": a["mean_single_ece"],
        "ensemble_T": five["T"],
        "ensemble_accuracy": five["accuracy"],
        "ensemble_ece": five["ece"],
        "mi_auroc": r["uncertainty"]["auroc"],
        "seen_unseen_auc": r["seen_unseen"].get("auc"),
        "seconds": r["seconds"],
    }


def _mean_and_standard_error(values: Sequence[float]) -> tuple:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None
    mean = statistics.fmean(finite)
    se = statistics.stdev(finite) / math.sqrt(len(finite)) if len(finite) > 1 else None
    return mean, se


def compare_table(rows: Sequence[Dict[str, Any]]) -> str:
    """A markdown table of compare rows: one line per (variant, running statistics), each cell the
    mean over seeds, with ± its standard error when there are several seeds."""
    keys = list(dict.fromkeys((w["variant"], w["running_stats"]) for w in rows))
    seeds = sorted({w["seed"] for w in rows})
    lines = [
        "| variant | running stats | " + " | ".join(title for _, title, _ in _COMPARE_COLUMNS) + " |",
        "|---|---|" + "---|" * len(_COMPARE_COLUMNS),
    ]
    for variant, stats in keys:
        group = [w for w in rows if (w["variant"], w["running_stats"]) == (variant, stats)]
        cells = []
        for key, _, show in _COMPARE_COLUMNS:
            mean, se = _mean_and_standard_error([w.get(key) for w in group])  # a column an older row lacks shows "-"
            cells.append("-" if mean is None else show(mean) + ("" if se is None else " ± " + show(se).rstrip("%")))
        lines.append(f"| {variant} | {stats} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n(seeds {', '.join(map(str, seeds))}; ± is the standard error over seeds)"


def compare(
    config: Union[NSAConfig, Dict[str, Any], None] = None,
    out_dir: Optional[str] = None,
    seeds: Optional[Sequence[int]] = None,
) -> Dict[str, Any]:
    """Run every (variant, running statistics) of COMPARISON on the same budget and data, for each
    seed of ``seeds`` (default: the config's seed); return the rows (one per run) and a markdown
    table of their means over seeds. Writes ``comparison.json`` to ``out_dir`` after every run, so an
    interrupted comparison keeps what it finished."""
    base = NSAConfig.from_any(config)
    seeds = [base.seed] if seeds is None else list(seeds)
    rows: List[Dict[str, Any]] = []
    for seed in seeds:
        for variant, stats in COMPARISON:
            c = dataclasses.replace(base, variant=variant, running_stats=stats, seed=seed)
            label = _stats_label(stats, c.bn_momentum_per)
            c.out_dir = os.path.join(out_dir, f"{variant}_{label}_seed{seed}") if out_dir else None
            rows.append(_compare_row(variant, stats, seed, run(c)))
            if out_dir:
                os.makedirs(out_dir, exist_ok=True)
                write_json(os.path.join(out_dir, "comparison.json"), rows)
    return {"rows": rows, "markdown": compare_table(rows)}


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``bnas-fast run nsa``."""
    parser.add_argument("--dataset", choices=("fashion", "digits"), default="fashion",
                        help="fashion (Debian idx files; digits if absent) or digits")
    parser.add_argument("--variant", choices=VARIANTS, default="nsa_i")
    parser.add_argument("--running-stats", choices=("shared", "per_arch"), default="shared")
    parser.add_argument("--bn-momentum-per", choices=("batch", "update"), default="batch",
                        help="per_arch statistics: an architecture met again after t training batches "
                             "moves by 1 - (1 - momentum)^t (batch) or by momentum (update: stale at large S)")
    parser.add_argument("--compare", action="store_true", help="run every variant on the same budget and print a table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="with --compare: run every variant for each seed and report mean ± standard error")
    parser.add_argument("--num-archs", "-S", type=int, default=50, help="size S of the training space")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=None, help="default 40 digits, 4 Fashion-MNIST")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--eval-archs", type=int, default=20, help="K architectures evaluated")
    parser.add_argument("--calibration-batches", type=int, default=10,
                        help="training batches of 256 for BN calibration per evaluated architecture (0: off)")
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--channels-last", action="store_true",
                        help="keep activations in channels-last (NHWC): faster convolutions on CPU")
    parser.add_argument("--out", default=os.path.join(".", "runs", "nsa"))
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: small budgets and subsets, and caps on the numbers of architectures or candidates (even when given)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    config = NSAConfig(
        dataset=args.dataset, variant=args.variant, running_stats=args.running_stats,
        bn_momentum_per=args.bn_momentum_per, seed=args.seed, num_archs=args.num_archs, width=args.width,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        eval_archs=args.eval_archs, calibration_batches=args.calibration_batches, n_train=args.n_train,
        n_test=args.n_test, data_root=args.data_root,
        threads=args.threads, channels_last=args.channels_last, quick=args.quick, plots=not args.no_plots,
        progress=not args.no_progress,
    )
    if args.seeds is not None and not args.compare:
        raise ValueError("nsa: --seeds goes with --compare; one run takes --seed")
    if args.compare:
        result = compare(config, out_dir=args.out, seeds=args.seeds)
        print(result["markdown"])
        return 0
    label = _stats_label(args.running_stats, args.bn_momentum_per)
    config.out_dir = os.path.join(args.out, f"{args.variant}_{label}_seed{args.seed}")
    r = run(config)
    a = r["architectures"]
    print(
        f"{args.variant} ({label}) seed {args.seed}: Spearman {a['spearman_train_vs_eval_bn']:.3f}, "
        f"eval-BN accuracy {100 * a['mean_single_accuracy']:.2f}% (std {100 * a['eval_bn_std']:.2f}), "
        f"ensemble T={r['ensemble'][-1]['T']} {100 * r['ensemble'][-1]['accuracy']:.2f}%, MI AUROC {r['uncertainty']['auroc']:.3f} "
        f"| {r['seconds']:.0f} s -> {config.out_dir}"
    )
    return 0
