"""Export commands of `ptutils`: `export` (weights as .pt or safetensors) and
`export-stats` (statistics to TensorBoard event files, CSV or Parquet).

Registered on the `ptutils` group like orchestrator/cluster_cli.py: torch, safetensors,
tensorboardX and pyarrow are imported only when a command runs. A missing optional
package is bad input (exit 2) with the extra to install named.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from orchestrator.cluster_cli import handle_errors, open_store_or_fail
from orchestrator.stats import MissingExtra

STORE_HELP = ("Where runs are stored: a folder (embedded store, default ./ptutils-runs) or a "
              "mongodb:// URL. Falls back to $PTUTILS_STORE.")

COLUMNS = ("session", "name", "phase", "step", "value", "time")
"""The columns of a CSV or Parquet export, in order."""


def store_option(fn: Any) -> Any:
    """Attach `--store` (envvar PTUTILS_STORE) to a command."""
    return click.option("--store", "store_url", envvar="PTUTILS_STORE", default=None,
                        metavar="PATH|URL", help=STORE_HELP)(fn)


def require(module: str, what: str) -> None:
    """MissingExtra naming the `export` extra, unless `module` imports."""
    try:
        __import__(module)
    except ImportError as exc:
        raise MissingExtra(
            f"{what} needs the {module} package, which is not installed here ({exc}). "
            "Install the export extra: pip install 'ptutils[export]'") from None


@click.command()
@click.argument("session")
@click.option("--step", type=int, default=None, help="Checkpoint step (default: the latest).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="File to write: FILE.safetensors, or a plain torch state_dict .pt.")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "pt"]), default=None,
              help="File format (default: safetensors for a .safetensors OUTPUT, else pt).")
@store_option
@handle_errors
def export(session: str, step: int | None, output: str, fmt: str | None,
           store_url: str | None) -> None:
    """Write SESSION's network weights (a name or an id) as a state_dict file.

    \b
    pt:          torch.load(FILE, weights_only=True)
    safetensors: safetensors.torch.load_file(FILE); the header metadata holds the
                 session, step and torch version. Tied weights are written once per name.
    """
    from ptutils.runner import export_state_dict
    from ptutils.weights import format_for

    if format_for(output, fmt) == "safetensors":
        require("safetensors", "--format safetensors")
    elif output.endswith(".safetensors"):
        raise click.BadParameter(
            f"{output} would be a torch pickle named .safetensors, which torch.load reads as "
            "safetensors (it goes by the suffix) and fails on; name it .pt, or drop --format "
            "pt", param_hint="--format")
    store = open_store_or_fail(store_url, create=False)
    ckpt = export_state_dict(store, session, step, output, fmt)
    click.echo(f"wrote {output} (step {ckpt['step']}, {format_for(output, fmt)})")


@click.command("export-stats")
@click.argument("sessions", nargs=-1, required=True)
@click.option("--tensorboard", "tb_dir", type=click.Path(file_okay=False), default=None,
              help="Write TensorBoard event files: one run folder DIR/SESSION_NAME per session, "
                   "tags PHASE/NAME (train/loss, eval/test/accuracy).")
@click.option("--csv", "csv_file", type=click.Path(dir_okay=False), default=None,
              help="Write a CSV file with columns " + ",".join(COLUMNS) + ".")
@click.option("--parquet", "parquet_file", type=click.Path(dir_okay=False), default=None,
              help="Write a Parquet file with the CSV's columns.")
@click.option("--phase", type=click.Choice(["train", "eval"]), default=None)
@click.option("--name", "names", multiple=True, help="Statistic names (default: all).")
@click.option("--force", is_flag=True,
              help="Replace the event files of a TensorBoard run folder that already has some.")
@store_option
@handle_errors
def export_stats(sessions: tuple[str, ...], tb_dir: str | None, csv_file: str | None,
                 parquet_file: str | None, phase: str | None, names: tuple[str, ...],
                 force: bool, store_url: str | None) -> None:
    """Statistics of SESSIONS (names or ids) to TensorBoard, CSV or Parquet.

    Every stored point is written: step is TensorBoard's global_step and the point's
    time its walltime. TensorBoard scalars are float32 (its format); CSV and Parquet
    keep the stored float64 values exactly.
    """
    if sum(x is not None for x in (tb_dir, csv_file, parquet_file)) != 1:
        raise click.UsageError("give exactly one of --tensorboard DIR, --csv FILE, "
                               "--parquet FILE")
    if tb_dir is not None:
        require("tensorboardX", "--tensorboard")
    if parquet_file is not None:
        require("pyarrow", "--parquet")
    store = open_store_or_fail(store_url, create=False)
    runs = collect(store, list(sessions), names=list(names), phase=phase)
    total = sum(len(points) for _, points in runs)
    if tb_dir is not None:
        write_tensorboard(runs, Path(tb_dir), force=force)
        where = tb_dir
    elif csv_file is not None:
        write_csv(runs, csv_file)
        where = csv_file
    else:
        write_parquet(runs, str(parquet_file))
        where = str(parquet_file)
    click.echo(f"wrote {total} points of {len(runs)} session(s) to {where}")


def collect(store: Any, refs: list[str], *, names: list[str], phase: str | None
            ) -> list[tuple[str, list[dict[str, Any]]]]:
    """[(session name, its points in the store's order)], one entry per session."""
    out = []
    for ref in refs:
        doc = store.get_session(ref)
        points = store.query_statistics(doc["_id"], phase=phase)
        out.append((doc["name"], [p for p in points if not names or p["name"] in names]))
    return out


def rows(runs: list[tuple[str, list[dict[str, Any]]]]) -> Iterator[tuple[Any, ...]]:
    """The export's rows, in COLUMNS order."""
    for session, points in runs:
        for p in points:
            yield (session, p["name"], p["phase"], int(p["step"]), float(p["value"]),
                   float(p["time"]))


def write_csv(runs: list[tuple[str, list[dict[str, Any]]]], path: str) -> None:
    """CSV with a header row; floats as Python's repr, which reads back exactly."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(rows(runs))
    os.replace(tmp, path)


def write_parquet(runs: list[tuple[str, list[dict[str, Any]]]], path: str) -> None:
    """Parquet: session, name, phase (string), step (int64), value, time (float64)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(zip(*rows(runs))) or [()] * len(COLUMNS)
    types = (pa.string(), pa.string(), pa.string(), pa.int64(), pa.float64(), pa.float64())
    table = pa.table({name: pa.array(list(col), type=t)
                      for name, col, t in zip(COLUMNS, columns, types)})
    tmp = f"{path}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_tensorboard(runs: list[tuple[str, list[dict[str, Any]]]], root: Path, *,
                      force: bool) -> None:
    """One run folder per session; refuses to add a second copy of a run's points."""
    from tensorboardX import SummaryWriter

    for session, _ in runs:
        old = sorted((root / session).glob("events.out.tfevents.*"))
        if old and not force:
            raise click.BadParameter(
                f"{root / session} already holds event files ({old[0].name}); TensorBoard "
                "would show their points twice. Use --force to replace them, or another DIR.",
                param_hint="--tensorboard")
    for session, points in runs:
        run_dir = root / session
        if force and run_dir.exists():
            for f in run_dir.glob("events.out.tfevents.*"):
                f.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        with _progress(len(points), session) as advance:
            writer = SummaryWriter(logdir=str(run_dir))
            try:
                for p in points:
                    writer.add_scalar(f"{p['phase']}/{p['name']}", float(p["value"]),
                                      global_step=int(p["step"]), walltime=float(p["time"]))
                    advance()
            finally:
                writer.close()


class _progress:
    """A rich progress bar on a terminal for exports of many points; silent otherwise."""

    MIN_POINTS = 5000

    def __init__(self, total: int, label: str) -> None:
        import sys

        self.enabled = total >= self.MIN_POINTS and sys.stderr.isatty()
        self.total, self.label, self.done = total, label, 0

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress

        self._bar = Progress(transient=True)
        self._bar.start()
        task = self._bar.add_task(f"export {self.label}", total=self.total)

        def advance() -> None:
            self.done += 1
            if self.done % 500 == 0 or self.done == self.total:
                self._bar.update(task, completed=self.done)

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._bar.stop()


COMMANDS = [export, export_stats]


def register(group: click.Group) -> None:
    """Add the export commands to the `ptutils` group."""
    for command in COMMANDS:
        group.add_command(command)
