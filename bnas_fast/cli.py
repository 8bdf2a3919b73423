"""The ``bnas-fast`` command.

    bnas-fast bench [--quick] [--filter TEXT] [--malloc default|no-mmap|both] [--json FILE]
    bnas-fast info
    bnas-fast run ldn [--seeds 0 1 2] [--max-depth D] [--out DIR] [--quick] ...   (run ldn --help)
    bnas-fast run nsa [--variant nsa|nsa_i|nsa_id] [--running-stats shared|per_arch] [--compare] ...
    bnas-fast run pgnas [--seeds 0 1 2] [--candidates C] [--epochs E] [--out DIR] [--quick] ...
    bnas-fast run bayesnas [--seeds 0 1] [--search-epochs E] [--threshold T] [--out DIR] [--quick] ...
    bnas-fast run oneshot [--seeds 0 1] [-N 200] [--r 0.1] [--ghost-batch-size 32] [--out DIR] [--quick] ...
    bnas-fast report ldn DIR [--json FILE]

``bench`` runs the benchmark suite (every case of bnas_fast.bench) with 2 threads and prints a
table: medians of the eager reference, torch.compile of the reference and bnas_fast, the speed-ups,
bnas_fast's throughput in GB/s and as a share of the machine's copy bandwidth measured in the same
run. ``--malloc both`` (the default) runs the suite twice: once as is, once in a child process with
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736``, so that a speed-up is more than avoided
page faults (glibc returns allocations of 32 MiB and more to the OS; large eager temporaries then
pay page faults on every call).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
from typing import List, Optional

NO_MMAP_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def _malloc_label() -> str:
    return "no-mmap" if all(os.environ.get(k) == v for k, v in NO_MMAP_ENV.items()) else "default"


def _run_bench(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    import bnas_fast
    from bnas_fast.bench import Result, all_cases, copy_bandwidth_gbs, format_table, time_providers

    torch.set_num_threads(args.threads)
    cases = [c for c in all_cases() if not (args.quick and c.slow)]
    if args.filter:
        cases = [c for c in cases if args.filter in c.name]
    if not cases:
        print(f"bnas-fast bench: no case matches --filter {args.filter!r}", file=sys.stderr)
        return 2
    copy_gbs = copy_bandwidth_gbs()
    results: List[Result] = []
    for case in tqdm(cases, desc=f"bench (malloc {_malloc_label()})", unit="case", file=sys.stderr):
        providers = case.build()
        results.append(Result(case, time_providers(providers, repeat=args.repeat)))
        del providers
    print(
        f"\n## malloc: {_malloc_label()} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
        f"backends {bnas_fast.backends()} | copy bandwidth {copy_gbs:.1f} GB/s | {platform.processor() or platform.machine()}\n"
    )
    print(format_table(results, copy_gbs))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "malloc": _malloc_label(),
                    "copy_gbs": copy_gbs,
                    "threads": torch.get_num_threads(),
                    "results": [
                        {"op": r.case.op, "shape": r.case.shape, "mode": r.case.mode, "median_ms": r.median_ms,
                         "bytes_moved": r.case.bytes_moved}
                        for r in results
                    ],
                },
                fh,
                indent=2,
            )
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.malloc == "both":
        code = _run_bench(args)
        if code:
            return code
        child = [sys.executable, "-m", "bnas_fast.cli", "bench", "--malloc", "no-mmap", "--threads", str(args.threads),
                 "--repeat", str(args.repeat)]
        if args.quick:
            child.append("--quick")
        if args.filter:
            child += ["--filter", args.filter]
        if args.json:
            root, ext = os.path.splitext(args.json)
            child += ["--json", f"{root}.no-mmap{ext or '.json'}"]
        sys.stdout.flush()
        return subprocess.call(child, env={**os.environ, **NO_MMAP_ENV})
    if args.malloc == "no-mmap" and _malloc_label() != "no-mmap":
        # glibc reads these variables at start-up: re-run in a child that has them.
        return subprocess.call([sys.executable, "-m", "bnas_fast.cli", *sys.argv[1:]], env={**os.environ, **NO_MMAP_ENV})
    return _run_bench(args)


def _info(args: argparse.Namespace) -> int:
    import torch

    import bnas_fast
    from bnas_fast import _backend

    print(f"bnas_fast {bnas_fast.__version__}, torch {torch.__version__}")
    print(f"backends: {bnas_fast.backends()}")
    if _backend.C_EXTENSION_ERROR:
        print(f"C++ extension not loaded: {_backend.C_EXTENSION_ERROR}")
    return 0


def _check_run_options(args: argparse.Namespace) -> Optional[str]:
    """What every method's options share, checked before any work starts (a bad --out would
    otherwise fail only when the results are written, after the whole run): seeds >= 0, subset
    sizes >= 1, finite numbers, and an output directory that can be created and written."""
    for name in ("seed", "seeds"):
        values = getattr(args, name, None)
        values = [values] if isinstance(values, int) else (values or [])
        if any(v < 0 for v in values):
            return f"--{name} must be >= 0, got {values if name == 'seeds' else values[0]}"
    for name in ("n_train", "n_val", "n_test"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be a positive int, got {value}"
    for name, value in sorted(vars(args).items()):
        if isinstance(value, float) and not math.isfinite(value):
            return f"--{name.replace('_', '-')} must be a finite number, got {value}"
    out = getattr(args, "out", None)
    if out:
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as error:
            return f"--out {out!r}: cannot create the directory ({error.strerror})"
        if not os.access(out, os.W_OK | os.X_OK):
            return f"--out {out!r}: the directory is not writable"
    return None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bnas-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="run the benchmark suite and print a table")
    bench.add_argument("--quick", action="store_true", help="skip the cases marked slow (mix at B=128, the one-shot model)")
    bench.add_argument("--filter", default="", help="only cases whose name contains this text")
    bench.add_argument("--malloc", choices=["default", "no-mmap", "both"], default="both",
                       help="glibc allocator settings to measure under (default: both, one after the other)")
    bench.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    bench.add_argument("--repeat", type=int, default=15, help="timed calls per provider (median reported)")
    bench.add_argument("--json", default="", help="also write the results to this JSON file")
    bench.set_defaults(func=_bench)

    info = sub.add_parser("info", help="print versions and which backend serves which device")
    info.set_defaults(func=_info)

    # `run <method>`: each method module owns its options (add_arguments) and its entry point (main).
    from bnas_fast.methods import bayesnas, ldn, nsa, oneshot, pgnas

    run = sub.add_parser("run", help="run a method's reference training loop (see `run ldn --help`)")
    methods = run.add_subparsers(dest="method", metavar="method", required=True)
    run_ldn = methods.add_parser("ldn", help="learnt-depth networks (seed 000): spirals or images")
    ldn.add_arguments(run_ldn)
    run_ldn.set_defaults(func=ldn.main)
    run_nsa = methods.add_parser("nsa", help="networks with stochastic architectures (seed 002): NSA, NSA-i, NSA-id")
    nsa.add_arguments(run_nsa)
    run_nsa.set_defaults(func=nsa.main)
    run_pgnas = methods.add_parser("pgnas", help="posterior-guided NAS (seed 001): learned drop rates, guided vs random candidates")
    pgnas.add_arguments(run_pgnas)
    run_pgnas.set_defaults(func=pgnas.main)
    run_bayesnas = methods.add_parser("bayesnas", help="BayesNAS (seed 003): switch Hessians, Laplace updates, pruned cells vs random")
    bayesnas.add_arguments(run_bayesnas)
    run_bayesnas.set_defaults(func=bayesnas.main)
    run_oneshot = methods.add_parser("oneshot", help="one-shot search (seed 004): path dropout, ghost batches, one-shot vs stand-alone ranks")
    oneshot.add_arguments(run_oneshot)
    run_oneshot.set_defaults(func=oneshot.main)

    report = sub.add_parser("report", help="tabulate a method's runs (see `report ldn --help`)")
    reports = report.add_subparsers(dest="method", metavar="method", required=True)
    report_ldn = reports.add_parser(
        "ldn", help="learnt-depth runs under a directory, grouped by dataset and D, as a markdown table"
    )
    report_ldn.add_argument("root", help="the --out directory of `bnas-fast run ldn`")
    report_ldn.add_argument("--json", default="", help="also write the table's data to this JSON file")
    report_ldn.set_defaults(func=ldn.report_main)

    args = parser.parse_args(argv)
    method = getattr(args, "method", None)
    problem = _check_run_options(args) if args.command == "run" else None
    if args.command == "report" and not os.path.isdir(args.root):
        problem = f"root {args.root!r} is not a directory"
    if problem:
        parser.exit(2, f"bnas-fast {args.command} {method}: error: {problem}\n")
    try:
        return args.func(args)
    except FileNotFoundError as error:
        if args.command != "report":
            raise
        parser.exit(2, f"bnas-fast report {method}: error: {error}\n")
    except (ValueError, TypeError, IndexError) as error:
        # A method's checks of its own options start their message with the method's name: show
        # those as usage errors (one line, exit status 2, as argparse does). Anything else is a bug
        # or a library error and keeps its traceback.
        if method is None or not str(error).startswith(f"{method}:"):
            raise
        parser.exit(2, f"bnas-fast {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
