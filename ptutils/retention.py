"""Retention and garbage collection: which checkpoints stay, and what goes (DESIGN §5).

`retained_steps` is a pure function of a session and its checkpoints; `apply_retention`
runs it for one session (the Save task), marks the best checkpoint, and deletes the
rest. `collect_garbage` sweeps the whole store: checkpoints that fenced-out or
cancelled chunks wrote beyond their session's committed step, then the store's own
leftovers (unreferenced segments, stale uploads). Everything here is idempotent and
judges ages by the store's clock with a grace period, so it is safe next to writers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ptutils.callbacks import DEFAULT_MODE
from ptutils.errors import CheckpointNotFound
from ptutils.plan import plan_of
from ptutils.session import Plan
from ptutils.store.base import GC_GRACE_S, CheckpointKind, Store

log = logging.getLogger("ptutils.retention")

GC_EVERY_S = 600.0
"""Save runs the store-wide garbage collection at most once per this many seconds
(across every worker sharing the store)."""

GC_CHORE = "gc"
"""Name under which `Store.claim_periodic` throttles the garbage collection."""

_BEST_CALLBACK = "ptutils.callbacks.BestCheckpoint"

Ckpt = dict[str, Any]


def best_rule(doc: dict[str, Any], plan: Plan) -> tuple[str, str] | None:
    """(metric, mode) that picks the best checkpoint: `session.retention.best_metric`,
    else the metric of a BestCheckpoint callback in the config; None if neither."""
    r = plan.retention
    if r.best_metric:
        return r.best_metric, r.best_mode
    for cb in (doc.get("config") or {}).get("callbacks") or []:
        if isinstance(cb, dict) and cb.get("type") == _BEST_CALLBACK and cb.get("metric"):
            return str(cb["metric"]), str(cb.get("mode", DEFAULT_MODE))
    return None


def best_checkpoint(doc: dict[str, Any], ckpts: list[Ckpt], plan: Plan) -> Ckpt | None:
    """The intact checkpoint at or below the session's step with the best metric."""
    rule = best_rule(doc, plan)
    if rule is None:
        return None
    metric, mode = rule
    current = int(doc["step"])
    scored = [
        c
        for c in ckpts
        if c["step"] <= current and not c.get("corrupt") and metric in (c.get("metrics") or {})
    ]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda c: c["metrics"][metric])


def retained_steps(
    doc: dict[str, Any],
    ckpts: list[Ckpt],
    plan: Plan,
    *,
    now: float | None = None,
    grace: float = GC_GRACE_S,
) -> set[tuple[int, str]]:
    """(step, kind) of the checkpoints retention keeps (pure function of the store).

    Kept: the last `keep_last` steps and the session's step, every `keep_every`-th, the
    best, the final one, a warm start's `init` one (step 0 cannot be rebuilt from the
    config), those due an Eval that has not reported yet, and those beyond
    the session's step younger than `grace` (a chunk may be about to commit one). A
    preempt checkpoint only while it is the session's step; never a corrupt one.
    """
    import time

    now = time.time() if now is None else now
    r = plan.retention
    current = int(doc["step"])
    live = [c for c in ckpts if c["step"] <= current and not c.get("corrupt")]
    steps = sorted({c["step"] for c in live})
    keep_steps = set(steps[-max(r.keep_last, 1) :])
    keep_steps.add(current)
    if r.keep_every:
        keep_steps.update(s for s in steps if s % r.keep_every == 0)
    for c in live:
        if plan.eval_due(c["step"]) and not (c.get("metrics") or {}).keys() - {"loss"}:
            keep_steps.add(c["step"])  # not evaluated yet: the Eval task still needs it
    best = best_checkpoint(doc, ckpts, plan)
    if best is not None:
        keep_steps.add(best["step"])
    keep: set[tuple[int, str]] = set()
    for c in live:
        if c["step"] in keep_steps and (
            c["kind"] != str(CheckpointKind.PREEMPT) or c["step"] == current
        ):
            keep.add((c["step"], c["kind"]))
        if c["kind"] in (str(CheckpointKind.FINAL), str(CheckpointKind.INIT)):
            keep.add((c["step"], c["kind"]))
    for c in ckpts:
        if c["step"] > current and float(c.get("created") or 0) > now - grace:
            keep.add((c["step"], c["kind"]))
    return keep


def apply_retention(store: Store, doc: dict[str, Any], *, grace: float = GC_GRACE_S) -> int:
    """Delete the session's checkpoints retention drops, flag the best; how many went."""
    plan = plan_of(doc)
    sid = doc["_id"]
    ckpts = store.list_checkpoints(sid)
    keep = retained_steps(doc, ckpts, plan, now=store.now(), grace=grace)
    best = best_checkpoint(doc, ckpts, plan)
    best_key = None if best is None else (best["step"], best["kind"])
    dropped = 0
    for c in ckpts:
        key = (c["step"], c["kind"])
        if key not in keep:
            store.delete_checkpoint(sid, *key)
            dropped += 1
        elif bool(c.get("best")) != (key == best_key):
            try:
                store.update_checkpoint(sid, *key, {"best": key == best_key})
            except CheckpointNotFound:
                pass  # deleted by a concurrent Save
    return dropped


@dataclass
class Collected:
    """What one garbage collection removed."""

    checkpoints: int = 0
    segments: int = 0


def collect_garbage(store: Store, *, older_than: float = GC_GRACE_S) -> Collected:
    """Store-wide: drop checkpoints beyond their session's step older than `older_than`
    (fenced-out or cancelled chunks), then the store's unreferenced leftovers."""
    cutoff = store.now() - older_than
    out = Collected()
    for doc in store.find_sessions():
        for c in store.list_checkpoints(doc["_id"]):
            if c["step"] > int(doc["step"]) and float(c.get("created") or 0) < cutoff:
                store.delete_checkpoint(doc["_id"], c["step"], c["kind"])
                out.checkpoints += 1
    out.segments = store.collect_garbage(older_than=older_than)
    if out.checkpoints or out.segments:
        log.info("garbage collection removed %d checkpoint(s) and %d segment(s)",
                 out.checkpoints, out.segments)
    return out
