"""How `status` and `watch` draw session rows: one table that fits the terminal's width.

Names get the room first. A name too long for it is cut in the middle, keeping the part
that tells it apart: a sweep member keeps its values (`digits-…lr=0.1,batch_size=32`),
other names their common start cut away. Narrow terminals drop the worker and id
columns (`--json` has everything); errors go below the table, one line each. A
`devices` column appears when a session runs on more than one CPU slot or on GPUs
(`cpu×2`, `gpu0,1`), or waits for several (`2×`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ptutils.slots import describe_devices

COLORS = {"completed": "green", "failed": "red", "running": "cyan", "queued": "yellow",
          "waiting": "yellow", "preempted": "yellow", "lost": "red", "cancelled": "magenta",
          "paused": "blue"}

NAME_MIN = 16
"""Narrowest the name column gets before the other columns wrap instead."""

WORKER_FROM, ID_FROM = 100, 120
"""Terminal widths from which the worker and the id columns are shown."""

WORKER_MAX = 28
"""Widest a worker name is shown (without its domain and `:pid`; --json has it whole)."""

GAP = 2
"""Characters between two columns."""


def format_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def headline_name(row: dict[str, Any]) -> str | None:
    """The eval metric to show: an accuracy if there is one, else the first by name."""
    if not row["eval"]:
        return None
    names = sorted(row["eval"])
    return next((n for n in names if n.endswith("accuracy")), names[0])


def headline_metric(row: dict[str, Any], *, with_name: bool = True) -> str:
    """`test/accuracy=0.9583 @1500` (or without the name, when the header has it)."""
    name = headline_name(row)
    if name is None:
        return ""
    value = f"{row['eval'][name]:.4g} @{row['eval_step']}"
    return f"{name}={value}" if with_name else value


def shorten(name: str, width: int, keep: int = 0) -> str:
    """`name` cut in the middle to `width` characters, keeping its last `keep` ones when
    there is room for them and a character of its start."""
    if len(name) <= width:
        return name
    width = max(width, 3)
    tail = min(max(keep, (width - 1) // 2), width - 2)
    return name[: width - 1 - tail] + "…" + name[len(name) - tail :]


def short_worker(worker: str) -> str:
    """`NODE@HOST` of a lease holder `NODE@HOST.DOMAIN:PID`, cut to WORKER_MAX keeping
    the process part (`...-cpu0@host`)."""
    node, at, host = worker.rpartition(":")[0].partition("@") if "@" in worker else (
        worker, "", "")
    text = f"{node}{at}{host.split('.', 1)[0]}" if at else worker
    dash = node.rfind("-")
    return shorten(text, WORKER_MAX, len(text) - dash - 1 if at and dash >= 0 else 0)


def member_part(name: str) -> str:
    """What follows the base of a sweep member's name (`lr=0.1,bs=32` of
    `exp-lr=0.1,bs=32`): after the last '-' before the first '='."""
    eq = name.find("=")
    cut = name.rfind("-", 0, eq) if eq > 0 else -1
    return name[cut + 1 :] if cut >= 0 else ""


def _distinct_tail(name: str, others: Sequence[str]) -> str:
    """`name` after the start it shares with every one of `others`, cut back to a '-',
    ',' or '_' (so `run-a7` and `run-b2` keep `a7` and `b2`)."""
    prefix = os.path.commonprefix([name, *others])
    cut = max(prefix.rfind(c) for c in "-,_")
    return name[cut + 1 :]


def short_names(rows: Sequence[dict[str, Any]], width: int) -> list[str]:
    """Names cut to `width`, each keeping what tells it apart from the others when it
    can (`fitted_names` widens the cut until they are all distinct)."""
    names = [r["name"] for r in rows]
    plain = [n for n, r in zip(names, rows) if not r.get("sweep")]
    short = []
    for name, row in zip(names, rows):
        if row.get("sweep") and member_part(name):
            keep = member_part(name)
        else:
            others = [n for n in plain if n != name]
            keep = _distinct_tail(name, others) if others else ""
        short.append(shorten(name, width, len(keep)))
    return short


def _clip(text: str, width: int) -> str:
    """The first line of `text`, cut to `width` characters."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: max(1, width - 1)] + "…"


def devices_cell(row: dict[str, Any], *, ascii_only: bool = False) -> str:
    """`cpu×2` / `gpu0,1`: the slots a running session holds; `2×` for a session of
    world size 2 that does not run; "" for one that needs a single slot."""
    text = describe_devices(row.get("devices"))
    if not text and int(row.get("world_size") or 1) > 1:
        text = f"{row['world_size']}×"
    return text.replace("×", "x") if ascii_only else text


def _cells(rows: Sequence[dict[str, Any]], width: int, ascii_only: bool = False
           ) -> tuple[list[str], list[list[str]]]:
    """Headers and cell texts of every column but the name, for a terminal `width`."""
    metrics = {headline_name(r) for r in rows} - {None}
    one_metric = len(metrics) == 1
    headers = ["state", "step", "loss", metrics.pop() if one_metric else "last eval"]
    columns = [
        [r["state"] + ("*" if r["error"] else "") for r in rows],
        [f"{r['step']}/{r['total_steps']}" for r in rows],
        ["" if r["loss"] is None else f"{r['loss']:.4g}" for r in rows],
        [headline_metric(r, with_name=not one_metric) for r in rows],
    ]
    devices = [devices_cell(r, ascii_only=ascii_only) for r in rows]
    if any(d not in ("", "cpu") for d in devices):
        headers.insert(1, "devices")
        columns.insert(1, devices)
    if width >= WORKER_FROM:
        headers.append("worker")
        columns.append([short_worker(r["worker"] or "") for r in rows])
    if width >= ID_FROM:
        headers.append("id")
        columns.append([r["id"][:8] for r in rows])
    headers.append("age")
    columns.append([format_age(r["age"]) for r in rows])
    return headers, columns


def status_table(rows: Sequence[dict[str, Any]], width: int | None = None, *,
                 ascii_only: bool = False) -> Any:
    """A rich renderable of status rows that fits `width` (default: the terminal's);
    `ascii_only` draws the header rule with '-' (for logs and pipes)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    if width is None:
        from rich.console import Console

        width = Console().width
    headers, columns = _cells(rows, width, ascii_only)
    natural = [max([len(h), *map(len, col)]) for h, col in zip(headers, columns)]
    names = fitted_names(rows, width - GAP * len(headers) - sum(natural))
    rule = box.Box("    \n    \n -- \n    \n    \n    \n    \n    \n", ascii=True)
    table = Table(box=rule if ascii_only else box.SIMPLE_HEAD, show_edge=False,
                  pad_edge=False, padding=(0, 0, 0, GAP - 1))
    table.add_column("name", no_wrap=True, min_width=max(map(len, names), default=4))
    for header, size in zip(headers, natural):
        table.add_column(header, overflow="fold", min_width=min(size, len(header) + 1))
    for i, (row, name) in enumerate(zip(rows, names)):
        cells = [col[i] for col in columns]
        cells[0] = f"[{COLORS.get(row['state'], 'white')}]{cells[0]}[/]"
        table.add_row(Text(name), *cells)
    notes = [Text(_clip(f"* {n}: {r['error']}", width), no_wrap=True)
             for n, r in zip(names, rows) if r["error"]]
    return Group(table, *notes) if notes else table


def fitted_names(rows: Sequence[dict[str, Any]], room: int) -> list[str]:
    """Names cut to `room` (at least NAME_MIN), or as much wider as they need to stay
    distinct; whole names when they fit."""
    longest = max([4, *(len(r["name"]) for r in rows)])
    for size in range(max(NAME_MIN, min(room, longest)), longest + 1):
        names = short_names(rows, size)
        if len(set(names)) == len(names) and max(map(len, names), default=0) <= size:
            return names
    return [r["name"] for r in rows]
