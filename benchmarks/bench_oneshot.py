"""pytest-benchmark suite for the one-shot model (seed 004): a training step with ghost-batch path dropout, and candidate scoring.

The cases come from bnas_fast.bench.oneshot, which `bnas-fast bench` runs too, so the two cannot drift. Run:

    python -m pytest benchmarks/bench_oneshot.py --benchmark-only --benchmark-group-by=param:case
"""

import pytest

from bnas_fast.bench import oneshot as oneshot_cases
from bnas_fast.bench import run_pytest_benchmark

CASES = oneshot_cases.cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("provider", ["eager", "compile", "bnas_fast"])
def test_oneshot(benchmark, case, provider):
    run_pytest_benchmark(benchmark, case, provider)
