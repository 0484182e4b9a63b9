"""PBT's exploit: a member's new checkpoint made of a top member's State, with the
hyperparameters that can change mid-run scaled.

The State's tensors are the donor's, unchanged, so `put_checkpoint` finds every segment
already stored (content addressed): an exploit writes a manifest, no tensor bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ptutils.errors import PtutilsError

PERTURBED = ("lr", "weight_decay")
"""Hyperparameters PBT perturbs: they live in the optimizer's `param_groups`, which the
State carries and `Optimizer.load_state_dict` restores, so the member trains with them."""

FACTORS = (0.8, 1.2)
"""Each perturbed value is multiplied by one of these (drawn per member and key)."""


def perturb(state: Mapping[str, Any], factors: Mapping[str, float]) -> tuple[dict[str, Any],
                                                                              dict[str, Any]]:
    """(a copy of `state` with each param group's hyperparameters scaled, the new values).

    The learning rate is scaled everywhere a scheduler keeps it (`base_lrs`, `_last_lr`,
    `initial_lr`) as well as in `lr`, so closed-form schedulers (cosine, lambda) and
    chainable ones (step, exponential) both continue from the scaled rate. Only tensors'
    containers are copied; the tensors are the donor's.
    """
    try:
        model = state["trainer"]["model"]
        optim = model["optimizer"]
    except (KeyError, TypeError) as exc:
        raise PtutilsError("PBT: the State holds no trainer.model.optimizer") from exc
    lr_f = float(factors.get("lr", 1.0))
    groups = []
    for g in optim["param_groups"]:
        g = dict(g)
        for key, f in factors.items():
            if key in g and isinstance(g[key], int | float) and not isinstance(g[key], bool):
                g[key] = g[key] * float(f)
        if "initial_lr" in g:
            g["initial_lr"] = g["initial_lr"] * lr_f
        groups.append(g)
    new_model = {**model, "optimizer": {**optim, "param_groups": groups}}
    sched = model.get("scheduler")
    if isinstance(sched, Mapping) and lr_f != 1.0:
        sched = dict(sched)
        for key in ("base_lrs", "_last_lr"):
            if isinstance(sched.get(key), list):
                sched[key] = [v * lr_f for v in sched[key]]
        new_model["scheduler"] = sched
    new_state = {**state, "trainer": {**state["trainer"], "model": new_model}}
    return new_state, hyperparameters(new_state)


def hyperparameters(state: Mapping[str, Any]) -> dict[str, Any]:
    """The perturbable values of a State (first param group), for lineage records."""
    groups = state["trainer"]["model"]["optimizer"]["param_groups"]
    return {k: groups[0][k] for k in PERTURBED if groups and k in groups[0]}
