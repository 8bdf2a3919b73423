"""pytest-benchmark suite for arch_batch_norm.

The cases (shapes, inputs, baselines) come from bnas_fast.bench.arch_batch_norm, which `bnas-fast bench`
runs too, so the two cannot drift. Run:

    python -m pytest benchmarks/bench_arch_batch_norm.py --benchmark-only --benchmark-group-by=param:case

Each case is timed once per provider (eager F.batch_norm plus gathered affine, torch.compile of
that, bnas_fast), in one process, with 2 threads. The peak memory of each provider (one call, measured
by bnas_fast.bench.peak_memory_bytes) is stored in the benchmark's extra_info.
"""

import pytest

from bnas_fast.bench import arch_batch_norm as arch_batch_norm_cases
from bnas_fast.bench import run_pytest_benchmark

CASES = arch_batch_norm_cases.cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("provider", ["eager", "compile", "bnas_fast"])
def test_arch_batch_norm(benchmark, case, provider):
    run_pytest_benchmark(benchmark, case, provider)
