"""pytest-benchmark suite for mix and MixedOp.

The cases (shapes, inputs, baselines) come from bnas_fast.bench.mix, which `bnas-fast bench` runs
too, so the two cannot drift. Run:

    python -m pytest benchmarks/bench_mix.py --benchmark-only --benchmark-group-by=param:case

Each case is timed once per provider (eager reference, torch.compile of the reference,
bnas_fast), in one process, with 2 threads.
"""

import pytest

from bnas_fast.bench import mix as mix_cases
from bnas_fast.bench import run_pytest_benchmark

CASES = mix_cases.cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("provider", ["eager", "compile", "bnas_fast"])
def test_mix(benchmark, case, provider):
    run_pytest_benchmark(benchmark, case, provider)
