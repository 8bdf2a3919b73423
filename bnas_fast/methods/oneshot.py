"""One-shot architecture search (Bender et al. 2018, seed 004): the reference loop, at CPU scale.

    from bnas_fast.methods import oneshot
    results = oneshot.run({"seed": 0, "out_dir": "runs/oneshot/seed0"})

or ``bnas-fast run oneshot [--seeds 0 1]``. One run:

1. data: Fashion-MNIST from the Debian package, else sklearn digits; a validation split (a multiple
   of the ghost batch size) is held out of the training images;
2. the one-shot model (:class:`~bnas_fast.nn.oneshot.OneShotNet`) trained with path dropout, the
   rate rising linearly from 0 to r^(1/k) over training (§3.2), a different architecture per ghost
   batch (each path run only on the ghost batches that keep it), ghost-batch BN, and L2 only on the
   parts each ghost batch's architecture uses; SGD with Nesterov momentum and a cosine rate;
3. search: N architectures sampled from the search space (each block 1-2 inputs, 1-2 operations),
   each scored on the validation split by the one-shot model, many architectures per forward pass
   (one per ghost batch); the symmetrised KL divergence of each to the all-on model on
   ``kl_examples`` training images (§5); the *top* architecture (best one-shot accuracy) and the
   *small-top* one (fewest parameters among those at or above the 90th percentile);
4. the evaluation throughput in architectures per second of that batched one-shot scoring against
   building each candidate as a separate plain-PyTorch model with the same weights and evaluating
   it (both give the same predictions; the largest difference is recorded);
5. retraining: a sample stratified by one-shot accuracy (``strata`` quantile buckets,
   ``per_stratum`` from each) plus top and small-top, each trained from scratch briefly with
   ordinary BatchNorm; the Spearman correlation of one-shot and stand-alone validation accuracy
   (figure 5) and of KL and one-shot accuracy (figure 6);
6. ``results.json`` and PNG plots (one-shot vs stand-alone; KL vs one-shot accuracy; the histogram
   of one-shot accuracies).

Everything random derives from ``seed``: the same seed gives the same run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from bnas_fast.data.images import fashion_mnist_available
from bnas_fast.methods._config import check_int_fields, config_from_any, eval_accuracy, images_with_validation_split, median_ms, save_run, torch_threads, keeps_global_rng
from bnas_fast.methods.nsa import spearman
from bnas_fast.nn.oneshot import Architecture, OneShotNet, PathMasks, sample_path_dropout_masks
from bnas_fast.sampling import PathDropoutSchedule

__all__ = [
    "OneShotConfig",
    "run",
    "one_shot_log_probs",
    "separate_models_log_probs",
    "symmetrised_kl",
    "stratified_sample",
    "add_arguments",
    "main",
]


@dataclass
class OneShotConfig:
    """Every knob of a run. ``None`` means the default for the data (see :meth:`resolved`).

    Defaults: Fashion-MNIST, 10,000 training images, 1,024 validation images held out of the
    training set, 2,000 test images (digits: its own split, validation 320); the one-shot model at
    width 16, 4 choice blocks per cell, 2 stages of 1 cell, ghost batches of 32 in batches of 128,
    path-dropout r = 0.1 reached at the end of training, 8 epochs (digits 30), SGD lr 0.05 Nesterov
    0.9 cosine, L2 3e-4 on the used parts; N = 200 sampled architectures, 64 KL examples; 4 strata x
    3 architectures (+ top, small-top) retrained for 3 epochs (digits 20), once each (``retrain_repeats``
    runs are averaged when set; the paper averages 5).
    """

    dataset: str = "fashion"
    seed: int = 0
    channels: int = 16
    num_blocks: int = 4
    cells_per_stage: int = 1
    num_stages: int = 2
    ghost_batch_size: int = 32
    batch_size: int = 128
    r: float = 0.1
    epochs: Optional[int] = None
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 3e-4
    num_architectures: int = 200
    archs_per_pass: int = 8
    kl_examples: int = 64
    strata: Optional[int] = None
    per_stratum: Optional[int] = None
    retrain_epochs: Optional[int] = None
    retrain_repeats: int = 1
    throughput_architectures: int = 16
    n_train: Optional[int] = None
    n_val: Optional[int] = None
    n_test: Optional[int] = None
    data_root: Optional[str] = None
    out_dir: Optional[str] = None
    plots: bool = True
    progress: bool = True
    threads: int = 2
    quick: bool = False

    @classmethod
    def from_any(cls, config: Union["OneShotConfig", Dict[str, Any], None]) -> "OneShotConfig":
        return config_from_any(cls, config, "oneshot")

    def resolved(self) -> "OneShotConfig":
        c = copy.deepcopy(self)
        if c.dataset not in ("fashion", "digits"):
            raise ValueError(f"oneshot: dataset must be 'fashion' or 'digits', got {c.dataset!r}")
        fashion = c.dataset == "fashion" and fashion_mnist_available(c.data_root or "/usr/share/datasets/fashion-mnist")
        if c.epochs is None:
            c.epochs = 1 if c.quick else (8 if fashion else 30)
        if c.retrain_epochs is None:
            c.retrain_epochs = 1 if c.quick else (3 if fashion else 20)
        if c.n_train is None:
            c.n_train = 256 if c.quick else (10_000 if fashion else None)
        if c.n_val is None:
            c.n_val = 2 * c.ghost_batch_size if c.quick else (1_024 if fashion else 320)
        if c.n_test is None:
            c.n_test = 128 if c.quick else (2_000 if fashion else None)
        if c.strata is None:
            c.strata = 2 if c.quick else 4
        if c.per_stratum is None:
            c.per_stratum = 1 if c.quick else 3
        if c.quick:
            c.num_architectures = min(c.num_architectures, 8)
            c.throughput_architectures = min(c.throughput_architectures, 2)
        check_int_fields("oneshot", c, (
            ("channels", 1), ("num_blocks", 1), ("cells_per_stage", 1), ("num_stages", 1), ("ghost_batch_size", 2),
            ("batch_size", 2), ("epochs", 1), ("num_architectures", 2), ("archs_per_pass", 1), ("kl_examples", 1),
            ("strata", 1), ("per_stratum", 1), ("retrain_epochs", 1), ("retrain_repeats", 1), ("throughput_architectures", 1), ("n_val", 2), ("threads", 1),
        ))
        if isinstance(c.seed, bool) or not isinstance(c.seed, int):
            raise TypeError(f"oneshot: seed must be an int, got {type(c.seed).__name__}")
        g = c.ghost_batch_size
        for key in ("batch_size", "n_val"):
            if getattr(c, key) % g:
                raise ValueError(f"oneshot: {key} = {getattr(c, key)} must be a multiple of ghost_batch_size = {g}")
        if not (isinstance(c.r, (int, float)) and 0 < c.r < 1):
            raise ValueError(f"oneshot: r must lie in (0, 1), got {c.r!r}")
        if not (c.lr > 0 and 0 <= c.momentum < 1 and c.weight_decay >= 0):
            raise ValueError("oneshot: need lr > 0, momentum in [0, 1), weight_decay >= 0")
        return c

    def network(self, in_channels: int, num_classes: int) -> Dict[str, Any]:
        """The keyword arguments of :class:`OneShotNet` for this config and data."""
        return dict(in_channels=in_channels, num_classes=num_classes, channels=self.channels, num_blocks=self.num_blocks,
                    cells_per_stage=self.cells_per_stage, num_stages=self.num_stages, ghost_batch_size=self.ghost_batch_size)


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------


def _seeded_model(seed: int, **kwargs: Any) -> OneShotNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return OneShotNet(**kwargs)


def _train(model: OneShotNet, x: Tensor, y: Tensor, c: OneShotConfig, epochs: int, one_shot: bool, label: str, seed: int) -> Dict[str, Any]:
    """SGD (Nesterov) with a cosine rate. The one-shot model gets path-dropout masks per ghost batch
    and L2 on the used parts (``weight_decay / 2 * model.l2_penalty(masks)``); a stand-alone model
    gets ordinary weight decay on its convolution and linear weights. Incomplete last batches are
    dropped (ghost batches must be whole)."""
    from tqdm import tqdm

    steps_per_epoch = x.shape[0] // c.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"oneshot: {x.shape[0]} training images do not fill one batch of {c.batch_size}")
    total = epochs * steps_per_epoch
    decayed = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    ids = {id(p) for p in decayed}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": decayed, "weight_decay": 0.0 if one_shot else c.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    optimizer = torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.momentum > 0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    dropout = PathDropoutSchedule(c.r, total)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses, step, start = [], 0, time.perf_counter()
    bar = tqdm(range(epochs), desc=f"{label} seed={c.seed}", unit="epoch", disable=not c.progress, file=sys.stderr, leave=False)
    for _ in bar:
        order = torch.randperm(x.shape[0], generator=gen)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * c.batch_size : (i + 1) * c.batch_size]
            optimizer.zero_grad(set_to_none=True)
            if one_shot:
                masks = sample_path_dropout_masks(c.batch_size, c.num_blocks, dropout, step, c.ghost_batch_size, generator=gen)
                loss = F.cross_entropy(model(x[idx], masks), y[idx])
                (loss + 0.5 * c.weight_decay * model.l2_penalty(masks)).backward()
            else:
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            running += float(loss.detach())
        losses.append(running / steps_per_epoch)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    bar.close()
    return {"epoch_losses": losses, "seconds": time.perf_counter() - start, "steps": total}


# ----------------------------------------------------------------------------------------------
# scoring candidates
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def one_shot_log_probs(model: OneShotNet, archs: Sequence[Architecture], x: Tensor, archs_per_pass: int = 8,
                       chunk: int = 256) -> Tensor:
    """Log-probabilities of every architecture on x with the one-shot model, [A, N, classes].

    ``archs_per_pass`` architectures share each forward pass: the batch holds ``chunk`` images once
    per architecture, each copy a run of whole ghost batches with that architecture's masks, so a
    path runs only on the copies whose architecture uses it. Batch-norm statistics are per ghost
    batch, so each architecture sees exactly the statistics it would see alone.

    Shapes: x [N, C, H, W] with N a multiple of the ghost batch size.
    """
    g = model.ghost_batch_size
    n = x.shape[0]
    if n % g:
        raise ValueError(f"one_shot_log_probs: x has {n} examples, not a multiple of ghost_batch_size = {g}")
    chunk = max(g, chunk - chunk % g)
    out = []
    for a0 in range(0, len(archs), archs_per_pass):
        group = archs[a0 : a0 + archs_per_pass]
        parts = []
        for i in range(0, n, chunk):
            xc = x[i : i + chunk]
            masks = PathMasks.cat([a.path_masks(xc.shape[0]) for a in group])
            logits = model(xc.repeat(len(group), 1, 1, 1), masks)
            parts.append(F.log_softmax(logits, -1).view(len(group), xc.shape[0], -1))
        out.append(torch.cat(parts, 1))
    return torch.cat(out, 0)


@torch.no_grad()
def separate_models_log_probs(model: OneShotNet, archs: Sequence[Architecture], x: Tensor, chunk: int = 256) -> Tensor:
    """The baseline of :func:`one_shot_log_probs`: for each architecture, build a separate
    plain-PyTorch stand-alone model with the one-shot model's weights (:meth:`OneShotNet.extract`)
    and evaluate it on x in batches of ``chunk``. Same result, [A, N, classes]."""
    g = model.ghost_batch_size
    chunk = max(g, chunk - chunk % g)
    out = []
    for a in archs:
        alone = model.extract(a, fused=False)
        out.append(torch.cat([F.log_softmax(alone(x[i : i + chunk]), -1) for i in range(0, x.shape[0], chunk)]))
    return torch.stack(out)


def symmetrised_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) + KL(q || p) = sum_c (p_c - q_c)(log p_c - log q_c), per example (§5).

    Shapes: log_p, log_q [..., classes] log-probabilities -> [...]."""
    return ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1)


def stratified_sample(scores: Sequence[float], strata: int, per_stratum: int, generator: torch.Generator) -> List[int]:
    """Indices of ``per_stratum`` items drawn at random from each of ``strata`` buckets of equal
    size in the order of ``scores`` (the lowest scores in the first bucket)."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    picked = []
    for s in range(strata):
        bucket = order[s * len(order) // strata : (s + 1) * len(order) // strata]
        take = torch.randperm(len(bucket), generator=generator)[:per_stratum].tolist()
        picked += [bucket[t] for t in sorted(take)]
    return picked


def _accuracy(log_probs: Tensor, y: Tensor) -> List[float]:
    return (log_probs.argmax(-1) == y).double().mean(-1).tolist()


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


def _split(c: OneShotConfig):
    return images_with_validation_split("oneshot", c, min_train=c.batch_size)


@keeps_global_rng
def run(config: Union[OneShotConfig, Dict[str, Any], None] = None) -> Dict[str, Any]:
    """Run the one-shot search (module docstring). Writes results.json and PNGs to ``out_dir``
    when it is set; returns the results."""
    c = OneShotConfig.from_any(config).resolved()
    with torch_threads(c.threads):
        return _run(c)


def _run(c: OneShotConfig) -> Dict[str, Any]:
    from tqdm import tqdm

    t0 = time.perf_counter()
    data, (x, y), (x_val, y_val), (x_test, y_test) = _split(c)
    net = c.network(data.input_shape[0], data.num_classes)

    # 1. the one-shot model
    model = _seeded_model(c.seed * 7919 + 1, **net)
    training = _train(model, x, y, c, c.epochs, True, "one-shot", c.seed * 7919 + 2)

    # 2. N candidate architectures, scored on the validation split, and their KL to the all-on model
    gen = torch.Generator().manual_seed(c.seed * 7919 + 3)
    archs: List[Architecture] = []
    seen = set()
    for _ in range(100 * c.num_architectures):
        a = Architecture.sample(c.num_blocks, gen)
        if a not in seen:
            seen.add(a)
            archs.append(a)
        if len(archs) == c.num_architectures:
            break
    model.eval()
    start = time.perf_counter()
    val_acc: List[float] = []
    bar = tqdm(total=len(archs), desc="one-shot scoring", unit="arch", disable=not c.progress, file=sys.stderr, leave=False)
    for a0 in range(0, len(archs), c.archs_per_pass):
        group = archs[a0 : a0 + c.archs_per_pass]
        val_acc += _accuracy(one_shot_log_probs(model, group, x_val, c.archs_per_pass), y_val)
        bar.update(len(group))
    bar.close()
    scoring_seconds = time.perf_counter() - start
    kl_count = c.kl_examples + (-c.kl_examples) % c.ghost_batch_size  # whole ghost batches
    kl_idx = torch.randperm(x.shape[0], generator=gen)[:kl_count]
    x_kl = x[kl_idx]
    reference = one_shot_log_probs(model, [Architecture.all_on(c.num_blocks)], x_kl)[0]
    kls = symmetrised_kl(reference, one_shot_log_probs(model, archs, x_kl, c.archs_per_pass)).mean(-1).tolist()
    params = [model.num_parameters(a) for a in archs]

    # 3. throughput: batched one-shot scoring against separate plain models with the same weights
    subset = archs[: c.throughput_architectures]
    batched = one_shot_log_probs(model, subset, x_val, c.archs_per_pass)
    separate = separate_models_log_probs(model, subset, x_val)
    agree = float((batched - separate).abs().max())
    t_batched = median_ms(lambda: one_shot_log_probs(model, subset, x_val, c.archs_per_pass), 3, warmup=False) / 1e3
    t_separate = median_ms(lambda: separate_models_log_probs(model, subset, x_val), 3, warmup=False) / 1e3
    throughput = {
        "architectures": len(subset), "val_images": int(x_val.shape[0]),
        "one_shot_archs_per_second": len(subset) / t_batched, "separate_models_archs_per_second": len(subset) / t_separate,
        "speedup": t_separate / t_batched, "max_abs_log_prob_difference": agree,
    }

    # 4. top and small-top, and the stratified sample to retrain
    top = max(range(len(archs)), key=lambda i: (val_acc[i], -i))
    cutoff = sorted(val_acc)[int(0.9 * (len(archs) - 1))]
    small_top = min((i for i in range(len(archs)) if val_acc[i] >= cutoff), key=lambda i: (params[i], -val_acc[i], i))
    stratified = stratified_sample(val_acc, c.strata, c.per_stratum, gen)
    retrain = list(dict.fromkeys(stratified + [top, small_top]))

    retrained: List[Dict[str, Any]] = []
    for n, i in enumerate(retrain):
        runs = []
        for j in range(c.retrain_repeats):  # repeat 0 keeps the seeds of a single-run config
            shift = 1000 * j
            alone = _seeded_model(c.seed * 7919 + 100 + n + shift, **net, arch=archs[i], norm="batch")
            label = f"stand-alone {n + 1}/{len(retrain)}" + (f" run {j + 1}/{c.retrain_repeats}" if c.retrain_repeats > 1 else "")
            fit = _train(alone, x, y, c, c.retrain_epochs, False, label, c.seed * 7919 + 200 + n + shift)
            runs.append({"val": eval_accuracy(alone, x_val, y_val), "test": eval_accuracy(alone, x_test, y_test),
                         "seconds": fit["seconds"], "final_loss": fit["epoch_losses"][-1]})
        retrained.append({
            "index": i, "architecture": archs[i].to_dict(), "parameters": params[i],
            "one_shot_val_accuracy": val_acc[i], "kl": kls[i],
            # the mean over the repeats (the paper averages 5 stand-alone runs)
            "standalone_val_accuracy": statistics.fmean(r["val"] for r in runs),
            "standalone_test_accuracy": statistics.fmean(r["test"] for r in runs),
            "runs": runs,
            "seconds": sum(r["seconds"] for r in runs), "final_loss": statistics.fmean(r["final_loss"] for r in runs),
            "role": "top" if i == top else ("small_top" if i == small_top else "stratified"),
        })
    by_index = {r["index"]: r for r in retrained}
    sample = [by_index[i] for i in stratified]

    def corr(a: str, b: str, rows: Sequence[Dict[str, Any]]) -> float:
        return spearman([r[a] for r in rows], [r[b] for r in rows])

    results: Dict[str, Any] = {
        "config": dataclasses.asdict(c),
        "data": {"source": data.source, "n_train": int(x.shape[0]), "n_val": int(x_val.shape[0]), "n_test": int(x_test.shape[0])},
        "one_shot": {"training": training, "parameters": model.num_parameters(),
                     "all_on_val_accuracy": _accuracy(one_shot_log_probs(model, [Architecture.all_on(c.num_blocks)], x_val), y_val)[0]},
        "architectures": [{"architecture": a.to_dict(), "one_shot_val_accuracy": v, "kl": k, "parameters": p}
                          for a, v, k, p in zip(archs, val_acc, kls, params)],
        "scoring_seconds": scoring_seconds,
        "throughput": throughput,
        "top": by_index[top],
        "small_top": by_index[small_top],
        "retrained": retrained,
        "spearman": {
            "one_shot_vs_standalone_val": corr("one_shot_val_accuracy", "standalone_val_accuracy", retrained),
            "one_shot_vs_standalone_test": corr("one_shot_val_accuracy", "standalone_test_accuracy", retrained),
            "kl_vs_one_shot_val": spearman(kls, val_acc),
            "parameters_vs_standalone_val": corr("parameters", "standalone_val_accuracy", retrained),
            "retrained": len(retrained),
        },
        "stratified_mean_standalone_test_accuracy": statistics.fmean(r["standalone_test_accuracy"] for r in sample),
        "stratified_mean_parameters": statistics.fmean(r["parameters"] for r in sample),
        "seconds": 0.0,
        "files": {},
    }
    results["seconds"] = time.perf_counter() - t0
    save_run(c.out_dir, results, (lambda: _plots(c, results)) if c.plots else None)
    return results


def _plots(c: OneShotConfig, r: Dict[str, Any]) -> Dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    rows = r["retrained"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    colors = {"stratified": "C0", "top": "C3", "small_top": "C2"}
    for ax, split in zip(axes, ("val", "test")):
        for role, label in (("stratified", "stratified sample"), ("top", "top"), ("small_top", "small-top")):
            sel = [q for q in rows if q["role"] == role]
            ax.scatter([100 * q["one_shot_val_accuracy"] for q in sel], [100 * q[f"standalone_{split}_accuracy"] for q in sel],
                       c=colors[role], label=label)
        ax.set_xlabel("one-shot validation accuracy (%)")
        ax.set_ylabel(f"stand-alone {'validation' if split == 'val' else 'test'} accuracy (%)")
        ax.set_title(f"Spearman {r['spearman'][f'one_shot_vs_standalone_{split}']:.2f} over {len(rows)} architectures")
    axes[0].legend()
    fig.tight_layout()
    files["oneshot_vs_standalone"] = os.path.join(c.out_dir, "oneshot_vs_standalone.png")
    fig.savefig(files["oneshot_vs_standalone"], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    archs = r["architectures"]
    ax.scatter([q["kl"] for q in archs], [100 * q["one_shot_val_accuracy"] for q in archs], s=8)
    ax.set_xscale("log")
    ax.set_xlabel("symmetrised KL to the all-on model (training images)")
    ax.set_ylabel("one-shot validation accuracy (%)")
    ax.set_title(f"Spearman {r['spearman']['kl_vs_one_shot_val']:.2f} over {len(archs)} architectures")
    fig.tight_layout()
    files["kl_vs_oneshot"] = os.path.join(c.out_dir, "kl_vs_oneshot.png")
    fig.savefig(files["kl_vs_oneshot"], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist([100 * q["one_shot_val_accuracy"] for q in archs], bins=30)
    ax.set_xlabel("one-shot validation accuracy (%)")
    ax.set_ylabel("architectures")
    fig.tight_layout()
    files["oneshot_histogram"] = os.path.join(c.out_dir, "oneshot_histogram.png")
    fig.savefig(files["oneshot_histogram"], dpi=120)
    plt.close(fig)
    return files


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def summary_table(runs: Sequence[Dict[str, Any]]) -> str:
    """Markdown: one line per seed."""
    lines = [
        "| seed | retrained | Spearman one-shot vs stand-alone (val / test) | Spearman KL vs one-shot | top: test acc, params "
        "| small-top: test acc, params | stratified mean: test acc, params | scoring: one-shot vs separate models (archs/s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        s, t = r["spearman"], r["throughput"]
        lines.append(
            f"| {r['config']['seed']} | {s['retrained']} | {s['one_shot_vs_standalone_val']:.2f} / {s['one_shot_vs_standalone_test']:.2f} "
            f"| {s['kl_vs_one_shot_val']:.2f} "
            f"| {100 * r['top']['standalone_test_accuracy']:.2f}%, {r['top']['parameters']:,} "
            f"| {100 * r['small_top']['standalone_test_accuracy']:.2f}%, {r['small_top']['parameters']:,} "
            f"| {100 * r['stratified_mean_standalone_test_accuracy']:.2f}%, {r['stratified_mean_parameters']:,.0f} "
            f"| {t['one_shot_archs_per_second']:.2f} vs {t['separate_models_archs_per_second']:.2f} ({t['speedup']:.2f}x) |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``bnas-fast run oneshot``."""
    d = OneShotConfig
    parser.add_argument("--dataset", choices=("fashion", "digits"), default="fashion", help="fashion (Debian idx files; digits if absent) or digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=None, help="one-shot training epochs (default 8 Fashion-MNIST, 30 digits)")
    parser.add_argument("--retrain-epochs", type=int, default=None, help="stand-alone epochs (default 3 Fashion-MNIST, 20 digits)")
    parser.add_argument("--retrain-repeats", type=int, default=1, help="stand-alone runs per architecture, averaged (the paper: 5)")
    parser.add_argument("--channels", type=int, default=d.channels)
    parser.add_argument("--num-blocks", type=int, default=d.num_blocks, help="choice blocks per cell (N_choice)")
    parser.add_argument("--r", type=float, default=d.r, help="path dropout: each of k paths is dropped with r^(1/k) at the end")
    parser.add_argument("--ghost-batch-size", type=int, default=d.ghost_batch_size)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--num-architectures", "-N", type=int, default=d.num_architectures)
    parser.add_argument("--strata", type=int, default=None, help="default 4 (2 with --quick)")
    parser.add_argument("--per-stratum", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-val", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(".", "runs", "oneshot"))
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: small budgets and subsets, and caps on the numbers of architectures or candidates (even when given)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    runs = []
    for seed in args.seeds:
        config = OneShotConfig(
            dataset=args.dataset, seed=seed, epochs=args.epochs, retrain_epochs=args.retrain_epochs,
            retrain_repeats=args.retrain_repeats, channels=args.channels,
            num_blocks=args.num_blocks, r=args.r, ghost_batch_size=args.ghost_batch_size, batch_size=args.batch_size,
            num_architectures=args.num_architectures, strata=args.strata, per_stratum=args.per_stratum,
            n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, data_root=args.data_root, threads=args.threads,
            quick=args.quick, plots=not args.no_plots, progress=not args.no_progress, out_dir=os.path.join(args.out, f"seed{seed}"),
        )
        runs.append(run(config))
        print(f"oneshot seed {seed}: {runs[-1]['seconds']:.0f} s -> {config.out_dir}", file=sys.stderr)
    print(summary_table(runs))
    return 0
