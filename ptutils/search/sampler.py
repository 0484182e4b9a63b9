"""Optuna samplers through ask/tell, on a study rebuilt for every ask.

Trial n is asked from a fresh in-memory study that holds exactly what trial n may know,
whatever the timing: the driver asks it once trials 0..n-P are finished (P live at
most) and passes those as told (complete, stopped at a rung = pruned with its rung
values, or failed), and trials n-P+1..n-1 as running with nothing reported (what they
reported by then depends on the workers' timing), replayed in trial order; the sampler
is seeded with (seed, n). The same records give the same ask, in-process or on the
cluster, and after a killed driver restarts. No Optuna database: our store holds the
records.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ptutils.errors import ConfigError
from ptutils.search.space import Space

ALGOS = ("random", "tpe", "grid", "cmaes")
"""Samplers `--algo` names."""

log = logging.getLogger("ptutils.search")


def make_sampler(algo: str, space: Space, seed: int) -> Any:
    """The Optuna sampler `algo`, seeded."""
    import optuna

    if algo == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if algo == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=8)
    if algo == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    if algo == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise ConfigError(
                "--algo cmaes needs the `cmaes` package: pip install 'ptutils[search]'"
            ) from None
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    raise ConfigError(f"--algo: {algo!r} is not one of {', '.join(ALGOS)}")


def trial_seed(seed: int, n: int) -> int:
    """The sampler seed of trial n: a hash, so neighbouring trials draw unrelated values."""
    digest = hashlib.sha256(f"{seed}:{n}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def ask(
    algo: str,
    space: Space,
    seed: int,
    n: int,
    history: Sequence[Mapping[str, Any]],
    mode: str,
) -> dict[str, Any]:
    """The config values of trial `n`, given `history`: the records of trials < n
    ({params, state: running|pruned|complete|failed, value, rungs: [[step, value]]})."""
    import optuna
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = make_sampler(algo, space, trial_seed(seed, n))
    study = optuna.create_study(
        sampler=sampler, direction="maximize" if mode == "max" else "minimize"
    )
    for rec in history:
        params, dists = space.internal(dict(rec["params"]))
        state = {
            "running": TrialState.RUNNING,
            "pruned": TrialState.PRUNED,
            "complete": TrialState.COMPLETE,
            "failed": TrialState.FAIL,
        }[rec["state"]]
        study.add_trial(
            create_trial(
                params=params,
                distributions=dists,
                value=rec.get("value") if state == TrialState.COMPLETE else None,
                intermediate_values={int(s): float(v) for s, v in rec.get("rungs") or []},
                state=state,
            )
        )
    trial = study.ask()
    values = space.suggest(trial)
    return values
