"""Time and peak memory of GGNBlocks.compute against its ``max_factor_bytes`` bound, on a network
with train-mode BatchNorm (where every example's output depends on the whole batch, so the exact
blocks need N K back-propagated factors, each as large as the batch's activations).

    python benchmarks/curvature_chunks.py

The network: 3x3 convolutions 1 -> 16 -> 32 (stride 2), each followed by BatchNorm2d in train mode
and ReLU, global average pool, linear to 10 classes; 28x28 inputs, batch 32, float32, exact mode
(9 factors per example: 288 cotangents of 4.8 MiB each), 2 threads. For each bound, prints the
median of 3 calls and the peak memory of one call (bnas_fast.bench.peak_memory_bytes); "unbounded"
is one pass over every factor, which is what GGNBlocks did before the bound existed. Runs under
the default glibc settings, then again in a child process with MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=68719476736 (no page faults on large temporaries). About 2 minutes.

Then the two exact paths for train-mode BatchNorm at the default bound, called in turn (medians
of 5 calls, forward pass included): ``batch_norm_path="pairs"`` (N K = 288 cotangents) and
``"statistics"`` (K + 2 sum C = 9 + 96 cotangents), with their peak memory.
"""

import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from bnas_fast.bench import peak_memory_bytes
from bnas_fast.cli import NO_MMAP_ENV, _malloc_label
from bnas_fast.curvature import MAX_FACTOR_BYTES, GGNBlocks

MiB = 2**20
BOUNDS = (16 * MiB, 64 * MiB, MAX_FACTOR_BYTES, 512 * MiB, 2**50)


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).train()
    x = torch.randn(32, 1, 28, 28)
    print(f"## malloc: {_malloc_label()} | train-mode BatchNorm, batch 32, exact | median of 3 calls")
    seconds = {}
    for bound in BOUNDS:
        def blocks(bound=bound):
            with GGNBlocks(model) as curvature:
                logits = model(x)
            return curvature.compute(logits, "exact", max_factor_bytes=bound)

        blocks()  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            blocks()
            times.append(time.perf_counter() - start)
        seconds[bound] = statistics.median(times)
        label = "unbounded" if bound == 2**50 else f"{bound // MiB} MiB" + (" (default)" if bound == MAX_FACTOR_BYTES else "")
        print(f"max_factor_bytes {label}: {seconds[bound]:.2f} s, peak memory {peak_memory_bytes(blocks) / MiB:.0f} MiB",
              flush=True)
    print(f"default against unbounded: {seconds[2**50] / seconds[MAX_FACTOR_BYTES]:.2f}x as fast")

    def blocks_by(path):
        with GGNBlocks(model, batch_norm_path=path) as curvature:
            logits = model(x)
        return curvature.compute(logits, "exact")

    paths = ("pairs", "statistics")
    for path in paths:
        blocks_by(path)  # warm-up
    times = {path: [] for path in paths}
    for _ in range(5):
        for path in paths:  # in turn: a drift of the host shifts both alike
            start = time.perf_counter()
            blocks_by(path)
            times[path].append(time.perf_counter() - start)
    median = {path: statistics.median(spent) for path, spent in times.items()}
    for path in paths:
        print(f"batch_norm_path={path!r}: {median[path]:.2f} s, peak memory "
              f"{peak_memory_bytes(lambda: blocks_by(path)) / MiB:.0f} MiB", flush=True)
    print(f"'statistics' against 'pairs': {median['pairs'] / median['statistics']:.2f}x as fast")


if __name__ == "__main__":
    main()
    if _malloc_label() == "default":
        sys.stdout.flush()
        # glibc reads these variables at start-up: measure again in a child that has them.
        sys.exit(subprocess.call([sys.executable, __file__], env={**os.environ, **NO_MMAP_ENV}))
