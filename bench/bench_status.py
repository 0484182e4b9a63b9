"""`ptutils status` at scale, and how fast the command starts (issue 12).

Side by side in one run, each the wall time of the real command in a fresh process:

- `ptutils status` on 100 and on 10,000 sessions, on the local store and on an
  nx-27017 MongoDB stand-in (started here, file-backed). Every session carries a real
  run's statistics (a 200-step run: train loss and lr every step, two eval metrics every
  50 steps), written through `Store.write_statistics` as a worker writes them; most
  sessions are completed, some running (a live lease), some queued.
- `ptutils status --all --json` on the same stores (every row; not a goal).
- `ptutils status` on an empty MongoDB store vs an empty local store.
- `ptutils --help` vs `python -c pass` (what a command costs before it does anything).

Goals: status at 10,000 sessions <= 0.5 s local, <= 2 s on the stand-in; an empty
MongoDB store <= 2x the local one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.bench_store import nx_server, row
from bench.harness import Goal, compare, report
from ptutils.store import StatPoint, Store, new_session_doc, open_store

ROOT = Path(__file__).resolve().parents[1]
FULL = {"sizes": (100, 10_000), "steps": 200, "eval_every": 50, "repeat": 5}
QUICK = {"sizes": (100, 1_000), "steps": 200, "eval_every": 50, "repeat": 3}
WRITERS = 4
"""Threads that fill the MongoDB store (as several workers would)."""


def run_statistics(steps: int, eval_every: int, seed: int) -> list[StatPoint]:
    """The points a `steps`-step run logs: loss and lr every step, two eval metrics
    every `eval_every` steps (time: one step per 0.05 s)."""
    start = time.time() - steps * 0.05
    points = []
    for s in range(1, steps + 1):
        at = start + s * 0.05
        points.append(StatPoint("train", s, "loss", 2.3 * (0.99 ** s) + (seed % 7) * 1e-3, at))
        points.append(StatPoint("train", s, "lr", 0.1 * (0.5 ** (s // 100)), at))
        if s % eval_every == 0:
            points.append(StatPoint("eval", s, "test/accuracy", 1 - 0.9 * 0.98 ** s, at))
            points.append(StatPoint("eval", s, "test/loss", 2.0 * 0.98 ** s, at))
    return points


def add_session(store: Store, i: int, p: dict[str, Any]) -> None:
    """Session `i`: created, run through `p["steps"]` steps (statistics), and left
    completed (most), running with a live lease (every 50th) or queued (every 97th)."""
    config = {"session": {"total_steps": p["steps"], "chunk_steps": 50,
                          "eval_every": p["eval_every"]}}
    doc = store.create_session(new_session_doc(
        f"exp{i // 100:03d}-lr={0.1 / (1 + i % 100):.4g}", config, f"h{i}", p["steps"],
        tags=[f"batch{i // 1000}"], sweep=f"sweep{i // 100}"))
    if i % 97 == 0:
        return
    store.write_statistics(doc["_id"], run_statistics(p["steps"], p["eval_every"], i))
    if i % 50 == 0:
        update = {"status": "running", "step": p["steps"] // 2,
                  "lease": {"worker": f"w{i}-gpu0@node{i % 8}:1", "expires": time.time() + 1e6}}
    else:
        update = {"status": "completed", "step": p["steps"]}
    store.cas_session(doc["_id"], {"token": doc["token"]}, update)


def fill(url: str, first: int, last: int, p: dict[str, Any], threads: int = 1) -> None:
    """Add sessions first..last-1 to the store at `url`."""
    with open_store(url) as store:
        if threads == 1:
            for i in range(first, last):
                add_session(store, i, p)
            return
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda i: add_session(store, i, p), range(first, last)))


def command_env() -> dict[str, str]:
    """The environment of the commands measured. An installed ptutils has its .pyc files;
    a checkout run with PYTHONDONTWRITEBYTECODE=1 would compile every module of it at
    every start (~0.1 s), so that is unset (the checkout's __pycache__ is git-ignored)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PTUTILS_STORE", "FORCE_COLOR", "PYTHONDONTWRITEBYTECODE",
                        "PYTHONPYCACHEPREFIX")}
    return {**env, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}


def cli(*args: str) -> None:
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT,
                         env=command_env(), capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"ptutils {' '.join(args)} failed: {out.stderr[-2000:]}")


def status_at_sizes(stores: dict[str, tuple[str, int]], p: dict[str, Any]
                    ) -> tuple[list[dict[str, Any]], dict[tuple[str, int], float]]:
    """Median time of `status` (and `status --all --json`) per store at every size."""
    rows, medians = [], {}
    done = {name: 0 for name in stores}
    for size in p["sizes"]:
        for name, (url, threads) in stores.items():
            started = time.perf_counter()
            fill(url, done[name], size, p, threads)
            print(f"  {name}: {size} sessions ready ({time.perf_counter() - started:.0f} s "
                  "to add them)", flush=True)
            done[name] = size
        timings = compare({name: (lambda u=url: cli("status", "--store", u))
                           for name, (url, _) in stores.items()}, repeat=p["repeat"])
        full = compare({name: (lambda u=url: cli("status", "--all", "--json", "--store", u))
                        for name, (url, _) in stores.items()}, repeat=1, warmup=0)
        for name in stores:
            medians[(name, size)] = timings[name].median
            rows.append(row(f"status, {name}, {size} sessions (median)",
                            timings[name].median, "s"))
            rows.append(row(f"status --all --json, {name}, {size} sessions",
                            full[name].median, "s"))
    return rows, medians


def empty_and_startup(mongo: str, local: str, p: dict[str, Any]
                      ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    timings = compare({
        "status, empty local store": lambda: cli("status", "--store", local),
        "status, empty MongoDB store": lambda: cli("status", "--store", mongo),
        "ptutils --help": lambda: cli("--help"),
        "python -c pass": lambda: subprocess.run([sys.executable, "-c", "pass"], check=True,
                                                 env=command_env()),
    }, repeat=p["repeat"])
    rows = [row(f"{name} (median)", t.median, "s") for name, t in timings.items()]
    return rows, {name: t.median for name, t in timings.items()}


def run(quick: bool = False) -> dict[str, Any]:
    p = QUICK if quick else FULL
    big = p["sizes"][-1]
    with tempfile.TemporaryDirectory(prefix="bench-status-") as tmp, \
            nx_server(Path(tmp)) as uri:
        empty_rows, empty = empty_and_startup(f"{uri}/empty", str(Path(tmp) / "empty"), p)
        stores = {"local": (str(Path(tmp) / "runs"), 1), "mongo": (f"{uri}/bench", WRITERS)}
        size_rows, medians = status_at_sizes(stores, p)
    ratio = empty["status, empty MongoDB store"] / empty["status, empty local store"]
    rows = [*size_rows, *empty_rows,
            row("empty MongoDB / empty local", ratio, "x"),
            row("CLI start-up over python -c pass",
                empty["ptutils --help"] - empty["python -c pass"], "s")]
    goals = [
        Goal(f"status, {big} sessions, local (s)", medians[("local", big)], 0.5, "<="),
        Goal(f"status, {big} sessions, MongoDB stand-in (s)", medians[("mongo", big)], 2.0,
             "<="),
        Goal("status, empty MongoDB / empty local", ratio, 2.0, "<="),
    ]
    return report("status", rows, goals, params={**p, "sizes": list(p["sizes"])},
                  server="nx-27017 (file-backed, started by the benchmark)")


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
