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


LR_GROUP_KEYS = ("initial_lr", "max_lr", "min_lr")
"""Param-group keys besides `lr` that hold a rate a scheduler sets `lr` from (LRScheduler's
`initial_lr`; OneCycleLR's `max_lr`/`min_lr`, from which it computes every step's lr)."""

LR_SCHEDULER_KEYS = ("base_lrs", "_last_lr", "max_lrs", "min_lrs", "eta_min")
"""Scheduler state holding rates (CyclicLR's `max_lrs`, ReduceLROnPlateau's `min_lrs`,
CosineAnnealingLR's `eta_min`); SequentialLR/ChainedScheduler's `_schedulers` recurse."""


def perturb(state: Mapping[str, Any], factors: Mapping[str, float]) -> tuple[dict[str, Any],
                                                                              dict[str, Any]]:
    """(a copy of `state` with each param group's hyperparameters scaled, the new values).

    The learning rate is scaled everywhere a scheduler keeps one (LR_GROUP_KEYS in the
    param groups, LR_SCHEDULER_KEYS in its state) as well as in `lr`, so chainable
    schedulers (step, exponential, cosine) and closed-form ones (lambda, one-cycle,
    cyclic) all continue from the scaled rate: every later lr is the donor's times the
    factor. Only tensors' containers are copied; the tensors are the donor's.
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
            if _is_number(g.get(key)):
                g[key] = g[key] * float(f)
        for key in LR_GROUP_KEYS:
            if _is_number(g.get(key)):
                g[key] = g[key] * lr_f
        groups.append(g)
    new_model = {**model, "optimizer": {**optim, "param_groups": groups}}
    sched = model.get("scheduler")
    if isinstance(sched, Mapping) and lr_f != 1.0:
        new_model["scheduler"] = _scale_scheduler(sched, lr_f)
    new_state = {**state, "trainer": {**state["trainer"], "model": new_model}}
    return new_state, hyperparameters(new_state)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _scale_scheduler(sched: Mapping[str, Any], f: float) -> dict[str, Any]:
    out = dict(sched)
    for key in LR_SCHEDULER_KEYS:
        v = out.get(key)
        if isinstance(v, list) and all(_is_number(x) for x in v):
            out[key] = [x * f for x in v]
        elif _is_number(v):
            out[key] = v * f
    if isinstance(out.get("_schedulers"), list):  # SequentialLR, ChainedScheduler
        out["_schedulers"] = [_scale_scheduler(s, f) if isinstance(s, Mapping) else s
                              for s in out["_schedulers"]]
    return out


def hyperparameters(state: Mapping[str, Any]) -> dict[str, Any]:
    """The perturbable values of a State (first param group), for lineage records."""
    groups = state["trainer"]["model"]["optimizer"]["param_groups"]
    return {k: groups[0][k] for k in PERTURBED if groups and k in groups[0]}
