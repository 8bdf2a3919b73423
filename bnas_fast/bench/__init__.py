"""Benchmark harness shared by ``bnas-fast bench`` and the pytest-benchmark files in benchmarks/.

A benchmark *case* builds its inputs once and returns one zero-argument callable per *provider*:

* ``eager``: the pure-PyTorch reference from :mod:`bnas_fast.reference` (or the plain-PyTorch
  module a user would write);
* ``compile``: ``torch.compile`` of that same reference;
* ``bnas_fast``: the fused op or module.

Providers of a case are timed round-robin in one process (so drift and thermal state hit all of
them alike) and reported as medians. Throughput is the op's minimal memory traffic divided by the
median time, and is compared with the machine's copy bandwidth measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

__all__ = [
    "Case",
    "Result",
    "time_providers",
    "peak_memory_bytes",
    "copy_bandwidth_gbs",
    "format_table",
    "all_cases",
    "run_pytest_benchmark",
]

PROVIDERS = ("eager", "compile", "bnas_fast")


@dataclass
class Case:
    """One benchmark: ``build()`` returns {provider: callable}; ``bytes_moved`` is the op's minimal
    memory traffic (each input byte read once, each output byte written once), or 0 if not a
    bandwidth-bound op."""

    op: str
    shape: str
    mode: str  # "fwd" or "fwd+bwd"
    build: Callable[[], Dict[str, Callable[[], object]]]
    bytes_moved: int = 0
    slow: bool = False  # excluded from --quick

    @property
    def name(self) -> str:
        return f"{self.op}[{self.shape}|{self.mode}]"


@dataclass
class Result:
    case: Case
    median_ms: Dict[str, float] = field(default_factory=dict)

    def speedup(self, baseline: str) -> Optional[float]:
        if baseline not in self.median_ms or "bnas_fast" not in self.median_ms:
            return None
        return self.median_ms[baseline] / self.median_ms["bnas_fast"]

    def gbs(self) -> Optional[float]:
        if not self.case.bytes_moved or "bnas_fast" not in self.median_ms:
            return None
        return self.case.bytes_moved / (self.median_ms["bnas_fast"] * 1e-3) / 1e9


def time_providers(
    providers: Dict[str, Callable[[], object]], repeat: int = 15, warmup: int = 2, max_seconds: float = 20.0
) -> Dict[str, float]:
    """Median wall time in ms of each provider, timed round-robin after ``warmup`` calls each.

    Stops early (with at least 3 samples each) when a case would take more than ``max_seconds``.
    """
    for fn in providers.values():
        for _ in range(warmup):
            fn()
    samples: Dict[str, List[float]] = {name: [] for name in providers}
    start = time.perf_counter()
    for i in range(repeat):
        for name, fn in providers.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
        if i >= 2 and time.perf_counter() - start > max_seconds:
            break
    return {name: statistics.median(values) for name, values in samples.items()}


def peak_memory_bytes(fn: Callable[[], object], warmup: int = 1) -> int:
    """Peak bytes allocated by one call of ``fn`` on CPU, above what was allocated when it started.

    torch 2.13 has no CPU counterpart of ``torch.cuda.max_memory_allocated`` (``torch.cpu`` exposes
    no memory statistics), so this records the call under ``torch.profiler.profile(profile_memory=
    True)``: c10's CPU allocator then reports every allocation and free (``+nbytes`` / ``-nbytes``)
    as a ``[memory]`` event. The events are sorted by time and summed; the peak is the largest prefix
    sum (at least 0). It counts every tensor the call allocates through torch, in eager ops, in
    autograd and in torch.compile's generated code (including the returned tensors, and the saved
    activations that autograd frees), in every thread that reports to the profiler. Tensors that
    existed before the call are not counted, and neither is their release during the call (the
    profiler drops the free of a block it did not see allocated, with a c10 warning), so the result
    is the peak of the bytes that the call itself holds at once. Memory that does not go
    through torch's allocator (``std::vector`` scratch inside the C++ kernels: a few KiB per thread
    here; Python objects) is not seen. The count is exact, not sampled, so repeat calls agree.

    Rejected alternatives: ``resource.getrusage().ru_maxrss`` / ``VmHWM`` are process-lifetime
    high-water marks of resident pages, shifted by glibc's caching of freed blocks; ``tracemalloc``
    sees only Python's allocator.

    ``warmup`` calls run first, unrecorded, so that torch.compile's first-call compilation and
    one-off caches do not count.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result  # frees inside the recording: the peak already happened
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    running, peak = 0, 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def copy_bandwidth_gbs(num_bytes: int = 256 * 2**20, repeat: int = 15) -> float:
    """The machine's copy bandwidth: (bytes read + bytes written) / median time of ``dst.copy_(src)``
    into a preallocated destination (no page faults), with the current torch thread count."""
    src = torch.ones(num_bytes // 4)
    dst = torch.empty_like(src)
    ms = time_providers({"copy": lambda: dst.copy_(src)}, repeat=repeat)["copy"]
    return 2 * num_bytes / (ms * 1e-3) / 1e9


def format_table(results: List[Result], copy_gbs: float) -> str:
    """Markdown table: op, shape, mode, medians, speed-ups, GB/s and % of copy bandwidth."""
    header = (
        "| op | shape | mode | eager ms | compile ms | bnas_fast ms | vs eager | vs compile | GB/s | % copy bw |"
    )
    lines = [header, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def ms(r: Result, p: str) -> str:
        return f"{r.median_ms[p]:.2f}" if p in r.median_ms else "-"

    def ratio(x: Optional[float]) -> str:
        return f"{x:.2f}x" if x is not None else "-"

    for r in results:
        gbs = r.gbs()
        lines.append(
            f"| {r.case.op} | {r.case.shape} | {r.case.mode} | {ms(r, 'eager')} | {ms(r, 'compile')} | "
            f"{ms(r, 'bnas_fast')} | {ratio(r.speedup('eager'))} | {ratio(r.speedup('compile'))} | "
            + (f"{gbs:.1f} | {100 * gbs / copy_gbs:.0f}% |" if gbs is not None else "- | - |")
        )
    return "\n".join(lines)


def all_cases() -> List[Case]:
    """Every registered benchmark case, one module per op."""
    from bnas_fast.bench import arch_batch_norm, depth_loglik, gumbel_sigmoid_dropout, mix, nsa, oneshot, rank_one, unfolded_gram

    return (
        mix.cases() + depth_loglik.cases() + arch_batch_norm.cases() + nsa.cases() + gumbel_sigmoid_dropout.cases()
        + unfolded_gram.cases() + rank_one.cases() + oneshot.cases()
    )


def run_pytest_benchmark(benchmark, case: Case, provider: str) -> None:
    """Time one provider of ``case`` with pytest-benchmark (the files in benchmarks/ are thin
    parametrisations of this). Records the case's minimal traffic and the provider's peak memory in
    ``benchmark.extra_info``; skips a provider the case does not have."""
    import pytest

    providers = case.build()
    if provider not in providers:
        pytest.skip(f"{case.name} has no {provider} provider")
    fn = providers[provider]
    fn()  # warm-up (compiles the torch.compile provider)
    benchmark.extra_info["bytes_moved"] = case.bytes_moved
    benchmark.extra_info["peak_memory_bytes"] = peak_memory_bytes(fn, warmup=0)
    benchmark.pedantic(fn, rounds=7, iterations=1, warmup_rounds=1)
