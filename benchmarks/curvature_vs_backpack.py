"""GGNBlocks (per-filter blocks) against BackPACK's DiagGGNExact (diagonal only) and against the
same blocks computed with the references (the unfold + einsum blocks, and autograd instead of the
rank-one ops for the factors' backward pass), on issue 6's network.

    python benchmarks/curvature_vs_backpack.py

runs under the default glibc settings, then again in a child process with
MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 (no page faults on large temporaries).

The network: 3x3 convolutions 3 -> 16 -> 32 -> 32 with ReLUs on 16x16 inputs, global average pool,
linear to 10 classes; batch 32, float32, 2 threads. Prints the median of 7 calls of each, the
providers called in turn, twice, and the peak memory of one call of each
(bnas_fast.bench.peak_memory_bytes). One provider is GGNBlocks without the rank-one route
(rank_one_backward=False): what the rank-one ops save.
BackPACK is a test-only dependency (`pip install --no-deps backpack-for-pytorch unfoldNd einops`).
Not yet a `bnas-fast bench` case: the harness's providers are eager / compile / bnas_fast.

    python benchmarks/curvature_vs_backpack.py --breakdown

times the phases of one GGNBlocks call instead (medians of 30 calls): the forward pass inside
the context, the batched backward passes of the factors (torch.autograd.grad), the rank-one ops
and each layer's unfolded_gram; and, for the phases that multiply, their rate as a share of a
2048^3 `a @ b`'s timed in the same run (phase_multiply_adds()).

    python benchmarks/curvature_vs_backpack.py --floor

counts the multiply-adds of the cheapest exact algorithm we know for the whole call and the rate
that 5x the reference would need, against a 2048^3 `a @ b`.

    python benchmarks/curvature_vs_backpack.py --bound

splits the reference's call and ours into the time inside the blocks op and the rest, and prints
how far a faster blocks op could take the speed-up (bound()).

    python benchmarks/curvature_vs_backpack.py --route

times GGNBlocks with and without the rank-one route in both modes, and the rank-one ops against
ATen's transposed convolution for 1 to 10 cotangents (route()).

Every mode runs under the default glibc settings, then again in a child process without page
faults, as the first one does.
"""

import copy
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import bnas_fast.curvature
from bnas_fast import reference
from bnas_fast.bench import peak_memory_bytes
from bnas_fast.cli import NO_MMAP_ENV, _malloc_label
from bnas_fast.curvature import GGNBlocks


def _network() -> nn.Module:
    """Issue 6's network (module docstring), seeded; also sets 2 torch threads."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def _blocks_with_reference(model: nn.Module, x: torch.Tensor):
    """GGNBlocks' exact blocks with every bnas_fast op swapped for its pure-PyTorch reference:
    bnas_fast.reference.unfolded_gram (unfold + einsum) in place of the fused op, and autograd's
    transposed convolution for the factors' backward pass (rank_one_backward=False) in place of the
    rank-one ops."""
    def unfold_einsum(x, factors, kernel_size=1, stride=1, padding=0, dilation=1, groups=1, bias=False, diagonal=False):
        pairs = [(v, v) if isinstance(v, int) else tuple(v) for v in (kernel_size, stride, padding, dilation)]
        return reference.unfolded_gram(x, factors, *pairs, groups, bias, diagonal)

    fused = bnas_fast.curvature.unfolded_gram
    bnas_fast.curvature.unfolded_gram = unfold_einsum
    try:
        with GGNBlocks(model, rank_one_backward=False) as curvature:
            logits = model(x)
        return curvature.compute(logits, "exact")
    finally:
        bnas_fast.curvature.unfolded_gram = fused


def interleaved_medians_ms(fns, repeat=7):
    """Median ms of each of fns, called in turn (one call of each per round, after a warm-up
    round): a drift of the host's speed then shifts every provider alike, not one of them."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [1e3 * statistics.median(spent) for spent in times]


def main() -> None:
    import backpack
    from backpack.extensions import DiagGGNExact

    model = _network()
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    extended = backpack.extend(copy.deepcopy(model))
    loss = backpack.extend(nn.CrossEntropyLoss(reduction="sum"))

    def diag_ggn_exact():
        extended.zero_grad()
        with backpack.backpack(DiagGGNExact()):
            loss(extended(x), y).backward()

    def blocks():
        with GGNBlocks(model) as curvature:
            logits = model(x)
        return curvature.compute(logits, "exact")

    def diagonals():
        with GGNBlocks(model) as curvature:
            logits = model(x)
        return curvature.compute(logits, "exact", diagonal=True)

    def blocks_without_route():
        with GGNBlocks(model, rank_one_backward=False) as curvature:
            logits = model(x)
        return curvature.compute(logits, "exact")

    def blocks_with_reference():
        return _blocks_with_reference(model, x)

    print(f"## malloc: {_malloc_label()}")
    for _ in range(2):
        a, b, c, d, e = interleaved_medians_ms([diag_ggn_exact, blocks, blocks_with_reference, diagonals, blocks_without_route])
        print(
            f"BackPACK DiagGGNExact {a:.1f} ms | bnas_fast GGNBlocks (exact blocks) {b:.1f} ms ({a / b:.2f}x) "
            f"| GGNBlocks on the references {c:.1f} ms ({c / b:.2f}x ours) "
            f"| GGNBlocks diagonals only {d:.1f} ms | GGNBlocks without the rank-one route {e:.1f} ms ({e / b:.2f}x ours)"
        )
    providers = (
        ("BackPACK DiagGGNExact", diag_ggn_exact), ("GGNBlocks", blocks), ("GGNBlocks on the reference", blocks_with_reference),
        ("GGNBlocks diagonals only", diagonals), ("GGNBlocks without the rank-one route", blocks_without_route),
    )
    for name, fn in providers:
        print(f"peak memory, {name}: {peak_memory_bytes(fn) / 2**20:.1f} MiB")


def phase_multiply_adds(N: int = 32, K: int = 9, probe: int = 1) -> dict:
    """Multiply-adds of each phase of one GGNBlocks call on _network(), as our implementation does
    them (not the cheapest algorithm of multiply_adds()), keyed by the labels breakdown() prints.
    Counts only the products: the forward convolutions and Linear; in the factors' autograd
    passes the input gradients of the convolutions that autograd crosses (all but the first, whose
    input needs none, and the last, which the rank-one route crosses), for the K exact factors and
    the probe; in rank_one_conv_input_grad one transposed convolution per (example, map) and the
    sums over the maps for each cotangent; in each layer's blocks the rows [K' C_out, P] x [P, D']
    per example and the full Gram products C_out x [D', N K'] x [N K', D'] (unfolded_gram computes
    both triangles), with K' = 1 for the factors it compresses (the last convolution, the Linear
    layer). Pooling, ReLU and the copies are memory-bound and not counted."""
    model = _network()
    layers = [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    P, R = 16 * 16, K + probe  # every convolution keeps 16 x 16; R cotangents per pass
    counts = {"forward pass in the context": 0, BACKWARD_LABEL: 0, "rank_one_conv_input_grad": 0}
    for i, m in enumerate(layers):
        rank_one = i >= len(layers) - 2  # the last convolution (before the pool) and the Linear layer
        k = 1 if rank_one else K
        if isinstance(m, nn.Linear):
            counts["forward pass in the context"] += N * m.in_features * m.out_features
            D = m.in_features + (m.bias is not None)
            counts[f"blocks of a layer with input {(m.in_features,)}"] = N * k * m.out_features * D * (D + 1)
            continue
        taps = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        D = taps + (m.bias is not None)
        counts["forward pass in the context"] += N * P * m.out_channels * taps
        if rank_one:
            counts["rank_one_conv_input_grad"] += N * m.out_channels * P * taps + R * N * m.out_channels * m.in_channels * P
        elif i > 0:
            counts[BACKWARD_LABEL] += R * N * P * m.out_channels * taps
        counts[f"blocks of a layer with input {(m.in_channels, 16, 16)}"] = N * k * m.out_channels * (P * D + D * D)
    return counts


BACKWARD_LABEL = "backward pass of the factors (torch.autograd.grad; two passes around the rank-one route)"


def breakdown(calls: int = 30) -> None:
    """Median time of each phase of GGNBlocks on the same network (module docstring), with the
    rate of its products (phase_multiply_adds()) against a 2048^3 `a @ b` timed in the same run
    (one product after each call, so that a drift of the host shifts both alike)."""
    model = _network()
    x = torch.randn(32, 3, 16, 16)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    times = {}  # {phase: [seconds per call]}
    this_call = {}  # {phase: seconds so far in the current call} (the route runs autograd twice)

    def timed(label, fn):
        """fn, adding its time to label(*args) of the current call."""
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            name = label(*args)
            this_call[name] = this_call.get(name, 0.0) + time.perf_counter() - start
            return out
        return wrapper

    def layer_label(x, *args):
        return f"blocks of a layer with input {tuple(x.shape[1:])}"

    def backward_label(*args):
        return BACKWARD_LABEL

    fused, grad = bnas_fast.curvature.unfolded_gram, torch.autograd.grad
    split, input_grad = bnas_fast.curvature.rank_one_split, bnas_fast.curvature.rank_one_conv_input_grad
    bnas_fast.curvature.unfolded_gram = timed(layer_label, fused)
    torch.autograd.grad = timed(backward_label, grad)
    bnas_fast.curvature.rank_one_split = timed(lambda *args: "rank_one_split", split)
    bnas_fast.curvature.rank_one_conv_input_grad = timed(lambda *args: "rank_one_conv_input_grad", input_grad)
    try:
        for _ in range(calls + 1):  # the first call warms up
            this_call.clear()
            start = time.perf_counter()
            with GGNBlocks(model) as curvature:
                logits = model(x)
            this_call["forward pass in the context"] = time.perf_counter() - start
            start = time.perf_counter()
            curvature.compute(logits, "exact")
            this_call["compute (the backward pass, the blocks and the rest)"] = time.perf_counter() - start
            start = time.perf_counter()
            a @ b
            this_call["a @ b"] = time.perf_counter() - start
            for name, seconds in this_call.items():
                times.setdefault(name, []).append(seconds)
    finally:
        bnas_fast.curvature.unfolded_gram, torch.autograd.grad = fused, grad
        bnas_fast.curvature.rank_one_split, bnas_fast.curvature.rank_one_conv_input_grad = split, input_grad
    ms = {name: 1e3 * statistics.median(values[1:]) for name, values in times.items()}
    gemm_rate = 2 * 2048**3 / ms.pop("a @ b") / 1e6  # GFLOP/s
    counts = phase_multiply_adds()
    print(f"## malloc: {_malloc_label()} | medians of {calls} calls | a 2048^3 a @ b: {gemm_rate:.0f} GFLOP/s")
    for name, value in ms.items():
        rate = ""
        if counts.get(name):
            gflops = 2 * counts[name] / value / 1e6
            rate = f" ({counts[name] / 1e6:.1f} M multiply-adds: {gflops:.0f} GFLOP/s, {100 * gflops / gemm_rate:.0f}% of a @ b)"
        print(f"{name}: {value:.2f} ms{rate}")


def multiply_adds(N: int = 32, K: int = 9) -> dict:
    """Multiply-adds of the exact blocks of _network() at batch N with K = C - 1 factors, by the
    cheapest exact algorithm we know (README, issue 6), counted from the layers' shapes:
    - the forward pass;
    - the factors' input gradients through every convolution but the first (whose input needs
      none); behind the global average pool the last convolution's factors are rank one per
      (example, output channel), c[n,k,o] w[n,o], so its input gradient can be
      sum_o c[n,k,o] T[n,o] with T[n,o] the transposed convolution of the single map w[n,o]
      (the maps T: as one factor's input gradient; the sums: N K C_out C_in P);
    - the blocks: per example the rows [K' C_out, P] x [P, D'] and the Gram products
      C_out x [D', N K'] x [N K', D'] on and above the diagonal only (D' (D' + 1) / 2 entries:
      they are symmetric), with K' = 1 where the factors are rank one (the last convolution, the
      Linear layer)."""
    model = _network()
    layers = [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    counts = {"forward": 0, "factors' input gradients": 0, "blocks": 0}
    for i, m in enumerate(layers):
        rank_one = i >= len(layers) - 2  # the last convolution (before the pool) and the Linear layer
        if isinstance(m, nn.Conv2d):
            P = 16 * 16  # padding 1, stride 1: every layer keeps 16 x 16
            taps = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            D = taps + (m.bias is not None)
            counts["forward"] += N * P * m.out_channels * taps
            if i > 0:
                per_factor = N * P * m.out_channels * taps
                sums = N * K * m.out_channels * m.in_channels * P
                counts["factors' input gradients"] += per_factor + sums if rank_one else K * per_factor
        else:
            P, D = 1, m.in_features + (m.bias is not None)
            counts["forward"] += N * m.in_features * m.out_features
        k = 1 if rank_one else K
        counts["blocks"] += N * k * m.out_channels * P * D if isinstance(m, nn.Conv2d) else N * m.out_features * D
        counts["blocks"] += (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features) * D * (D + 1) // 2 * N * k
    return counts


def floor(target: float = 5.0) -> None:
    """What issue 6's target of `target` x the unfold + einsum reference asks of this CPU: the
    reference's time (median of 7 calls), the multiply-adds of the cheapest exact algorithm, the
    sustained rate that `target` x would need, and the rate of `a @ b` on 2048 x 2048 matrices."""
    model = _network()
    x = torch.randn(32, 3, 16, 16)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    reference_ms, gemm_ms = interleaved_medians_ms([lambda: _blocks_with_reference(model, x), lambda: a @ b])
    counts = multiply_adds()
    flop = 2 * sum(counts.values())
    budget_ms = reference_ms / target
    print(f"## malloc: {_malloc_label()} | medians of 7 calls")
    for name, value in counts.items():
        print(f"{name}: {value / 1e6:.1f} M multiply-adds")
    print(f"in all: {flop / 1e9:.2f} GFLOP; the reference takes {reference_ms:.1f} ms, so {target:g}x is {budget_ms:.1f} ms: "
          f"{flop / budget_ms / 1e6:.0f} GFLOP/s sustained; a 2048^3 float32 product runs at "
          f"{2 * 2048**3 / gemm_ms / 1e6:.0f} GFLOP/s here")


def bound(rounds: int = 15) -> None:
    """How far any faster kernel for the blocks could take the speed-up over the reference.

    Times, in turn, the reference call (_blocks_with_reference) and ours (GGNBlocks), each split
    into the time spent inside the blocks op (the fused op or the unfold + einsum reference) and
    the rest (the forward pass, the factors' backward pass, the checks), and a 2048^3 `a @ b`
    (medians of ``rounds`` rounds). Prints two bounds on the whole call's speed-up:
    - with the blocks free: the reference's time over the time of its rest;
    - with the blocks at the rate of `a @ b`: the reference's time over its rest plus the blocks'
      multiply-adds (multiply_adds(), the cheapest exact direct algorithm) at that rate.
    And one on the op alone: the reference's blocks over those multiply-adds at that rate."""
    model = _network()
    x = torch.randn(32, 3, 16, 16)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    inside = []  # seconds spent inside the blocks op during the current call

    def timed(op):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = op(*args, **kwargs)
            inside.append(time.perf_counter() - start)
            return out
        return wrapper

    fused = bnas_fast.curvature.unfolded_gram
    reference_op = reference.unfolded_gram
    spent = {name: [] for name in ("reference", "reference blocks", "reference rest", "ours", "ours blocks", "ours rest", "a @ b")}

    def call(name, fn):
        inside.clear()
        start = time.perf_counter()
        fn()
        total = time.perf_counter() - start
        spent[name].append(total)
        spent[name + " blocks"].append(sum(inside))
        spent[name + " rest"].append(total - sum(inside))  # this round's; its median is not a difference of medians

    def ours():
        with GGNBlocks(model) as curvature:
            logits = model(x)
        return curvature.compute(logits, "exact")

    bnas_fast.curvature.unfolded_gram, reference.unfolded_gram = timed(fused), timed(reference_op)
    try:
        for i in range(rounds + 1):  # the first round warms up
            call("reference", lambda: _blocks_with_reference(model, x))
            call("ours", ours)
            start = time.perf_counter()
            a @ b
            spent["a @ b"].append(time.perf_counter() - start)
    finally:
        bnas_fast.curvature.unfolded_gram, reference.unfolded_gram = fused, reference_op
    ms = {name: 1e3 * statistics.median(values[1:]) for name, values in spent.items()}
    gemm_flops_per_ms = 2 * 2048**3 / ms["a @ b"]
    blocks_at_gemm_rate = 2 * multiply_adds()["blocks"] / gemm_flops_per_ms
    rest = ms["reference rest"]
    print(f"## malloc: {_malloc_label()} | medians of {rounds} rounds")
    print(f"reference: {ms['reference']:.1f} ms; blocks {ms['reference blocks']:.1f} ms, the rest {rest:.1f} ms")
    print(f"ours: {ms['ours']:.1f} ms; blocks {ms['ours blocks']:.1f} ms, the rest {ms['ours rest']:.1f} ms "
          f"({ms['reference'] / ms['ours']:.2f}x faster than the reference)")
    print(f"a @ b on 2048 x 2048: {gemm_flops_per_ms / 1e6:.0f} GFLOP/s; the blocks' "
          f"{multiply_adds()['blocks'] / 1e6:.1f} M multiply-adds at that rate: {blocks_at_gemm_rate:.1f} ms")
    print(f"whole call, at most: {ms['reference'] / rest:.2f}x with the blocks free, "
          f"{ms['reference'] / (rest + blocks_at_gemm_rate):.2f}x with them at the rate of a @ b")
    print(f"the blocks op alone, at most: {ms['reference blocks'] / blocks_at_gemm_rate:.2f}x at the rate of a @ b "
          f"(ours: {ms['reference blocks'] / ms['ours blocks']:.2f}x faster than the reference's)")


def route(rounds: int = 25) -> None:
    """What the rank-one route gains (GGNBlocks with rank_one_backward True and False).

    1. The whole call in "exact" mode (9 factors and the probe per pass) and in "mc" mode (one
       factor and the probe: below RANK_ONE_MIN_COTANGENTS, so both calls run autograd), the two
       calls in turn for ``rounds`` rounds: their medians, and the median and quartiles of each
       round's saving (a drift of the host shifts both calls of a round alike).
    2. On the network's last layer (32 -> 32, N = 32), rank_one_split plus rank_one_conv_input_grad
       against torch.nn.grad.conv2d_input of the expanded factors (what autograd runs), for 1 to
       10 cotangents (medians of 31 calls): where the route starts to pay."""
    model = _network()
    x = torch.randn(32, 3, 16, 16)
    print(f"## malloc: {_malloc_label()} | {rounds} rounds")
    for mode in ("exact", "mc"):
        def call(route_on):
            with GGNBlocks(model, rank_one_backward=route_on) as curvature:
                logits = model(x)
            return curvature.compute(logits, mode, torch.Generator().manual_seed(0))

        spent = {True: [], False: []}
        for route_on in (True, False):
            call(route_on)  # warm-up
        for _ in range(rounds):
            for route_on in (True, False):
                start = time.perf_counter()
                call(route_on)
                spent[route_on].append(time.perf_counter() - start)
        with_route, without = (1e3 * statistics.median(spent[r]) for r in (True, False))
        saving = sorted(1e3 * (b - a) for a, b in zip(spent[True], spent[False]))
        quartiles = statistics.quantiles(saving, n=4)
        print(f"{mode}: with the route {with_route:.1f} ms, without {without:.1f} ms ({without / with_route:.2f}x); "
              f"saving per round: median {statistics.median(saving):.1f} ms, quartiles {quartiles[0]:.1f} .. "
              f"{quartiles[2]:.1f} ms")
    N, channels, size = 32, 32, 16
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(channels, channels, 3, 3, generator=gen)
    maps = (torch.randn(N, channels, size, size, generator=gen) > 0).float() / size**2
    for K in (1, 2, 3, 4, 6, 10):
        coeffs = torch.randn(K, N, channels, generator=gen)
        factors = coeffs[..., None, None] * maps

        def ours():
            split = bnas_fast.rank_one_split(factors)
            return bnas_fast.rank_one_conv_input_grad(*split, weight, (size, size), padding=1)

        def aten():
            return torch.nn.grad.conv2d_input((K * N, channels, size, size), weight, factors.flatten(0, 1), 1, 1)

        ours_ms, aten_ms = interleaved_medians_ms([ours, aten], repeat=31)
        print(f"last layer, {K} cotangents: split + input gradient {ours_ms:.2f} ms, ATen's transposed convolution "
              f"{aten_ms:.2f} ms ({aten_ms / ours_ms:.2f}x)")


if __name__ == "__main__":
    if "--breakdown" in sys.argv[1:]:
        breakdown()
    elif "--route" in sys.argv[1:]:
        route()
    elif "--floor" in sys.argv[1:]:
        floor()
    elif "--bound" in sys.argv[1:]:
        bound()
    else:
        main()
    if _malloc_label() == "default":
        sys.stdout.flush()
        # glibc reads these variables at start-up: measure again in a child that has them.
        sys.exit(subprocess.call([sys.executable, __file__] + sys.argv[1:], env={**os.environ, **NO_MMAP_ENV}))
