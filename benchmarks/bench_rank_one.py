"""pytest-benchmark suite for the rank-one ops (rank_one_conv_input_grad, rank_one_split).

The cases (shapes, inputs, baselines) come from bnas_fast.bench.rank_one, which `bnas-fast bench`
runs too, so the two cannot drift. Run:

    python -m pytest benchmarks/bench_rank_one.py --benchmark-only --benchmark-group-by=param:case

Each case is timed once per provider (the reference, torch.compile of it, bnas_fast), in one
process, with 2 threads. The peak memory of each provider (one call, measured by
bnas_fast.bench.peak_memory_bytes) is stored in the benchmark's extra_info.
"""

import pytest

from bnas_fast.bench import rank_one as rank_one_cases
from bnas_fast.bench import run_pytest_benchmark

CASES = rank_one_cases.cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("provider", ["eager", "compile", "bnas_fast"])
def test_rank_one(benchmark, case, provider):
    run_pytest_benchmark(benchmark, case, provider)
