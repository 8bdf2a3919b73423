"""pytest-benchmark suite for gumbel_sigmoid_dropout.

The cases (shapes, inputs, baselines) come from bnas_fast.bench.gumbel_sigmoid_dropout, which
`bnas-fast bench` runs too, so the two cannot drift. Run:

    python -m pytest benchmarks/bench_gumbel_sigmoid_dropout.py --benchmark-only --benchmark-group-by=param:case

Each case is timed once per provider (eager concrete dropout in plain PyTorch, torch.compile of
that, bnas_fast), in one process, with 2 threads. The peak memory of each provider (one call,
measured by bnas_fast.bench.peak_memory_bytes) is stored in the benchmark's extra_info.
"""

import pytest

from bnas_fast.bench import gumbel_sigmoid_dropout as gumbel_sigmoid_dropout_cases
from bnas_fast.bench import run_pytest_benchmark

CASES = gumbel_sigmoid_dropout_cases.cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("provider", ["eager", "compile", "bnas_fast"])
def test_gumbel_sigmoid_dropout(benchmark, case, provider):
    run_pytest_benchmark(benchmark, case, provider)
