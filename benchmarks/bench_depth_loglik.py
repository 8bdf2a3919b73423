"""pytest-benchmark suite for depth_loglik.

The cases (shapes, inputs, baselines) come from bnas_fast.bench.depth_loglik, which `bnas-fast bench`
runs too, so the two cannot drift. Run:

    python -m pytest benchmarks/bench_depth_loglik.py --benchmark-only --benchmark-group-by=param:case

Each case is timed once per provider (eager reference, torch.compile of the reference,
bnas_fast), in one process, with 2 threads. The peak memory of each provider (one call, measured
by bnas_fast.bench.peak_memory_bytes) is stored in the benchmark's extra_info.
"""

import pytest

from bnas_fast.bench import depth_loglik as depth_loglik_cases
from bnas_fast.bench import run_pytest_benchmark

CASES = depth_loglik_cases.cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("provider", ["eager", "compile", "bnas_fast"])
def test_depth_loglik(benchmark, case, provider):
    run_pytest_benchmark(benchmark, case, provider)
