"""pytest-benchmark suite for mix and MixedOp.

The cases (shapes, inputs, baselines) come from bnas_fast.bench.mix, which `bnas-fast bench` runs
too, so the two cannot drift. Run:

    python -m pytest benchmarks/bench_mix.py --benchmark-only --benchmark-group-by=param:case

Each case is timed once per provider (eager reference, torch.compile of the reference,
bnas_fast), in one process, with 2 threads.
"""

import pytest

from bnas_fast.bench import mix as mix_cases

CASES = mix_cases.cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("provider", ["eager", "compile", "bnas_fast"])
def test_mix(benchmark, case, provider):
    providers = case.build()
    if provider not in providers:
        pytest.skip(f"{case.name} has no {provider} provider")
    fn = providers[provider]
    fn()  # warm-up (compiles the torch.compile provider)
    benchmark.extra_info["bytes_moved"] = case.bytes_moved
    benchmark.pedantic(fn, rounds=7, iterations=1, warmup_rounds=1)
