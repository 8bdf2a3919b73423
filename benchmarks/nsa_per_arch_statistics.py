"""Why per-architecture running statistics widen NSA-i's eval-mode spread (README, "NSA, NSA-i and
NSA-id"): an experiment, not a timing.

    python benchmarks/nsa_per_arch_statistics.py SEED [nsa_i|nsa_id]

trains the variant with per-architecture statistics on the configuration of `bnas-fast run nsa
--dataset fashion --seed SEED --threads 1 --running-stats per_arch` (about 2.5 min on one thread),
then scores the same 20 architectures in eval mode with three sets of statistics:
  (a) the running statistics accumulated in training (the run's eval-mode column);
  (b) per-architecture statistics recomputed with the final weights over 160 mixed batches of 256
      (one random architecture per example, as in training; about 800 examples per architecture,
      equal weights): neither stale nor noisy, but each layer's statistics are still taken while
      the earlier layers normalise with the statistics of the mixed batch;
  (c) calibrated: every BatchNorm recomputed from 10 batches of 256 run with that architecture alone
      (the run's calibrated column), so each layer follows the earlier layers' normalisation.
Prints the standard deviation and mean of the 20 accuracies for each.
"""

import copy
import statistics
import sys

import torch

from bnas_fast.data import load_images
from bnas_fast.methods.nsa import NSAConfig, _accuracy, _build_model, _calibrated_probs, _probs, _train
from bnas_fast.nn import recalibrate_batch_norm


def main(seed: int, variant: str = "nsa_i") -> None:
    torch.set_num_threads(1)
    c = NSAConfig(dataset="fashion", variant=variant, running_stats="per_arch", seed=seed, threads=1,
                  progress=False, plots=False).resolved()
    data = load_images(c.dataset, c.data_root, n_train=c.n_train, n_test=c.n_test, seed=c.seed)
    x, y = data.train.tensors
    x_test, y_test = data.test.tensors
    model = _build_model(c, data.input_shape[0], data.num_classes)
    _train(model, x, y, c)
    archs = range(c.eval_archs)
    accumulated = [_accuracy(_probs(model, x_test, a, bn_train=False), y_test) for a in archs]
    generator = torch.Generator().manual_seed(123)
    mixed = []
    for _ in range(4):  # four passes over the training images
        order = torch.randperm(x.shape[0], generator=generator)
        for i in range(0, x.shape[0], 256):
            idx = order[i:i + 256]
            mixed.append((x[idx], torch.randint(0, c.num_archs, (idx.numel(),), generator=generator)))
    twin = copy.deepcopy(model)
    recalibrate_batch_norm(twin, mixed)
    recomputed = [_accuracy(_probs(twin, x_test, a, bn_train=False), y_test) for a in archs]
    calibrated = [_accuracy(_calibrated_probs(model, x, x_test, a, c.calibration_batches), y_test) for a in archs]
    for name, acc in (("(a) accumulated in training", accumulated), ("(b) recomputed over mixed batches", recomputed),
                      ("(c) calibrated per architecture", calibrated)):
        print(f"{variant} seed {seed} {name}: std {100 * statistics.pstdev(acc):.2f} points, "
              f"mean {100 * statistics.fmean(acc):.2f}%")


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:3])
