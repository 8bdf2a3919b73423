"""pytest-benchmark suite for unfolded_gram.

The cases (shapes, inputs, baselines) come from bnas_fast.bench.unfolded_gram, which
`bnas-fast bench` runs too, so the two cannot drift. Run:

    python -m pytest benchmarks/bench_unfolded_gram.py --benchmark-only --benchmark-group-by=param:case

Each case is timed once per provider (the unfold + einsum reference, torch.compile of it,
bnas_fast), in one process, with 2 threads. The peak memory of each provider (one call,
measured by bnas_fast.bench.peak_memory_bytes) is stored in the benchmark's extra_info.
"""

import pytest

from bnas_fast.bench import unfolded_gram as unfolded_gram_cases
from bnas_fast.bench import run_pytest_benchmark

CASES = unfolded_gram_cases.cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("provider", ["eager", "compile", "bnas_fast"])
def test_unfolded_gram(benchmark, case, provider):
    run_pytest_benchmark(benchmark, case, provider)
