"""The `ptutils` command.

Exit codes: 0 success; 1 the run failed (the reason is stored on the session);
2 bad input (config, arguments, a session or store that does not exist) — nothing was
stored or queued; 3 the store or broker could not be reached (a MongoDB store gets
CONNECT_TIMEOUT_S to answer); 130 `run` stopped by Ctrl-C or SIGTERM after
checkpointing (it prints the command that continues it).
"""

from __future__ import annotations

import functools
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import click

from orchestrator.cluster_cli import broker_option
from orchestrator.trust import allow_imports_option
from ptutils.errors import (
    BrokerUnavailable,
    ConfigError,
    DataError,
    PtutilsError,
    SessionExists,
    SessionNotFound,
    StoreError,
    StoreUnavailable,
)

STORE_HELP = ("Where runs are stored: a folder (embedded store, default ./ptutils-runs) or a "
              "mongodb:// URL. Falls back to $PTUTILS_STORE.")


def store_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Attach `--store` (envvar PTUTILS_STORE) to a command."""
    return click.option("--store", "store_url", envvar="PTUTILS_STORE", default=None,
                        metavar="PATH|URL", help=STORE_HELP)(fn)


CONNECT_TIMEOUT_S = 5.0
"""Seconds a MongoDB store has to answer before a command gives up (exit 3). A URL's own
serverSelectionTimeoutMS wins."""


def open_store_or_fail(url: str | None, *, create: bool = True) -> Any:
    """The store, or a clear failure: a value that cannot be a store is bad input (exit
    2); a server that does not answer is unreachable (exit 3, one line). `create=False`:
    a folder that holds no store is not created (`SessionNotFound`)."""
    from ptutils.store import open_store

    try:
        return open_store(url, create=create, connect_timeout=CONNECT_TIMEOUT_S)
    except (StoreUnavailable, SessionNotFound):
        raise
    except StoreError as exc:
        raise click.BadParameter(str(exc), param_hint="--store") from exc


def exit_after_reading(store: Any) -> None:
    """End a command that only read from a MongoDB store at once, output flushed.

    pymongo's exit hook joins its monitor threads, which sleep in 0.5 s steps
    (`pymongo.common.MIN_HEARTBEAT_INTERVAL`): half a second added to every `status`
    or `stats`, more than the command's own work (issue 12). A reading command has
    nothing in flight, so it skips the hooks: logs, stdout and stderr are flushed first.
    Any other store returns and exits the ordinary way.
    """
    if "pymongo" not in sys.modules or store is None:
        return
    store.close()
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # `ptutils status | head`: what was wanted was written
        pass
    os._exit(0)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ptutils errors into one clear paragraph and a documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except (ConfigError, DataError, SessionExists, SessionNotFound) as exc:
            _fail(exc, 2)
        except (StoreUnavailable, BrokerUnavailable) as exc:
            _fail(exc, 3)
        except PtutilsError as exc:
            _fail(exc, 1)

    return wrapper


def _fail(exc: Exception, code: int) -> None:
    message = str(exc)
    if code == 3:  # one line, without a server library's diagnostics dump
        from ptutils.store.probe import short_reason

        message = short_reason(message, limit=400)
        message += ")" * (message.count("(") - message.count(")"))
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="ptutils")
def main(verbose: int) -> None:
    """ptutils: run PyTorch experiments locally or on a Celery cluster, resume them exactly.

    \b
    Quick start (no servers needed):
      ptutils run examples/digits_mlp.yaml            train, checkpoint, evaluate
      ptutils run --resume digits-mlp                 continue after an interruption
      ptutils stats digits-mlp --plot curves.png      look at the curves
      ptutils export digits-mlp -o net.safetensors    weights for other tools
      ptutils export-stats digits-mlp --tensorboard tb  curves for TensorBoard

    \b
    On a cluster (Redis + MongoDB, see deploy/README.md):
      ptutils worker                                  one worker process per GPU
      ptutils submit exp.yaml --sweep model.optimizer.lr=0.1,0.01
      ptutils status / watch / cancel / reconcile
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set model.optimizer.lr=0.05 (repeatable; "
                   "values are parsed as YAML: 3, 0.1, true, [64, 64]).")
@click.option("--name", default=None,
              help="Session name (default: the config's `name:` or the file name).")
@store_option
@click.option("--resume", is_flag=False, flag_value="", default=None, metavar="[NAME]",
              help="Continue a session from its latest checkpoint. `--resume NAME` needs no "
                   "CONFIG: the session keeps the config and overrides it was started with. "
                   "`CONFIG --resume` continues the session named by CONFIG (or --name).")
@click.option("--force", is_flag=True,
              help="Delete an existing session with this name and start over.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--allow-resize", is_flag=True,
              help="With --resume: continue on another session.world_size (CONFIG with "
                   "another value, or --set session.world_size=N). The run is then no "
                   "longer bit-identical to one that kept its size.")
@allow_imports_option(apply=True)
@handle_errors
def run(config: str | None, overrides: tuple[str, ...], name: str | None,
        store_url: str | None, resume: str | None, force: bool, quiet: bool,
        allow_resize: bool) -> None:
    """Train CONFIG in this process, against the embedded store (or any --store).

    Runs the session's plan: Train chunks of `session.chunk_steps` steps, each ending in a
    checkpoint, with Eval every `session.eval_every` steps and retention applied. A run
    stopped at any point (Ctrl-C, kill, power loss) continues with `ptutils run --resume
    NAME` and ends bit-identical to an uninterrupted one. See docs/config.md for every
    config key.
    """
    from ptutils.runner import pause_session, run_session

    if resume is not None and config is None and _is_config_file(resume):
        config, resume = resume, ""  # `run --resume exp.yaml`: the flag, then CONFIG
    if allow_resize and resume is None:
        raise click.BadParameter("only a resumed session can be resized; add --resume",
                                 param_hint="--allow-resize")
    if config is None:
        doc, warm, store = _resume_by_name(resume, name, overrides, store_url, allow_resize)
    else:
        doc, warm, store = _start_or_resume(config, overrides, name, store_url, resume, force,
                                            allow_resize)
    name = doc["name"]
    if doc["status"] == "completed":
        click.echo(f"session {name} is already complete (step {doc['step']}).")
        from ptutils.runner import summarize

        _print_summary(summarize(store, doc["_id"]))
        return
    stop = threading.Event()
    _stop_on_signals(stop)
    from orchestrator.progress import TrainProgress

    with TrainProgress(doc, enabled=not quiet) as bar:
        from ptutils.store import resolve_store_url

        summary = run_session(store, doc, warm=warm, progress=bar.update, stop_flag=stop,
                              store_url=resolve_store_url(store_url))
    if stop.is_set() and summary.status != "completed":
        pause_session(store, doc["_id"])
        click.echo(f"stopped at step {summary.step}; continue with: "
                   f"{resume_command(name, store)}")
        sys.exit(130)
    _print_summary(summary)


def _is_config_file(value: str) -> bool:
    return value.endswith((".yaml", ".yml", ".json")) and os.path.isfile(value)


def _resume_by_name(resume: str | None, name: str | None, overrides: tuple[str, ...],
                    store_url: str | None, allow_resize: bool = False
                    ) -> tuple[dict[str, Any], Any, Any]:
    """`run --resume NAME`: the stored session, with the config it was started with (only
    `--set session.world_size=N` may change it, with --allow-resize)."""
    from ptutils.config import apply_overrides, parse_override
    from ptutils.runner import resume_session

    if resume is None:
        raise click.UsageError("missing CONFIG (a YAML file), or `--resume NAME` to continue "
                               "a stored session")
    target = resume or name
    if not target:
        raise click.UsageError("--resume needs a session NAME when no CONFIG is given "
                               "(`ptutils status` lists them)")
    if name and resume and name != resume:
        raise click.BadParameter(f"--resume {resume} and --name {name} name two sessions",
                                 param_hint="--name")
    if any(parse_override(o)[0] != ["session", "world_size"] for o in overrides):
        raise click.BadParameter(
            "a resumed session keeps the config and overrides it was started with (only "
            "--set session.world_size=N resizes it, with --allow-resize); to change them, "
            "start a new session (CONFIG --set ... --name NEW_NAME)",
            param_hint="--set")
    store = open_store_or_fail(store_url, create=False)
    try:
        stored = store.get_session(target)
    except SessionNotFound:
        stored = None  # resume_session says so, with the way out
    if stored is not None and stored.get("code"):
        # The session's own .py files come from the store here, not from this disk. The
        # person running `ptutils run --resume NAME` is this process's operator and has
        # asked for exactly this session: trust its stored code (and only in here).
        from ptutils import policy

        current = policy.current()
        policy.configure(policy.Policy(current.allow, trust_session_code=True))
    config = None
    if overrides and stored is not None:
        config = apply_overrides(stored["config"], list(overrides))
    doc = resume_session(store, target, config=config, allow_resize=allow_resize)
    return doc, None, store


def _start_or_resume(config: str, overrides: tuple[str, ...], name: str | None,
                     store_url: str | None, resume: str | None, force: bool,
                     allow_resize: bool = False) -> tuple[dict[str, Any], Any, Any]:
    """`run CONFIG`: a new session (or, with --resume, the one CONFIG names)."""
    from ptutils.runner import load_experiment, prepare_session

    if not os.path.exists(config):
        raise click.BadParameter(f"no such file: {config} (from {os.getcwd()})",
                                 param_hint="CONFIG")
    if resume and name and resume != name:
        raise click.BadParameter(f"--resume {resume} and --name {name} name two sessions",
                                 param_hint="--name")
    cfg = load_experiment(config, overrides)
    name = resume or name or cfg.get("name") or os.path.splitext(os.path.basename(config))[0]
    store = open_store_or_fail(store_url, create=resume is None)
    if force and resume is None:
        try:
            store.delete_session(store.get_session(name)["_id"])
        except SessionNotFound:
            pass
    doc, warm = prepare_session(store, cfg, name, resume=resume is not None,
                                base_dir=os.path.dirname(os.path.abspath(config)),
                                allow_resize=allow_resize)
    return doc, warm, store


def resume_command(name: str, store: Any) -> str:
    """The command that continues session `name`, as it can be pasted into a shell.

    `--store` is written out when this command was given one on its command line (a
    folder as an absolute path); a MongoDB password is never printed: it shows as `***`,
    with a note to put it back (or to use $PTUTILS_STORE).
    """
    words = ["ptutils", "run", "--resume", name]
    ctx = click.get_current_context(silent=True)
    source = ctx.get_parameter_source("store_url") if ctx is not None else None
    note = ""
    if source is click.core.ParameterSource.COMMANDLINE:
        words += ["--store", store.url]
        if ":***@" in store.url:
            note = "  (put the store's password back for ***, or set $PTUTILS_STORE)"
    return shlex.join(words) + note


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        click.echo("\nstopping at the next step; checkpointing (Ctrl-C again to abort)", err=True)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _print_summary(summary: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"session {summary.name}", show_header=False)
    table.add_row("id", summary.session_id)
    table.add_row("status", summary.status)
    table.add_row("step", f"{summary.step}/{summary.total_steps}")
    if summary.train_loss is not None:
        table.add_row("final train loss", f"{summary.train_loss:.4f}")
    for k, v in sorted(summary.eval_metrics.items()):
        table.add_row(f"eval {k}", f"{v:.4f}")
    table.add_row("wall time", f"{summary.wall_time:.1f} s")
    if summary.checkpoint:
        table.add_row("checkpoint", f"step {summary.checkpoint['step']} "
                      f"({summary.checkpoint['kind']}) in {summary.store}")
    Console().print(table)


@main.command()
@click.argument("sessions", nargs=-1, required=True)
@click.option("--name", "names", multiple=True, help="Statistic names (default: all).")
@click.option("--phase", type=click.Choice(["train", "eval"]), default=None)
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG plot of the curves instead of printing a table.")
@click.option("--json", "as_json", is_flag=True, help="Print the points as JSON.")
@store_option
@handle_errors
def stats(sessions: tuple[str, ...], names: tuple[str, ...], phase: str | None,
          plot: str | None, as_json: bool, store_url: str | None) -> None:
    """Statistics of one or more sessions (names or ids): a table, JSON, or a plot."""
    from orchestrator.stats import print_stats, require_plotting

    if plot:
        require_plotting()
    store = open_store_or_fail(store_url, create=False)
    print_stats(store, list(sessions), names=list(names), phase=phase, plot=plot,
                as_json=as_json)
    exit_after_reading(store)


@main.command()
@store_option
@broker_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; beyond localhost, actions need the printed token.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@handle_errors
def ui(store_url: str | None, broker_url: str | None, host: str, port: int) -> None:
    """A web dashboard of the store's sessions: tables, curves, live updates, actions.

    \b
    Actions on a session page: cancel, pause (no broker needed), resume and requeue
    (sent to the workers through --broker, as `ptutils resume|requeue` do). Beyond
    localhost (--host 0.0.0.0) they need the token printed at start-up.
    """
    from orchestrator.status import display_state, session_row
    from ptutils.ui.app import serve
    from ptutils.ui.data import Hooks

    store = open_store_or_fail(store_url, create=False)
    serve(store, store_arg=store.url, host=host, port=port,
          hooks=Hooks(row=session_row, state=display_state, actions=ui_actions(broker_url)))


def ui_actions(broker_url: str | None) -> dict[str, Callable[[Any, str], dict[str, Any]]]:
    """The dashboard's actions; the Celery app (for resume, requeue) is made on first use."""
    from orchestrator.actions import pause, requeue, resume
    from orchestrator.status import cancel

    @functools.cache
    def app() -> Any:
        from workers.app import make_app

        return make_app(broker_url)

    return {"cancel": cancel, "pause": pause,
            "resume": lambda store, ref: resume(store, ref, app()),
            "requeue": lambda store, ref: requeue(store, ref, app())}


from orchestrator import cluster_cli, export  # noqa: E402 - after `main`, which they extend

cluster_cli.register(main)
export.register(main)

from orchestrator import search_cli  # noqa: E402 - `ptutils search` (issue 11)

search_cli.register(main)

if __name__ == "__main__":  # pragma: no cover
    main()
