"""`ptutils watch`: the status table, refreshed until every shown session is finished.

On a terminal the table is redrawn in place (rich Live). Anywhere else (a pipe, a log
file, `kubectl logs`) it prints a timestamped table whenever a row changed, as plain
text with no control codes. Ctrl-C or SIGTERM ends the watch after the last table is
shown (exit 0); a second signal ends it at once.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from orchestrator.status import all_finished, status_rows
from orchestrator.table import status_table
from ptutils.store.base import Store

Rows = list[dict[str, Any]]


def watch_sessions(store: Store, refs: Sequence[str] = (), *, sweep: str | None = None,
                   every: float = 2.0, console: Any = None) -> None:
    """Show the rows of `refs` (or of every session, or a sweep's) until all finished."""
    from rich.console import Console

    console = console or Console()
    stop = threading.Event()
    previous = _stop_on_signals(stop)
    fetch = lambda: status_rows(store, refs, sweep=sweep)  # noqa: E731
    try:
        if console.is_terminal:
            _live(console, fetch, stop, every)
        else:
            _plain(console, fetch, stop, every)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _live(console: Any, fetch: Callable[[], Rows], stop: threading.Event,
          every: float) -> None:
    from rich.live import Live

    rows = fetch()
    with Live(status_table(rows, console.width), console=console, auto_refresh=False) as live:
        while not all_finished(rows) and not stop.wait(every):
            rows = fetch()
            live.update(status_table(rows, console.width), refresh=True)


def _plain(console: Any, fetch: Callable[[], Rows], stop: threading.Event,
           every: float) -> None:
    rows = fetch()
    shown = None
    while True:
        if _fingerprint(rows) != shown:
            _print_block(console, rows)
            shown = _fingerprint(rows)
        if all_finished(rows) or stop.wait(every):
            break
        rows = fetch()
    if stop.is_set():
        _print_block(console, rows, "stopped")


def _fingerprint(rows: Rows) -> list[tuple[Any, ...]]:
    """What a reader would see change (ages aside)."""
    return [(r["name"], r["state"], r["step"], r["loss"], r["eval_step"], r["worker"],
             r["error"]) for r in rows]


def _print_block(console: Any, rows: Rows, note: str = "") -> None:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in counts.items()) or "no sessions"
    console.print(f"--- {time.strftime('%H:%M:%S')}  {summary}" + (f" ({note})" if note else ""),
                  markup=False, highlight=False, soft_wrap=True)
    console.print(status_table(rows, console.width, ascii_only=True))
    console.file.flush()


def _stop_on_signals(stop: threading.Event) -> dict[int, Any]:
    """SIGINT/SIGTERM set `stop` (a second one interrupts); the handlers they replace."""

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    return previous
