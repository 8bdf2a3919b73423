"""pytest-benchmark suite for one NSA-i / NSA-id training step, fused model against its plain-PyTorch twin.

The cases come from bnas_fast.bench.nsa, which `bnas-fast bench` runs too, so the two cannot drift. Run:

    python -m pytest benchmarks/bench_nsa.py --benchmark-only --benchmark-group-by=param:case
"""

import pytest

from bnas_fast.bench import nsa as nsa_cases
from bnas_fast.bench import run_pytest_benchmark

CASES = nsa_cases.cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("provider", ["eager", "compile", "bnas_fast"])
def test_nsa_train_step(benchmark, case, provider):
    run_pytest_benchmark(benchmark, case, provider)
