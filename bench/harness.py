"""Small helpers the benchmarks share: timing, peak memory, and the report.

Each benchmark module (`bench/bench_*.py`) measures with `timeit`/`compare` and
`peak_extra_memory`, checks its goals, and calls `report`, which prints a table and
writes `bench/results/<name>.json` with the machine it ran on.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Timing:
    """Seconds per call over several runs."""

    best: float
    median: float
    runs: int


@dataclass(frozen=True)
class Goal:
    """A target a benchmark must meet: `measured` compared with `target` by `op`."""

    name: str
    measured: float
    target: float
    op: str = ">="

    @property
    def passed(self) -> bool:
        return self.measured >= self.target if self.op == ">=" else self.measured <= self.target


def _timing(samples: Sequence[float]) -> Timing:
    return Timing(min(samples), statistics.median(samples), len(samples))


def timeit(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1) -> Timing:
    """Best and median wall time of `fn()` over `repeat` runs, after `warmup` runs."""
    return compare({"fn": fn}, repeat=repeat, warmup=warmup)["fn"]


def compare(
    fns: dict[str, Callable[[], Any]], repeat: int = 5, warmup: int = 1
) -> dict[str, Timing]:
    """Time several functions side by side, interleaved round by round, so that a slow
    moment of a shared machine hits all of them rather than one."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeat):
        for name, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            result = fn()
            elapsed = time.perf_counter() - start
            del result
            if round_ >= warmup:
                samples[name].append(elapsed)
    return {name: _timing(values) for name, values in samples.items()}


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_extra_memory(fn: Callable[[], Any]) -> int:
    """Peak resident memory `fn()` adds on top of what the process held before, in bytes.

    Uses the kernel's high-water mark (reset through /proc/self/clear_refs) so that
    allocations outside Python (torch, numpy, msgpack) are counted; falls back to
    sampling RSS every millisecond where the reset is not allowed.
    """
    gc.collect()
    if _reset_peak():
        baseline = _status_kib("VmRSS")
        fn()
        return max(0, _status_kib("VmHWM") - baseline) * 1024
    return _sampled_peak(fn)


def _sampled_peak(fn: Callable[[], Any]) -> int:
    import psutil

    proc = psutil.Process()
    baseline = proc.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(0, max(peak, proc.memory_info().rss) - baseline)


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import numpy
    import torch

    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": numpy.__version__,
        "cuda": torch.cuda.is_available(),
    }


def report(
    name: str, rows: list[dict[str, Any]], goals: Sequence[Goal] = (), **extra: Any
) -> dict[str, Any]:
    """Print the rows and goals as tables and write bench/results/<name>.json."""
    result = {
        "name": name,
        "machine": machine_info(),
        "rows": rows,
        "goals": [{**asdict(g), "passed": g.passed} for g in goals],
        "passed": all(g.passed for g in goals),
        **extra,
    }
    _print(name, rows, goals)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def _print(name: str, rows: list[dict[str, Any]], goals: Sequence[Goal]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if rows:
        table = Table(title=f"bench {name}")
        for i, column in enumerate(rows[0]):
            table.add_column(column, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*(_cell(row.get(c)) for c in rows[0]))
        console.print(table)
    if goals:
        table = Table(title=f"goals {name}")
        for column in ("goal", "measured", "target", "result"):
            table.add_column(column, justify="right")
        for g in goals:
            verdict = "[green]pass[/green]" if g.passed else "[red]FAIL[/red]"
            table.add_row(g.name, f"{g.measured:.3g}", f"{g.op} {g.target:g}", verdict)
        console.print(table)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
