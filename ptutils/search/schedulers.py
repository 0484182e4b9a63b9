"""Rungs and decisions: ASHA / Hyperband promotions and stops, PBT exploits.

Pure functions over the search's trial records, so that a decision depends only on
recorded metric values and trial numbers, never on which worker was faster.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

from ptutils.errors import ConfigError

SCHEDULERS = ("none", "asha", "hyperband", "pbt")
"""`--scheduler` values: none runs every trial to the end (a plain search)."""

FINISHED = ("complete", "stopped", "failed")
"""Trial states after which a trial never trains again."""


def rungs(min_steps: int, max_steps: int, eta: int, unit: int) -> list[int]:
    """Rung steps min*eta^k (rounded down to `unit`, the plan's eval interval) below
    max, then max: the points where a trial is promoted or stopped."""
    if eta < 2:
        raise ConfigError(f"--eta: the reduction factor must be >= 2 (got {eta})")
    if min_steps <= 0 or min_steps % unit:
        raise ConfigError(
            f"--min-steps: must be a positive multiple of session.eval_every={unit} (rungs are "
            f"eval points, so the metric is the plan's eval statistic), got {min_steps}"
        )
    if min_steps >= max_steps:
        raise ConfigError(f"--min-steps ({min_steps}) must be below session.total_steps "
                          f"({max_steps}) for early stopping to have a rung")
    out: list[int] = []
    r = float(min_steps)
    while True:
        step = int(r) // unit * unit
        if step >= max_steps:
            break
        if not out or step > out[-1]:
            out.append(step)
        r *= eta
    return [*out, max_steps]


def brackets(all_rungs: Sequence[int], scheduler: str) -> list[list[int]]:
    """The rungs of each bracket: ASHA one (all rungs); Hyperband one per starting rung
    (bracket b starts at rung b: fewer, longer first rungs); none/pbt: one."""
    if scheduler == "hyperband":
        return [list(all_rungs[b:]) for b in range(len(all_rungs))]
    return [list(all_rungs)]


def better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def rank_key(mode: str) -> Any:
    """Sort key of (value, trial number): best first, lower trial number on ties."""
    return lambda vn: (-vn[0] if mode == "max" else vn[0], vn[1])


def asha_decision(
    trials: Sequence[Mapping[str, Any]], i: int, step: int, eta: int, mode: str
) -> tuple[str, str] | None:
    """("promote" | "stop", why) for trial i at rung `step`, or None while a lower-numbered
    trial of its bracket has not yet reached that rung or finished before it.

    Competitors: the rung values of trials <= i in the bracket. Promoted when in the top
    len // eta (the best so far while fewer than eta compete), as Optuna's ASHA does.
    """
    me = trials[i]
    values: list[tuple[float, int]] = []
    for t in trials[: i + 1]:
        if t["bracket"] != me["bracket"]:
            continue
        at = dict((int(s), v) for s, v in t["rungs"])
        if step in at:
            values.append((float(at[step]), int(t["n"])))
        elif t["state"] in FINISHED:
            continue  # stopped (or failed) before this rung
        else:
            return None
    top = max(1, len(values) // eta)
    ranked = sorted(values, key=rank_key(mode))
    place = [n for _, n in ranked].index(int(me["n"]))
    why = f"rung step {step}: #{place + 1} of {len(values)}, top {top} go on"
    return ("promote" if place < top else "stop"), why


def pbt_exploits(
    members: Sequence[Mapping[str, Any]], step: int, fraction: float, mode: str, seed: int,
    keys: Sequence[str], factors: Sequence[float],
) -> list[dict[str, Any]]:
    """Bottom `fraction` of the members (by value at `step`) copy a top-`fraction` member
    and scale each of `keys` by a factor drawn from `factors`: [{member, donor, factors}].
    Draws come from a generator seeded by (seed, step, member): no global RNG."""
    scored = [(float(dict((int(s), v) for s, v in m["rungs"])[step]), int(m["n"]))
              for m in members]
    ranked = sorted(scored, key=rank_key(mode))
    k = max(1, math.floor(len(ranked) * fraction)) if len(ranked) > 1 else 0
    if k == 0:
        return []
    top, bottom = [n for _, n in ranked[:k]], [n for _, n in ranked[-k:]]
    out = []
    for n in sorted(bottom):
        rng = random.Random(f"{seed}:{step}:{n}")
        donor = top[rng.randrange(len(top))]
        out.append({"member": n, "donor": donor,
                    "factors": {key: factors[rng.randrange(len(factors))] for key in keys}})
    return out
