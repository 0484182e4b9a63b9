"""Cluster commands of `ptutils`: worker, submit, status, watch, cancel, pause, resume,
requeue, reconcile.

Exit codes are those of orchestrator/cli.py: 0 success; 1 failed; 2 bad input (nothing
was stored or queued); 3 the store or the broker could not be reached.

orchestrator/cli.py imports this module at its end to `register` the commands; so this
module reaches back into cli.py only when a command runs (under `python -m
orchestrator.cli` the group lives in `__main__`, and a top-level import of
orchestrator.cli from here would run cli.py a second time, half way through).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from orchestrator.status import DEFAULT_LIMIT, STATES
from orchestrator.trust import allow_imports_option, trust_session_code_option

STORE_HELP = ("Where runs are stored: a mongodb:// URL (or a folder, for workers on one "
              "machine). Falls back to $PTUTILS_STORE.")

BROKER_HELP = ("Celery broker URL: redis://HOST:6379/0 (default redis://127.0.0.1:6379/0) or "
               "amqp://USER:PASS@HOST:5672// for RabbitMQ. Falls back to $PTUTILS_BROKER.")


def broker_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Attach `--broker` (envvar PTUTILS_BROKER) to a command."""
    return click.option("--broker", "broker_url", envvar="PTUTILS_BROKER", default=None,
                        metavar="URL", help=BROKER_HELP)(fn)


def store_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Attach `--store` (envvar PTUTILS_STORE) to a command."""
    return click.option("--store", "store_url", envvar="PTUTILS_STORE", default=None,
                        metavar="URL|PATH", help=STORE_HELP)(fn)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """orchestrator.cli.handle_errors (clear message, documented exit code), bound late."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from orchestrator.cli import handle_errors as handle

        return handle(fn)(*args, **kwargs)

    return wrapper


def open_store_or_fail(url: str | None, *, create: bool = True) -> Any:
    """orchestrator.cli.open_store_or_fail, bound late."""
    from orchestrator.cli import open_store_or_fail as open_or_fail

    return open_or_fail(url, create=create)


def _app(broker_url: str | None) -> Any:
    from workers.app import make_app

    return make_app(broker_url)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@click.command()
@click.option("--queues", "-Q", default="train,eval,save", show_default=True,
              help="Queues to take tasks from (comma separated). A machine for evals only: "
                   "-Q eval.")
@click.option("--gpus", default="all", show_default=True, metavar="all|none|0,1,...",
              help="One worker process per GPU, pinned with CUDA_VISIBLE_DEVICES; `none` (or "
                   "no GPU found) runs --concurrency CPU workers.")
@click.option("--concurrency", "-c", default=None, type=click.IntRange(1),
              help="Worker processes per GPU (default 1), or in all on a CPU-only machine "
                   "(default: --slots).")
@click.option("--slots", default=None, type=click.IntRange(1), metavar="N",
              help="CPU slots this node offers to sessions (a session of world_size N takes "
                   "N; default: one per process). On GPUs the slots are the GPUs. The node "
                   "takes sessions of every size up to its slot count (queues train, "
                   "train-x2, ...).")
@click.option("--slots-dir", default=None, envvar="PTUTILS_SLOTS_DIR", metavar="DIR",
              help="Where the node's slot file lives, shared by every `ptutils worker` on "
                   "this machine (default: $TMPDIR/ptutils-slots-UID).")
@click.option("--name", default=None, metavar="NAME",
              help="Worker name prefix; processes are NAME-gpu0@HOST, NAME-cpu0@HOST, ... "
                   "(default ptutils-PID: each `ptutils worker` on a host has its own names).")
@broker_option
@store_option
@click.option("--grace", default=30.0, show_default=True, type=click.FloatRange(0),
              help="Seconds a SIGTERMed worker has to checkpoint its chunk and exit.")
@click.option("--lease-ttl", default=60.0, show_default=True, type=click.FloatRange(0.5),
              help="Seconds a session's lease lives without a heartbeat (renewed every "
                   "TTL/3). A dead worker's session continues elsewhere after about this long.")
@click.option("--reconcile-every", default=5.0, show_default=True, type=click.FloatRange(0),
              help="Run the reconcile loop in this worker's first process every SECONDS "
                   "(0: off, when `ptutils reconcile` or celery beat runs elsewhere).")
@click.option("--stall-after", default=None, type=click.FloatRange(0), metavar="SECONDS",
              help="Reconcile: requeue a session with no lease and no progress for this long "
                   "(default 15).")
@click.option("--loglevel", "-l", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--events", "-E", is_flag=True, help="Send task events (for Flower).")
@click.option("--metrics-port", default=0, envvar="PTUTILS_METRICS_PORT", show_envvar=True,
              type=click.IntRange(0, 65535), metavar="PORT",
              help="Serve Prometheus metrics on http://0.0.0.0:PORT/metrics (0: off).")
@allow_imports_option(apply=False)
@trust_session_code_option
@handle_errors
def worker(queues: str, gpus: str, concurrency: int | None, slots: int | None,
           slots_dir: str | None, name: str | None, broker_url: str | None,
           store_url: str | None, grace: float, lease_ttl: float, reconcile_every: float,
           stall_after: float | None, loglevel: str, events: bool,
           allow_imports: tuple[str, ...], trust_session_code: bool,
           metrics_port: int) -> None:
    """Run Celery workers for Train/Eval/Save tasks until SIGTERM.

    \b
    SIGTERM (or Ctrl-C) is a preemption: each worker stops its chunk at the next step,
    checkpoints it, requeues the continuation and exits within --grace seconds. Send it
    again to exit at once. A worker that dies is restarted; its session continues from
    its last checkpoint after its lease (--lease-ttl) expires.
    """
    from workers.launcher import WorkerOptions, node_gpus, parse_gpus, plan_slots, run_workers

    try:
        parse_gpus(gpus)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--gpus") from exc
    if name is not None and (not name or "@" in name):
        raise click.BadParameter("a name without '@'", param_hint="--name")
    opts = WorkerOptions(
        queues=_csv(queues), gpus=gpus, concurrency=concurrency, slots=slots,
        slots_dir=slots_dir, name=name, broker=broker_url, store=store_url, grace=grace, lease_ttl=lease_ttl,
        reconcile_every=reconcile_every, stall_after=stall_after, loglevel=loglevel,
        events=events, allow_imports=allow_imports, trust_session_code=trust_session_code,
        metrics_port=metrics_port,
    )
    try:
        plan_slots(opts, node_gpus(opts))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--slots") from exc
    sys.exit(run_workers(opts))


@click.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value (repeatable), as for `ptutils run`.")
@click.option("--sweep", "sweeps", multiple=True, metavar="KEY=V1,V2,...",
              help="Submit one session per value (repeatable: the grid of all sweeps), "
                   "grouped by a sweep id.")
@click.option("--queue", default="train", show_default=True,
              help="Queue of the session's Train tasks (workers started with -Q QUEUE); a "
                   "session of world_size N > 1 goes to QUEUE-xN.")
@click.option("--priority", default=5, show_default=True, type=click.IntRange(0, 9),
              help="0..9, higher runs sooner.")
@click.option("--name", default=None,
              help="Session name (default: the config's `name:` or the file name); a sweep "
                   "appends its values.")
@click.option("--tag", "tags", multiple=True, help="Tag the sessions (repeatable).")
@store_option
@broker_option
@click.option("--json", "as_json", is_flag=True, help="Print the sessions as JSON.")
@allow_imports_option(apply=True, extra_help=" Checked here; each worker needs it too.")
@handle_errors
def submit(config: str, overrides: tuple[str, ...], sweeps: tuple[str, ...], queue: str,
           priority: int, name: str | None, tags: tuple[str, ...], store_url: str | None,
           broker_url: str | None, as_json: bool) -> None:
    """Validate CONFIG (built dry on CPU), store its session(s) and queue them.

    Nothing is stored or queued if any config of the submit fails to build (exit 2) or the
    broker cannot be reached (exit 3).
    """
    from orchestrator.submit import prepare
    from orchestrator.submit import submit as do_submit

    if not os.path.exists(config):
        raise click.BadParameter(f"no such file: {config} (from {os.getcwd()})",
                                 param_hint="CONFIG")
    prepared = prepare(config, overrides, sweeps, name)
    store = open_store_or_fail(store_url)
    done = do_submit(store, _app(broker_url), prepared, queue=queue, priority=priority,
                     tags=tags)
    if as_json:
        click.echo(json.dumps([d.to_dict() for d in done]))
        return
    for d in done:
        click.echo(f"{d.session}  {d.name}")
    if done and done[0].sweep:
        queues = ", ".join(dict.fromkeys(d.queue for d in done))
        click.echo(f"sweep {done[0].sweep}: {len(done)} sessions queued on {queues}")


@click.command()
@click.argument("sessions", nargs=-1)
@click.option("--status", "status_filter", default=None, type=click.Choice(STATES),
              help="Only sessions in this state (the state shown, see above).")
@click.option("--name", "name_prefix", default=None, metavar="PREFIX",
              help="Only sessions whose name starts with PREFIX.")
@click.option("--tag", "tags", multiple=True, help="Only sessions with this tag (repeatable).")
@click.option("--sweep", default=None, help="Only the sessions of this sweep id.")
@click.option("--search", default=None, metavar="NAME", help="Only the sessions of this search.")
@click.option("--since", default=None, metavar="AGE|DATE",
              help="Only sessions updated since: an age (30m, 2h, 7d) or an ISO date/time "
                   "(UTC unless it says otherwise).")
@click.option("--limit", default=DEFAULT_LIMIT, show_default=True, type=click.IntRange(1),
              help="Sessions per page.")
@click.option("--page", default=1, show_default=True, type=click.IntRange(1),
              help="Page 2, 3, ...: the next --limit older sessions.")
@click.option("--all", "show_all", is_flag=True, help="Every matching session, oldest first.")
@click.option("--sort", default="created", show_default=True,
              type=click.Choice(["created", "updated"]),
              help="Which time decides `newest`.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the rows as one JSON array, streamed row by row.")
@store_option
@handle_errors
def status(sessions: tuple[str, ...], status_filter: str | None, name_prefix: str | None,
           tags: tuple[str, ...], sweep: str | None, search: str | None, since: str | None,
           limit: int, page: int, show_all: bool, sort: str, as_json: bool,
           store_url: str | None) -> None:
    """Sessions with state, step/total, last loss, last eval metric, worker and age.

    SESSIONS are names or ids. Without them: the active sessions (queued, running) and
    then the newest, --limit in all (default 50), shown oldest first; --page 2 for the
    next older ones, --all for every session. Filters (--name, --tag, --sweep,
    --search, --since, --status) run in the store, on indexed fields; a line below the
    table says when more sessions match than are shown.

    \b
    States: running (a worker holds its lease), queued, waiting (its next chunk
    waits for an Eval), preempted (stopped at a preemption checkpoint, continuation
    queued), lost (its worker's lease expired; reconcile requeues it), paused
    (`ptutils pause`: `ptutils resume NAME`; `ptutils run` stopped by Ctrl-C:
    `ptutils run --resume NAME`), completed, failed, cancelled. --json has both
    `state` and the stored `status`; it prints one JSON array, written as the rows are
    read (no summary line).
    A folder --store that holds no store is not created: "no sessions".
    """
    from orchestrator.status import Listing, parse_since, session_row
    from ptutils.store.base import SessionQuery

    store = _open_for_reading(store_url, sessions, as_json)
    if store is None:
        return
    if sessions:
        now = store.now()
        rows: Any = (session_row(store, store.get_session(ref), now) for ref in sessions)
        if status_filter:
            rows = (r for r in rows if r["state"] == status_filter)
        listing, more = None, False
    else:
        try:
            after = None if since is None else parse_since(since, store.now())
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--since") from None
        query = SessionQuery(name=name_prefix, tags=tags, sweep=sweep, search=search,
                             since=after)
        listing = Listing(query, state=status_filter, limit=None if show_all else limit,
                          page=page, sort=sort)
        if show_all:
            rows, more = listing.rows(store), False
        else:
            docs, more = listing.page_of(store)
            rows = listing.rows(store, docs)
    if as_json:
        _stream_json(rows)
    else:
        _print_table(list(rows), listing, more)
    from orchestrator.cli import exit_after_reading

    exit_after_reading(store)


def _stream_json(rows: Any) -> None:
    """One JSON array, a row per line, each written as soon as it is made."""
    out, count = sys.stdout, 0
    out.write("[")
    for row in rows:
        out.write(("," if count else "") + "\n" + json.dumps(row))
        out.flush()
        count += 1
    out.write("\n]\n" if count else "]\n")


def _print_table(rows: list[dict[str, Any]], listing: Any, more: bool) -> None:
    from rich.console import Console

    from orchestrator.table import status_table

    console = Console()
    console.print(status_table(rows, console.width))
    if listing is None or not (more or listing.page > 1):
        return
    what = "the active and newest" if listing.page == 1 else f"page {listing.page}:"
    hint = f"; --page {listing.page + 1} for older ones, --all for every one" if more else ""
    console.print(f"{what} {len(rows)} sessions shown{hint}", markup=False,
                  highlight=False, soft_wrap=True)


def _open_for_reading(store_url: str | None, sessions: tuple[str, ...], as_json: bool) -> Any:
    """The store, or None (after saying so) when a folder store does not exist and no
    session was named: listing nothing is not an error. A named session is (exit 2)."""
    from ptutils.errors import SessionNotFound

    try:
        return open_store_or_fail(store_url, create=False)
    except SessionNotFound as exc:
        if sessions:
            raise
        click.echo("[]" if as_json else str(exc))
        return None


@click.command()
@click.argument("sessions", nargs=-1)
@click.option("--sweep", default=None, help="Only the sessions of this sweep id.")
@click.option("--every", default=2.0, show_default=True, type=click.FloatRange(0.2),
              help="Seconds between refreshes.")
@store_option
@handle_errors
def watch(sessions: tuple[str, ...], sweep: str | None, every: float,
          store_url: str | None) -> None:
    """The status table, refreshed until every shown session is finished.

    \b
    On a terminal the table is redrawn in place. Otherwise (a pipe, a log file) a
    timestamped table is printed whenever a row changed, with no control codes.
    Ctrl-C or SIGTERM prints the last table and exits 0.
    """
    from orchestrator.watch import watch_sessions

    store = _open_for_reading(store_url, sessions, False)
    if store is not None:
        watch_sessions(store, sessions, sweep=sweep, every=every)


@click.command()
@click.argument("sessions", nargs=-1, required=True)
@store_option
@handle_errors
def cancel(sessions: tuple[str, ...], store_url: str | None) -> None:
    """Cancel SESSIONS (names or ids): queued tasks are dropped, a running chunk stops.

    The running chunk stops at its worker's next lease renewal (within a third of the
    lease TTL) and its work since the last checkpoint is discarded. A finished session
    stays as it is. Exit 2 if a session is unknown (the others are cancelled).
    """
    from orchestrator.status import cancel as do_cancel

    store = open_store_or_fail(store_url, create=False)
    _act_on_each(sessions, lambda ref: do_cancel(store, ref))


def _act_on_each(sessions: tuple[str, ...], action: Callable[[str], dict[str, Any]]) -> None:
    """Run `action` on each session, printing its new state; a refused or unknown one is
    reported and the others go on (exit 2 at the end: nothing was done to it)."""
    from orchestrator.actions import ActionRefused
    from ptutils.errors import SessionNotFound

    refused = 0
    for ref in sessions:
        try:
            doc = action(ref)
        except (ActionRefused, SessionNotFound) as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            refused += 1
            continue
        click.echo(f"{doc['name']}: {doc['status']} (step {doc['step']}/{doc['total_steps']})")
    if refused:
        sys.exit(2)


@click.command()
@click.argument("sessions", nargs=-1, required=True)
@store_option
@handle_errors
def pause(sessions: tuple[str, ...], store_url: str | None) -> None:
    """Pause SESSIONS (names or ids) on the cluster; `ptutils resume` continues them.

    \b
    A queued or running session becomes paused: its queued messages are dropped by the
    workers, and a running chunk stops at its worker's next lease renewal (within a
    third of the lease TTL); the steps it made since its last checkpoint are discarded
    and trained again on resume, from that checkpoint, so the run ends bit-identical to
    one never paused. Nothing stored is lost. Reconcile leaves paused sessions alone.
    A session that `ptutils run` runs is paused with Ctrl-C there instead.
    Exit 2 if a session is unknown, finished or paused already (the others are paused).
    """
    from orchestrator.actions import pause as do_pause

    store = open_store_or_fail(store_url, create=False)
    _act_on_each(sessions, lambda ref: do_pause(store, ref))


@click.command()
@click.argument("sessions", nargs=-1, required=True)
@store_option
@broker_option
@handle_errors
def resume(sessions: tuple[str, ...], store_url: str | None, broker_url: str | None) -> None:
    """Resume paused SESSIONS (names or ids): queued again and sent to the workers.

    \b
    Each continues from its last checkpoint on the route it was submitted with (its
    train queue and priority); an Eval whose result was lost is sent again too.
    A session paused under `ptutils run` is continued with `ptutils run --resume NAME`.
    Exit 2 if a session is unknown or not paused (the others are resumed); exit 3 if
    the broker cannot be reached (nothing is changed).
    """
    from orchestrator.actions import resume as do_resume

    store = open_store_or_fail(store_url, create=False)
    app = _app(broker_url)
    _act_on_each(sessions, lambda ref: do_resume(store, ref, app))


@click.command()
@click.argument("sessions", nargs=-1, required=True)
@store_option
@broker_option
@handle_errors
def requeue(sessions: tuple[str, ...], store_url: str | None, broker_url: str | None) -> None:
    """Run failed, cancelled or lost SESSIONS (names or ids) again on the cluster.

    \b
    Each goes on from its last verified checkpoint with fresh attempts (its error is
    cleared), on the route it was submitted with. Lost: its worker's lease expired
    (reconcile requeues those by itself, too). A paused session is resumed with
    `ptutils resume`; one that `ptutils run` started, with `ptutils run --resume NAME`.
    Exit 2 if a session is unknown, completed, paused, queued or running (the others
    are requeued); exit 3 if the broker cannot be reached (nothing is changed).
    """
    from orchestrator.actions import requeue as do_requeue

    store = open_store_or_fail(store_url, create=False)
    app = _app(broker_url)
    _act_on_each(sessions, lambda ref: do_requeue(store, ref, app))


@click.command()
@click.option("--every", default=None, type=click.FloatRange(0.1), metavar="SECONDS",
              help="Run forever, a pass every SECONDS (default: one pass).")
@click.option("--stall-after", default=None, type=click.FloatRange(0), metavar="SECONDS",
              help="Requeue a session with no lease and no progress for this long "
                   "(default 15).")
@click.option("--eval-stall-after", default=None, type=click.FloatRange(0), metavar="SECONDS",
              help="Requeue an Eval that has no result and that nobody runs this long "
                   "after its checkpoint (default 15).")
@store_option
@broker_option
@click.option("--json", "as_json", is_flag=True, help="Print each pass's requeues as JSON.")
@click.option("--metrics-port", default=0, envvar="PTUTILS_METRICS_PORT", show_envvar=True,
              type=click.IntRange(0, 65535), metavar="PORT",
              help="With --every: serve Prometheus metrics on http://0.0.0.0:PORT/metrics.")
@handle_errors
def reconcile(every: float | None, stall_after: float | None, eval_stall_after: float | None,
              store_url: str | None, broker_url: str | None, as_json: bool,
              metrics_port: int) -> None:
    """Requeue sessions whose worker died or whose messages were lost.

    Finds sessions whose lease expired, or that are queued/running with no live lease and
    no progress for --stall-after seconds while their queue is empty (a broker restarted
    empty), and requeues them from their latest checkpoint; also an Eval that nobody
    runs (no result, no claim, an empty eval queue). Safe to
    run several at once. `ptutils worker` runs it too (see --reconcile-every), and so can
    `celery -A workers.app beat`.
    """
    from orchestrator.reconcile import reconcile_loop, reconcile_once
    from workers.dispatch import check_broker

    store = open_store_or_fail(store_url)
    app = _app(broker_url)
    check_broker(app)
    options = {k: v for k, v in (("stall_after", stall_after),
                                 ("eval_stall_after", eval_stall_after)) if v is not None}

    def show(done: list[Any]) -> None:
        if as_json and (done or every is None):
            click.echo(json.dumps([r.to_dict() for r in done]))
        if as_json:
            return
        for r in done:
            click.echo(f"{r.name} ({r.session[:8]}): {r.reason}; requeued "
                       f"{', '.join(map(str, r.tasks))}")

    if every is None:
        done = reconcile_once(store, app, **options)
        show(done)
        if not as_json and not done:
            click.echo("nothing to requeue")
        return
    on_pass = show
    if metrics_port:
        from workers.metrics import ReconcileMetrics, serve_here

        serve_here(metrics_port)
        recorded = ReconcileMetrics(store)

        def on_pass(done: list[Any]) -> None:
            recorded(done)
            show(done)

    reconcile_loop(store, app, every, on_pass=on_pass, **options)


COMMANDS = (worker, submit, status, watch, cancel, pause, resume, requeue, reconcile)


def register(group: click.Group) -> None:
    """Add the cluster commands to the `ptutils` group."""
    for command in COMMANDS:
        group.add_command(command)
