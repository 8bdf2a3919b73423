"""The installed package: which backends serve which device, and how the fallback behaves."""

import os
import subprocess
import sys

import pytest
import torch

import bnas_fast
from bnas_fast import _backend


def test_cpu_backend_is_the_cpp_extension():
    # A silently failed build would let every parity test pass against the reference itself.
    if _backend.forced_backend() == "reference":
        pytest.skip("BNAS_FAST_BACKEND=reference forces the reference")
    assert bnas_fast.backends()["cpu"] == "cpp", _backend.C_EXTENSION_ERROR


def test_forced_reference_backend_runs_and_matches():
    code = (
        "import torch, bnas_fast\n"
        "assert bnas_fast.backends() == {'cpu': 'reference', 'cuda': 'reference'}, bnas_fast.backends()\n"
        "ys = [torch.randn(3, 4, dtype=torch.float64) for _ in range(2)]\n"
        "w = torch.tensor([[1.0, 0.0], [0.5, 2.0], [0.0, 0.0]], dtype=torch.float64)\n"
        "out = bnas_fast.mix(ys, w)\n"
        "assert torch.allclose(out, w[:, :1] * ys[0] + w[:, 1:] * ys[1])\n"
        "try:\n"
        "    bnas_fast.mix(ys, torch.full((3, 2), float('nan'), dtype=torch.float64))\n"
        "except ValueError as e:\n"
        "    assert 'weights' in str(e)\n"
        "else:\n"
        "    raise SystemExit('NaN weights accepted')\n"
    )
    env = {**os.environ, "BNAS_FAST_BACKEND": "reference"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_unknown_forced_backend_is_a_clear_error():
    env = {**os.environ, "BNAS_FAST_BACKEND": "cuda-please"}
    result = subprocess.run([sys.executable, "-c", "import bnas_fast"], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "BNAS_FAST_BACKEND" in result.stderr and "reference" in result.stderr


def test_cli_info_and_bench_filter(capsys):
    from bnas_fast.cli import main

    assert main(["info"]) == 0
    assert "backends" in capsys.readouterr().out
    assert main(["bench", "--filter", "no such case", "--malloc", "default"]) == 2


def test_public_api():
    assert bnas_fast.mix is bnas_fast.functional.mix
    assert bnas_fast.mix_sparse is bnas_fast.functional.mix_sparse
    assert isinstance(bnas_fast.nn.MixedOp([torch.nn.Identity()]), torch.nn.Module)


def test_bench_harness_table_and_throughput():
    from bnas_fast.bench import Case, Result, format_table, time_providers

    calls = {"eager": 0, "bnas_fast": 0}

    def provider(name):
        def fn():
            calls[name] += 1

        return fn

    case = Case(op="toy", shape="n=1", mode="fwd", build=lambda: {n: provider(n) for n in calls}, bytes_moved=10**9)
    medians = time_providers(case.build(), repeat=3, warmup=1)
    assert calls == {"eager": 4, "bnas_fast": 4}  # warm-up plus round-robin repeats
    result = Result(case, {"eager": 4.0, "bnas_fast": 2.0})
    assert result.speedup("eager") == 2.0 and result.speedup("compile") is None
    assert result.gbs() == pytest.approx(500.0)  # 1 GB in 2 ms
    table = format_table([result], copy_gbs=1000.0)
    assert "| toy | n=1 | fwd | 4.00 | - | 2.00 | 2.00x | - | 500.0 | 50% |" in table
    assert set(medians) == {"eager", "bnas_fast"}


def test_readme_python_example_runs():
    # The README's usage example is the first ```python block; it must run as written.
    readme = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
    with open(readme) as fh:
        text = fh.read()
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["y"].shape == (8, 4, 16, 16)


def _flag_calls():
    """(name, call taking the flag's value) for every public bool flag of the ops and modules."""
    x4 = torch.randn(4, 3, 5, 5)
    arch = torch.zeros(4, dtype=torch.long)
    logit = torch.zeros(3)
    factors = torch.randn(4, 2, 3, 5, 5)
    return [
        ("training", lambda v: bnas_fast.gumbel_sigmoid_dropout(x4, logit, temperature=0.5, granularity="channel", training=v)),
        ("training", lambda v: bnas_fast.arch_batch_norm(x4, arch, running_mean=torch.zeros(3), running_var=torch.ones(3), training=v)),
        ("bias", lambda v: bnas_fast.unfolded_gram(x4, factors, 3, padding=1, bias=v)),
        ("diagonal", lambda v: bnas_fast.unfolded_gram(x4, factors, 3, padding=1, diagonal=v)),
        ("sparse", lambda v: bnas_fast.nn.MixedOp([torch.nn.Identity()], sparse=v)),
        ("relu", lambda v: bnas_fast.mix([x4, x4], torch.ones(4, 2), relu=v)),
    ]


@pytest.mark.parametrize("index", range(6))
def test_bool_flags_must_be_bools(index):
    """0, 1, "False" and None are not flags: each raises a TypeError naming the argument (a string
    "False" would otherwise switch the flag on), while True and False both work."""
    name, call = _flag_calls()[index]
    for value in (True, False):
        call(value)
    for value in (0, 1, "False", None):
        with pytest.raises(TypeError, match=rf"{name} must be a bool"):
            call(value)


@pytest.mark.parametrize("argv, message", [
    (["run", "nsa", "--quick", "--seed", "-1"], "--seed must be >= 0"),
    (["run", "pgnas", "--quick", "--seeds", "0", "-1"], r"--seeds must be >= 0, got \[0, -1\]"),
    (["run", "ldn", "--quick", "--n-train", "0"], "--n-train must be a positive int"),
    (["run", "oneshot", "--quick", "--n-test", "-5"], "--n-test must be a positive int"),
    (["run", "ldn", "--quick", "--lr", "inf"], "--lr must be a finite number"),
    (["run", "bayesnas", "--quick", "--out", "/proc/no/such/dir"], "--out '/proc/no/such/dir': cannot create"),
    (["report", "ldn", "/no/such/dir"], "root '/no/such/dir' is not a directory"),
])
def test_run_options_are_checked_before_any_work(argv, message, capsys):
    """Options every method shares fail at once with a usage error naming them (exit status 2),
    not with a traceback after the run (a bad --out used to fail only when the results were written)."""
    from bnas_fast import cli

    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    import re
    assert re.search(message, capsys.readouterr().err)


def test_results_json_is_strict_json(tmp_path):
    """NaN (a Spearman correlation of tied accuracies, say) is written as null: a bare NaN is not JSON."""
    import json

    from bnas_fast.methods._config import write_json

    write_json(str(tmp_path / "r.json"), {"rho": float("nan"), "rows": [1.0, float("inf")], "ok": 2})
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text) == {"rho": None, "rows": [1.0, None], "ok": 2} and "NaN" not in text
