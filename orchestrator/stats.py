"""`ptutils stats`: statistics as a table, JSON, or a PNG plot."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import click

from ptutils.store.base import Store


def collect(store: Store, refs: list[str], names: list[str], phase: str | None
            ) -> dict[str, dict[tuple[str, str], tuple[list[int], list[float]]]]:
    """{session name: {(phase, stat name): (steps, values)}}."""
    out: dict[str, dict[tuple[str, str], tuple[list[int], list[float]]]] = {}
    for ref in refs:
        doc = store.get_session(ref)
        series: dict[tuple[str, str], tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
        for p in store.query_statistics(doc["_id"], phase=phase):
            if names and p["name"] not in names:
                continue
            steps, values = series[(p["phase"], p["name"])]
            steps.append(p["step"])
            values.append(p["value"])
        out[doc["name"]] = dict(series)
    return out


def print_stats(store: Store, refs: list[str], *, names: list[str], phase: str | None,
                plot: str | None, as_json: bool) -> None:
    data = collect(store, refs, names, phase)
    if as_json:
        click.echo(json.dumps({s: {f"{ph}/{n}": {"steps": v[0], "values": v[1]}
                                   for (ph, n), v in series.items()}
                               for s, series in data.items()}))
        return
    if plot:
        write_plot(data, plot)
        click.echo(f"wrote {plot}")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("session", "phase", "name", "points", "first", "last", "min", "max")
    for sess, series in data.items():
        for (ph, name), (steps, values) in sorted(series.items()):
            table.add_row(sess, ph, name, str(len(values)), f"{values[0]:.4g} @ {steps[0]}",
                          f"{values[-1]:.4g} @ {steps[-1]}", f"{min(values):.4g}",
                          f"{max(values):.4g}")
    Console().print(table)


class MissingExtra(click.ClickException):
    """An optional dependency is not installed (bad input: exit 2)."""

    exit_code = 2


def require_plotting() -> None:
    """MissingExtra naming the extra to install, unless matplotlib imports."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise MissingExtra(
            f"--plot needs matplotlib, which is not installed here ({exc}). Install the "
            "plot extra: pip install 'ptutils[plot]' (or use --json, or the table)"
        ) from None


def write_plot(data: dict[str, Any], path: str) -> None:
    """One panel per statistic, one line per session."""
    require_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for series in data.values() for k in series if k[1] != "lr"})
    if not keys:
        raise click.ClickException("no statistics to plot")
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.6 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        for sess, series in data.items():
            if key in series:
                steps, values = series[key]
                ax.plot(steps, values, label=sess, marker="o" if key[0] == "eval" else None,
                        markersize=3)
        ax.set_title(f"{key[0]} {key[1]}")
        values = [v for series in data.values() if key in series for v in series[key][1]]
        if "loss" in key[1] and values and min(values) > 0 and max(values) / min(values) > 50:
            ax.set_yscale("log")  # a loss spanning decades reads better on a log axis
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(data) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
