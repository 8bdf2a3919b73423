"""Posterior-guided NAS (PGNAS, seed 001): the reference training loop, candidate search and baseline.

    from bnas_fast.methods import pgnas
    results = pgnas.run({"seed": 0, "out_dir": "runs/pgnas/seed0"})

or ``bnas-fast run pgnas [--seeds 0 1 2]``. One run (Algorithm 1 of the paper, at CPU scale):

1. data: Fashion-MNIST from the Debian package, else sklearn digits; a validation split is held out
   of the training images (the candidates are ranked on it, never on the test set);
2. PGNAS: a :class:`~bnas_fast.nn.pgnas.PGNASNet` whose convolutions drop their input channels with
   Gumbel-sigmoid dropout (soft, temperature 0.2, no rescaling), trained jointly in its weights and
   drop logits on cross-entropy + the eq. 15 regulariser (:func:`bnas_fast.nn.concrete_dropout_regularizer`);
   the gated convolution weights get eq. 15's (1 - p)-weighted L2 term and no other weight decay;
3. C candidates: hard keep masks per convolution drawn from the learned rates (slice kept with
   probability 1 - p), each evaluated on the validation split with BN in eval mode; the best one's
   test accuracy and parameter count, without fine-tuning;
4. the baseline of table 3, "Random": the same network trained with a *fixed* path-dropout rate r
   (hard Bernoulli masks, Bender et al.) and ordinary weight decay, r chosen so that its candidates
   have the expected size of PGNAS's (the parameter-weighted mean of the learned rates); C random
   candidates at rate r ranked the same way; the best one's test accuracy without ("w/o FT") and
   with (``ft_epochs`` of training with its mask fixed, "w/ FT") fine-tuning;
5. an ablation: C candidates at the fixed rate r on PGNAS's own trained weights, which separates
   what the learned rates add from what PGNAS's training adds;
6. the number-of-candidates sweep of table 6: the test accuracy of the best of the first C'
   candidates, for each;
7. ``results.json`` and PNG plots: the learned drop rates per layer, the validation accuracies of
   guided and random candidates, and the sweep.

Everything random derives from ``seed``: the same seed gives the same run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from bnas_fast.data.images import fashion_mnist_available
from bnas_fast.methods._config import check_int_fields, config_from_any, eval_accuracy, images_with_validation_split, save_run, torch_threads
from bnas_fast.nn.pgnas import PGNASNet

__all__ = ["PGNASConfig", "run", "add_arguments", "main"]


@dataclass
class PGNASConfig:
    """Every knob of a run. ``None`` means the default for the data (see :meth:`resolved`).

    Defaults: Fashion-MNIST 10 epochs on a 10,000-image training subset, 2,000 validation images
    held out of the training set and 2,000 test images (digits: 60 epochs on its 1,078 / 360 / 359
    split); width 8, 3 stages of one block with 3x3 and 5x5 branches; SGD lr 0.05 momentum 0.9
    cosine, batch 64; the drop logits by Adam (lr 0.01, cosine); temperature 0.2, initial drop rate
    0.1, one rate per input channel of every searched convolution; prior length scale l from
    ``prior_weight_decay``: l^2 = prior_weight_decay * N, so that eq. 15's weight term equals that
    weight decay when p = 0 (3e-3: table 4's best l^2 = 150 over CIFAR's N = 50,000); C = 100
    candidates; 1 fine-tuning epoch.
    """

    dataset: str = "fashion"
    seed: int = 0
    width: int = 8
    num_stages: int = 3
    blocks_per_stage: int = 1
    kernel_sizes: Tuple[int, ...] = (3, 5)
    epochs: Optional[int] = None
    batch_size: int = 64
    lr: float = 0.05
    logit_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    prior_weight_decay: float = 3e-3
    temperature: float = 0.2
    init_drop: float = 0.1
    per_channel_rates: bool = True
    candidates: int = 100
    sweep: Tuple[int, ...] = (1, 5, 10, 20, 50, 100)
    ft_epochs: int = 1
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
    def from_any(cls, config: Union["PGNASConfig", Dict[str, Any], None]) -> "PGNASConfig":
        return config_from_any(cls, config, "pgnas")

    def resolved(self) -> "PGNASConfig":
        c = copy.deepcopy(self)
        if c.dataset not in ("fashion", "digits"):
            raise ValueError(f"pgnas: dataset must be 'fashion' or 'digits', got {c.dataset!r}")
        fashion = c.dataset == "fashion" and fashion_mnist_available(c.data_root or "/usr/share/datasets/fashion-mnist")
        if c.epochs is None:
            c.epochs = 1 if c.quick else (10 if fashion else 60)
        if c.n_train is None:
            c.n_train = 256 if c.quick else (10_000 if fashion else None)
        if c.n_val is None:
            c.n_val = 128 if c.quick else (2_000 if fashion else 360)
        if c.n_test is None:
            c.n_test = 128 if c.quick else (2_000 if fashion else None)
        if c.quick:
            c.candidates, c.sweep = min(c.candidates, 4), tuple(s for s in c.sweep if s <= 4) or (1,)
        c.kernel_sizes, c.sweep = tuple(c.kernel_sizes), tuple(sorted(set(c.sweep)))
        check_int_fields("pgnas", c, (
            ("width", 1), ("num_stages", 1), ("blocks_per_stage", 1), ("epochs", 1), ("batch_size", 2),
            ("candidates", 1), ("ft_epochs", 0), ("n_val", 2), ("threads", 1),
        ))
        if isinstance(c.seed, bool) or not isinstance(c.seed, int):
            raise TypeError(f"pgnas: seed must be an int, got {type(c.seed).__name__}")
        if not (c.lr > 0 and c.logit_lr >= 0 and 0 <= c.momentum < 1 and c.weight_decay >= 0 and c.prior_weight_decay >= 0):
            raise ValueError("pgnas: need lr > 0, logit_lr >= 0, momentum in [0, 1), weight decays >= 0")
        if not (isinstance(c.temperature, (int, float)) and math.isfinite(c.temperature) and c.temperature > 0):
            raise ValueError(f"pgnas: temperature must be a finite number > 0, got {c.temperature!r}")
        if not (isinstance(c.init_drop, (int, float)) and 0 < c.init_drop < 1):
            raise ValueError(f"pgnas: init_drop must be a drop probability in (0, 1), got {c.init_drop!r}")
        if any(not isinstance(s, int) or s < 1 for s in c.sweep):
            raise ValueError(f"pgnas: sweep must hold candidate counts >= 1, got {c.sweep!r}")
        c.sweep = tuple(s for s in c.sweep if s <= c.candidates) or (c.candidates,)
        return c


# ----------------------------------------------------------------------------------------------
# training and evaluation
# ----------------------------------------------------------------------------------------------


def _build_model(c: PGNASConfig, in_channels: int, num_classes: int, mode: str, init_drop: float) -> PGNASNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(c.seed)
        return PGNASNet(
            in_channels, num_classes, width=c.width, num_stages=c.num_stages, blocks_per_stage=c.blocks_per_stage,
            kernel_sizes=c.kernel_sizes, init_drop=init_drop, temperature=c.temperature,
            per_channel_rates=c.per_channel_rates, mode=mode,
        )


def _train(
    model: PGNASNet, x: Tensor, y: Tensor, c: PGNASConfig, epochs: int, learn_rates: bool, label: str, seed_shift: int
) -> Dict[str, Any]:
    """SGD on cross-entropy (+ eq. 15 when ``learn_rates``). The drop logits are trained only when
    ``learn_rates``; the gated conv weights then get eq. 15's L2 term instead of weight decay."""
    from tqdm import tqdm

    searched = model.searched_convs().values()
    logits = [m.dropout.drop_logit for m in searched]
    gated = {id(m.conv.weight) for m in searched}
    for p in logits:
        p.requires_grad_(learn_rates)
    plain = [p for p in model.parameters() if id(p) not in gated and all(p is not q for q in logits)]
    groups = [{"params": plain, "weight_decay": c.weight_decay}]
    groups.append({"params": [m.conv.weight for m in searched], "weight_decay": 0.0 if learn_rates else c.weight_decay})
    optimizers = [torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum)]
    if learn_rates:
        # Adam for the logits: the gradient of one channel's logit is tiny next to a weight's, and
        # SGD at the weights' learning rate barely moves the rates in a short run.
        optimizers.append(torch.optim.Adam(logits, lr=c.logit_lr))
    steps = epochs * math.ceil(x.shape[0] / c.batch_size)
    schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=max(steps, 1)) for o in optimizers]
    length_scale = math.sqrt(c.prior_weight_decay * x.shape[0])
    gen = torch.Generator().manual_seed(c.seed * 7919 + seed_shift)
    model.train()
    losses, start = [], time.perf_counter()
    bar = tqdm(range(epochs), desc=f"{label} seed={c.seed}", unit="epoch", disable=not c.progress, file=sys.stderr, leave=False)
    for _ in bar:
        order = torch.randperm(x.shape[0], generator=gen)
        total = 0.0
        for i in range(0, x.shape[0], c.batch_size):
            idx = order[i : i + c.batch_size]
            if idx.numel() < 2:
                continue  # batch statistics need two examples
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))  # the dropout noise
                loss = F.cross_entropy(model(x[idx]), y[idx])
            if learn_rates:
                loss = loss + model.regularizer(length_scale, x.shape[0])
            loss.backward()
            for o, schedule in zip(optimizers, schedules):
                o.step()
                schedule.step()
            total += float(loss.detach()) * idx.numel()
        losses.append(total / x.shape[0])
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    bar.close()
    return {"epoch_losses": losses, "seconds": time.perf_counter() - start, "length_scale": length_scale}


def _search(
    model: PGNASNet, c: PGNASConfig, x_val: Tensor, y_val: Tensor, drop_rate: Optional[float], seed_shift: int, label: str
) -> List[Dict[str, Any]]:
    """C candidates drawn from the model's rates (or ``drop_rate``), each with its validation
    accuracy and parameter count, in the order drawn."""
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(c.seed * 104729 + seed_shift)
    out = []
    for _ in tqdm(range(c.candidates), desc=f"{label} candidates", disable=not c.progress, file=sys.stderr, leave=False):
        masks = model.sample_architecture(gen, drop_rate)
        model.set_architecture(masks)
        out.append({"masks": masks, "val_accuracy": eval_accuracy(model, x_val, y_val), "parameters": model.count_parameters(masks)})
    model.set_architecture(None)
    return out


def _best(candidates: Sequence[Dict[str, Any]], n: int) -> int:
    """Index of the best validation accuracy among the first n (the first on ties)."""
    return max(range(n), key=lambda i: (candidates[i]["val_accuracy"], -i))


def _test_of(model: PGNASNet, masks: Dict[str, Tensor], x: Tensor, y: Tensor) -> float:
    model.set_architecture(masks)
    acc = eval_accuracy(model, x, y)
    model.set_architecture(None)
    return acc


def _expected_rate(model: PGNASNet) -> float:
    """The drop rate r at which a fixed-rate candidate has the expected size of a learned-rate one:
    the mean of the learned rates weighted by the weights each slice gates."""
    total, dropped = 0.0, 0.0
    for m in model.searched_convs().values():
        w = m.conv.weight
        per_slice = w.shape[0] * w.shape[2] * w.shape[3]
        p = m.dropout.drop_rate.detach().double().expand(w.shape[1])
        total += per_slice * w.shape[1]
        dropped += per_slice * float(p.sum())
    return dropped / total


def _split(c: PGNASConfig):
    return images_with_validation_split("pgnas", c, min_train=2)


def run(config: Union[PGNASConfig, Dict[str, Any], None] = None) -> Dict[str, Any]:
    """Run PGNAS and its random baseline (module docstring). Writes results.json and PNGs to
    ``out_dir`` when it is set; returns the results."""
    c = PGNASConfig.from_any(config).resolved()
    with torch_threads(c.threads):
        return _run(c)


def _run(c: PGNASConfig) -> Dict[str, Any]:
    t0 = time.perf_counter()
    data, (x, y), (x_val, y_val), (x_test, y_test) = _split(c)
    in_channels, classes = data.input_shape[0], data.num_classes

    # PGNAS: learned rates, eq. 15
    guided_model = _build_model(c, in_channels, classes, "soft", c.init_drop)
    guided_training = _train(guided_model, x, y, c, c.epochs, True, "pgnas", 1)
    full_params = guided_model.count_parameters()
    guided_full_test = eval_accuracy(guided_model, x_test, y_test)  # eval mode: the expectation, x (1 - p)
    rates = guided_model.drop_rates()
    guided = _search(guided_model, c, x_val, y_val, None, 2, "guided")

    # Random: a fixed path-dropout rate with the same expected size
    r = min(max(_expected_rate(guided_model), 1e-3), 0.999)
    random_model = _build_model(c, in_channels, classes, "hard", r)
    random_training = _train(random_model, x, y, c, c.epochs, False, "random", 3)
    random_full_test = eval_accuracy(random_model, x_test, y_test)
    random = _search(random_model, c, x_val, y_val, r, 4, "random")
    # ablation: fixed-rate masks on PGNAS's own weights isolate what the learned rates add
    same_weights = _search(guided_model, c, x_val, y_val, r, 6, "fixed rate, PGNAS weights")

    def summary(model: PGNASNet, cands: List[Dict[str, Any]]) -> Dict[str, Any]:
        best = _best(cands, len(cands))
        vals = [k["val_accuracy"] for k in cands]
        return {
            "best_index": best,
            "best_val_accuracy": cands[best]["val_accuracy"],
            "best_test_accuracy": _test_of(model, cands[best]["masks"], x_test, y_test),
            "best_parameters": cands[best]["parameters"],
            "mean_val_accuracy": statistics.fmean(vals),
            "mean_parameters": statistics.fmean(k["parameters"] for k in cands),
            "val_accuracies": vals,
            "parameters": [k["parameters"] for k in cands],
            "sweep": [
                {"candidates": n, "test_accuracy": _test_of(model, cands[_best(cands, n)]["masks"], x_test, y_test),
                 "val_accuracy": cands[_best(cands, n)]["val_accuracy"]}
                for n in c.sweep
            ],
        }

    guided_summary, random_summary = summary(guided_model, guided), summary(random_model, random)
    same_weights_summary = summary(guided_model, same_weights)

    # Random w/ FT: the best random candidate trained briefly with its mask fixed
    ft = {"epochs": c.ft_epochs}
    if c.ft_epochs:
        tuned = copy.deepcopy(random_model)
        tuned.set_architecture(random[random_summary["best_index"]]["masks"])
        ft["training"] = _train(tuned, x, y, c, c.ft_epochs, False, "random ft", 5)
        ft["test_accuracy"] = eval_accuracy(tuned, x_test, y_test)

    results: Dict[str, Any] = {
        "config": dataclasses.asdict(c),
        "data": {"source": data.source, "n_train": int(x.shape[0]), "n_val": int(x_val.shape[0]), "n_test": int(x_test.shape[0])},
        "full_model": {"parameters": full_params, "pgnas_test_accuracy": guided_full_test, "random_test_accuracy": random_full_test},
        "learned_drop_rates": rates,
        "random_drop_rate": r,
        "pgnas": dict(guided_summary, training=guided_training),
        "random": dict(random_summary, training=random_training, fine_tuned=ft),
        "fixed_rate_on_pgnas_weights": same_weights_summary,
        "seconds": 0.0,
        "files": {},
    }
    results["seconds"] = time.perf_counter() - t0
    save_run(c.out_dir, results, (lambda: _plots(c, results)) if c.plots else None)
    return results


def _plots(c: PGNASConfig, r: Dict[str, Any]) -> Dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    names = list(r["learned_drop_rates"])
    values = list(r["learned_drop_rates"].values())
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 3.5))
    if max(len(v) for v in values) > 1:  # a rate per input channel: their spread per convolution
        ax.boxplot(values, positions=range(len(names)), widths=0.6, showfliers=True)
    else:
        ax.bar(range(len(names)), [v[0] for v in values])
    ax.axhline(c.init_drop, color="gray", ls="--", label=f"initial rate {c.init_drop}")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace("body.", "").replace(".branches", "") for n in names], rotation=90, fontsize=6)
    ax.set_ylabel("learned drop rate p")
    ax.set_title("PGNAS: learned drop rate of each searched convolution")
    ax.legend()
    fig.tight_layout()
    files["drop_rates"] = os.path.join(c.out_dir, "drop_rates.png")
    fig.savefig(files["drop_rates"], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist([100 * v for v in r["pgnas"]["val_accuracies"]], bins=20, alpha=0.6, label="posterior-guided")
    ax.hist([100 * v for v in r["random"]["val_accuracies"]], bins=20, alpha=0.6, label=f"random (fixed rate {r['random_drop_rate']:.2f})")
    ax.hist([100 * v for v in r["fixed_rate_on_pgnas_weights"]["val_accuracies"]], bins=20, alpha=0.6, label="fixed rate, PGNAS weights")
    ax.set_xlabel("validation accuracy of a candidate (%)")
    ax.set_ylabel("candidates")
    ax.legend()
    fig.tight_layout()
    files["candidates"] = os.path.join(c.out_dir, "candidates.png")
    fig.savefig(files["candidates"], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in (("pgnas", "posterior-guided"), ("random", "random"), ("fixed_rate_on_pgnas_weights", "fixed rate, PGNAS weights")):
        ax.plot([s["candidates"] for s in r[key]["sweep"]], [100 * s["test_accuracy"] for s in r[key]["sweep"]], "o-", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("number of candidates C")
    ax.set_ylabel("test accuracy of the best (%)")
    ax.legend()
    fig.tight_layout()
    files["sweep"] = os.path.join(c.out_dir, "candidates_sweep.png")
    fig.savefig(files["sweep"], dpi=120)
    plt.close(fig)
    return files


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def summary_table(runs: Sequence[Dict[str, Any]]) -> str:
    """Markdown: one line per seed and a mean line, guided against random."""
    lines = [
        "| seed | PGNAS best val / test acc | params | random best val / test acc (w/o FT) | w/ FT | params "
        "| fixed rate on PGNAS weights: best val / test acc | random rate |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def pair(summary: Dict[str, Any]) -> str:
        return f"{100 * summary['best_val_accuracy']:.2f}% / {100 * summary['best_test_accuracy']:.2f}%"

    for r in runs:
        g, q, a = r["pgnas"], r["random"], r["fixed_rate_on_pgnas_weights"]
        ft = q["fine_tuned"].get("test_accuracy")
        lines.append(
            f"| {r['config']['seed']} | {pair(g)} | {g['best_parameters']:,} | {pair(q)} | {'-' if ft is None else f'{100 * ft:.2f}%'} "
            f"| {q['best_parameters']:,} | {pair(a)} | {r['random_drop_rate']:.3f} |"
        )
    if len(runs) > 1:
        def mean(key: str, field: str) -> float:
            return statistics.fmean(r[key][field] for r in runs)

        def mean_pair(key: str) -> str:
            return f"{100 * mean(key, 'best_val_accuracy'):.2f}% / {100 * mean(key, 'best_test_accuracy'):.2f}%"

        fts = [r["random"]["fine_tuned"].get("test_accuracy") for r in runs]
        ft_mean = "-" if None in fts else f"{100 * statistics.fmean(fts):.2f}%"
        lines.append(
            f"| mean | {mean_pair('pgnas')} | {mean('pgnas', 'best_parameters'):,.0f} | {mean_pair('random')} | {ft_mean} "
            f"| {mean('random', 'best_parameters'):,.0f} | {mean_pair('fixed_rate_on_pgnas_weights')} | |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``bnas-fast run pgnas``."""
    parser.add_argument("--dataset", choices=("fashion", "digits"), default="fashion", help="fashion (Debian idx files; digits if absent) or digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=None, help="default 10 Fashion-MNIST, 60 digits")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--candidates", "-C", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--init-drop", type=float, default=0.1)
    parser.add_argument("--prior-weight-decay", type=float, default=PGNASConfig.prior_weight_decay,
                        help="sets the prior length scale: l^2 = this * N (eq. 15)")
    parser.add_argument("--logit-lr", type=float, default=PGNASConfig.logit_lr, help="learning rate of the drop logits")
    parser.add_argument("--per-layer-rates", action="store_true",
                        help="one drop rate per convolution (the paper's p^s_l) instead of one per input channel")
    parser.add_argument("--ft-epochs", type=int, default=1)
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-val", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(".", "runs", "pgnas"))
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: small budgets and subsets, and caps on the numbers of architectures or candidates (even when given)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    runs = []
    for seed in args.seeds:
        config = PGNASConfig(
            dataset=args.dataset, seed=seed, epochs=args.epochs, width=args.width, candidates=args.candidates,
            temperature=args.temperature, init_drop=args.init_drop, per_channel_rates=not args.per_layer_rates,
            prior_weight_decay=args.prior_weight_decay, logit_lr=args.logit_lr,
            ft_epochs=args.ft_epochs, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, data_root=args.data_root,
            threads=args.threads, quick=args.quick, plots=not args.no_plots, progress=not args.no_progress,
            out_dir=os.path.join(args.out, f"seed{seed}"),
        )
        runs.append(run(config))
        print(f"pgnas seed {seed}: {runs[-1]['seconds']:.0f} s -> {config.out_dir}", file=sys.stderr)
    print(summary_table(runs))
    return 0
