"""`ptutils search`: hyperparameter search with early stopping or PBT (docs/search.md).

    ptutils search CONFIG --space SPACE.yaml --algo tpe --scheduler asha --trials 32 \\
        --metric test/accuracy --mode max [--parallel 4] [--seed 0] [--local] [--name N]
    ptutils search --resume NAME          continue a search whose driver was killed
    ptutils search status NAME            trials: params, rung, metric, state, lineage
    ptutils search plot NAME -o out.png   metric vs each parameter; best vs steps spent

Exit codes are those of orchestrator/cli.py. The command code lives here; cli.py only
registers it (`register(main)`), and this module reaches back into cli.py only when a
command runs.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from typing import Any

import click

from ptutils.search.sampler import ALGOS
from ptutils.search.schedulers import SCHEDULERS

STORE_HELP = ("Where the search and its trials are stored: a folder (the embedded store, "
              "default ./runs) or a mongodb:// URL. Falls back to $PTUTILS_STORE.")


def _handle(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from orchestrator.cli import handle_errors

        return handle_errors(fn)(*args, **kwargs)

    return wrapper


def _store(url: str | None, create: bool = True) -> Any:
    from orchestrator.cli import open_store_or_fail

    return open_store_or_fail(url, create=create)


class _SearchGroup(click.Group):
    """`ptutils search CONFIG ...` runs a search; `status`/`plot` are subcommands."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_SearchGroup)
def search() -> None:
    """Hyperparameter search: Optuna samplers, ASHA/Hyperband early stopping, PBT.

    \b
      ptutils search exp.yaml --space space.yaml --algo tpe --scheduler asha \\
          --trials 32 --metric test/accuracy --mode max --local
      ptutils search --resume NAME      go on after the driver was killed
      ptutils search status NAME        the trials as a table
      ptutils search plot NAME -o p.png metric vs parameters, best vs steps spent

    The search's state (every ask, rung value and decision) lives in the store, so a
    killed driver resumes where it stopped; trials are sessions NAME-N tagged
    search:NAME. See docs/search.md.
    """


@search.command("run")
@click.argument("config", required=False, type=click.Path(dir_okay=False, exists=True))
@click.option("--space", "space_path", type=click.Path(dir_okay=False, exists=True),
              help="YAML mapping config paths to distributions: {uniform: [a, b]}, "
                   "{loguniform: [a, b]}, {int: [a, b]}, {choice: [...]}, optional when:.")
@click.option("--algo", type=click.Choice(ALGOS), default="tpe", show_default=True,
              help="Optuna sampler that proposes each new trial.")
@click.option("--scheduler", type=click.Choice(SCHEDULERS), default="none",
              show_default=True,
              help="none: every trial trains to session.total_steps; asha/hyperband: stop "
                   "trials early at rungs (eval points); pbt: population-based training.")
@click.option("--trials", type=int, default=16, show_default=True,
              help="Number of trials (PBT: population size).")
@click.option("--metric", default="test/accuracy", show_default=True,
              help="Eval statistic TARGET/NAME that decides.")
@click.option("--mode", type=click.Choice(["min", "max"]), default="max", show_default=True)
@click.option("--parallel", type=int, default=4, show_default=True,
              help="Trials live at once.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the sampler and PBT's draws: same seed, same decisions.")
@click.option("--eta", type=int, default=3, show_default=True,
              help="ASHA reduction factor: the top 1/eta of a rung goes on.")
@click.option("--min-steps", type=int, default=0,
              help="First rung (default: session.eval_every); a multiple of eval_every.")
@click.option("--pbt-interval", type=int, default=0,
              help="Steps between PBT exploits (default: session.eval_every).")
@click.option("--pbt-fraction", type=float, default=0.25, show_default=True,
              help="Bottom fraction that copies a top member at each PBT ready point.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a value of the base config (repeatable).")
@click.option("--name", default=None, help="Search name (default: the config's name).")
@click.option("--resume", default=None, metavar="NAME",
              help="Continue the stored search NAME (no CONFIG needed).")
@click.option("--local", is_flag=True,
              help="Run the trials in this process against the store (no Celery).")
@click.option("--queue", default="train", show_default=True,
              help="Queue of the trials' Train tasks on Celery (a trial of world_size N > 1 "
                   "goes to QUEUE-xN, as with `ptutils submit`).")
@click.option("--priority", default=5, show_default=True, type=click.IntRange(0, 9),
              help="Priority of the trials' tasks on Celery: 0..9, higher runs sooner.")
@click.option("--broker", "broker_url", envvar="PTUTILS_BROKER", default=None, metavar="URL",
              help="Celery broker URL (without --local). Falls back to $PTUTILS_BROKER.")
@click.option("--poll", type=float, default=1.0, show_default=True,
              help="Seconds between store polls when trials run on Celery.")
@click.option("--store", "store_url", envvar="PTUTILS_STORE", default=None,
              metavar="PATH|URL", help=STORE_HELP)
@_handle
def run_cmd(config: str | None, space_path: str | None, algo: str, scheduler: str,
            trials: int, metric: str, mode: str, parallel: int, seed: int, eta: int,
            min_steps: int, pbt_interval: int, pbt_fraction: float,
            overrides: tuple[str, ...], name: str | None, resume: str | None, local: bool,
            queue: str, priority: int, broker_url: str | None, poll: float,
            store_url: str | None) -> None:
    """Start a search (CONFIG + --space) or --resume one; prints the best trial."""
    from ptutils.search import Driver, best_trial, create_search, steps_spent

    if resume is None:
        if config is None or space_path is None:
            raise click.UsageError("give CONFIG and --space SPACE.yaml (or --resume NAME)")
        spec = _spec(config, space_path, overrides, name, algo=algo, scheduler=scheduler,
                     trials=trials, metric=metric, mode=mode, parallel=parallel, seed=seed,
                     eta=eta, min_steps=min_steps, pbt_interval=pbt_interval,
                     pbt_fraction=pbt_fraction, queue=queue, priority=priority)
        executor = _executor(local, broker_url, poll, store_url)
        store = executor.store
        create_search(store, spec)
        search_name = spec.name
    else:
        executor = _executor(local, broker_url, poll, store_url)
        store, search_name = executor.store, resume
    body = Driver(store, search_name, executor).run(poll=0.0 if local else poll)
    best = best_trial(body)
    click.echo(f"search {search_name}: {len(body['trials'])} trials, "
               f"{steps_spent(body)} training steps")
    if best is not None:
        click.echo(f"best: trial {best['n']} ({best['name']}) {body['spec']['metric']}="
                   f"{best['value']:.6g} with {_params(best)}")


def _spec(config: str, space_path: str, overrides: tuple[str, ...], name: str | None,
          **kw: Any) -> Any:
    """Load and check everything before anything is stored (exit 2 on bad input)."""
    from pathlib import Path

    from ptutils.config import load_config
    from ptutils.errors import ConfigError
    from ptutils.runner import load_experiment, validate
    from ptutils.search import SearchSpec, apply_params
    from ptutils.sources import code_for

    cfg = load_experiment(config, list(overrides))
    space = load_config(space_path)
    spec = SearchSpec(name=name or cfg.get("name") or Path(config).stem, config=cfg,
                      space=space, code=code_for(cfg), **kw)
    parsed, _, _ = spec.check()
    for point in parsed.corners():  # every bound and choice builds, before anything runs
        names = validate(apply_params(cfg, point), place=False).evaluator.metric_names()
        if spec.metric not in names:
            raise ConfigError(f"--metric {spec.metric}: the config's evals (eval.targets) "
                              f"produce {', '.join(names) or 'nothing'}; name one of them")
    return spec


def _executor(local: bool, broker_url: str | None, poll: float, store_url: str | None) -> Any:
    if local:
        from ptutils.search.local import LocalExecutor

        return LocalExecutor(_store(store_url))
    from workers.app import make_app
    from workers.dispatch import check_broker

    app = make_app(broker_url)
    check_broker(app)
    return CeleryExecutor(_store(store_url), app, poll)


class CeleryExecutor:
    """Trials as sessions on the Celery workers: the driver sends their Train (and,
    after a restart, Eval) messages on each session's route (`meta.queue`, set by the
    driver as `ptutils submit` sets it) and polls the store between passes."""

    def __init__(self, store: Any, app: Any, poll: float = 1.0) -> None:
        self.store, self.app, self.poll = store, app, poll

    def start(self, doc: dict[str, Any]) -> None:
        from ptutils.plan import train_task
        from workers.dispatch import Route, send

        task = train_task(doc)
        if task is not None:
            send(self.app, task, Route.of(doc))

    def evaluate(self, doc: dict[str, Any], step: int) -> None:
        from ptutils.search.driver import eval_task
        from workers.dispatch import Route, send

        send(self.app, eval_task(doc, step), Route.of(doc))

    def pump(self) -> bool:
        time.sleep(self.poll)
        return True


@search.command("status")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the search document as JSON.")
@click.option("--store", "store_url", envvar="PTUTILS_STORE", default=None,
              metavar="PATH|URL", help=STORE_HELP)
@_handle
def status_cmd(name: str, as_json: bool, store_url: str | None) -> None:
    """The trials of search NAME: parameters, rung reached, metric, state, lineage."""
    from ptutils.search import best_trial, load_search, steps_spent

    body = load_search(_store(store_url, create=False), name)["body"]
    if as_json:
        click.echo(json.dumps(body, indent=1))
        return
    spec = body["spec"]
    click.echo(f"search {name}: {spec['algo']} / {spec['scheduler']}, {spec['metric']} "
               f"({spec['mode']}), {len(body['trials'])}/{spec['trials']} trials, "
               f"{steps_spent(body)} steps{' (done)' if body['done'] else ''}")
    rows = [("trial", "rung", "metric", "state", "params")]
    for t in body["trials"]:
        rung = max((int(s) for s, _ in t["rungs"]), default=0)
        last = t["rungs"][-1][1] if t["rungs"] else None
        rows.append((str(t["n"]), str(rung), "-" if last is None else f"{last:.4g}",
                     t["state"], _params(t)))
        for e in t.get("lineage") or []:
            rows.append(("", str(e["step"]), "", "exploit",
                         f"copied trial {e['donor']}; {e['hparams']}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
    best = best_trial(body)
    if best is not None:
        click.echo(f"best: trial {best['n']} {spec['metric']}={best['value']:.6g}")


@search.command("plot")
@click.argument("name")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="PNG file to write.")
@click.option("--store", "store_url", envvar="PTUTILS_STORE", default=None,
              metavar="PATH|URL", help=STORE_HELP)
@_handle
def plot_cmd(name: str, output: str, store_url: str | None) -> None:
    """Metric against each parameter, and best-so-far against total training steps."""
    from orchestrator.stats import require_plotting
    from ptutils.search import load_search

    require_plotting()
    body = load_search(_store(store_url, create=False), name)["body"]
    plot_search(body, output)
    click.echo(f"wrote {output}")


def plot_search(body: dict[str, Any], output: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = body["spec"]
    keys = list(spec["space"])
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4 * (len(keys) + 1), 3.5))
    axes = list(axes) if len(keys) else [axes]
    for ax, key in zip(axes, keys):
        pts = [(dict(t["params"]).get(key), t["rungs"][-1][1], t["state"])
               for t in body["trials"] if t["rungs"] and key in dict(t["params"])]
        for state, color in (("complete", "C0"), ("stopped", "C1"), ("running", "C2")):
            xs = [str(p[0]) if isinstance(p[0], list | str) else p[0]
                  for p in pts if p[2] == state]
            ys = [p[1] for p in pts if p[2] == state]
            if xs:
                ax.scatter(xs, ys, label=state, color=color, s=14)
        if spec["space"][key].get("loguniform") is not None:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(spec["metric"])
    axes[0].legend(fontsize=7)
    spent, best, curve = 0, None, []
    for e in body["log"]:  # steps in decision order: a trial's steps count at its rungs
        if e["kind"] in ("promote", "stop", "complete") and e["step"] is not None:
            t = body["trials"][e["trial"]]
            prev = max([int(s) for s, _ in t["rungs"] if int(s) < e["step"]], default=0)
            spent += e["step"] - prev
            if e["kind"] == "complete":
                v = t["value"]
                if best is None or (v > best if spec["mode"] == "max" else v < best):
                    best = v
            if best is not None:
                curve.append((spent, best))
    if curve:
        axes[-1].plot([c[0] for c in curve], [c[1] for c in curve], drawstyle="steps-post")
    axes[-1].set_xlabel("training steps spent")
    axes[-1].set_ylabel(f"best {spec['metric']}")
    fig.tight_layout()
    fig.savefig(output, dpi=90)
    plt.close(fig)


def _params(t: dict[str, Any]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in t["params"])


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else json.dumps(v)


def register(main: click.Group) -> None:
    main.add_command(search)
