"""Run the benchmarks: `python -m bench [--quick] [NAME ...]`.

Every module `bench/bench_<name>.py` with a `run(quick: bool = False) -> dict` is a
benchmark; with no NAME all of them run. Exit status: 0 when every goal passed, 1 when
one failed, 2 for an unknown name.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import signal
import sys
from pathlib import Path


def discover() -> dict[str, str]:
    """Benchmark name -> module name, for every bench/bench_*.py."""
    here = str(Path(__file__).parent)
    return {
        info.name.removeprefix("bench_"): f"bench.{info.name}"
        for info in sorted(pkgutil.iter_modules([here]), key=lambda i: i.name)
        if info.name.startswith("bench_")
    }


def main(argv: list[str] | None = None) -> int:
    found = discover()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"one of: {', '.join(found)}")
    parser.add_argument("--quick", action="store_true", help="small sizes, fewer repeats")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in found]
    if unknown:
        parser.print_usage(sys.stderr)
        print(
            f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(found)}", file=sys.stderr
        )
        return 2
    # SIGTERM (`timeout`, a CI limit) unwinds like Ctrl-C: the servers a benchmark
    # started (nx-27017 in its own session) are stopped by their `finally`, not left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    passed = True
    for name in args.names or list(found):
        result = importlib.import_module(found[name]).run(quick=args.quick)
        passed = passed and bool(result.get("passed", True))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
