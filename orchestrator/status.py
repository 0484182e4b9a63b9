"""`ptutils status`, `ptutils watch`, `ptutils cancel`: follow and stop sessions.

What a row holds is decided here; how it is drawn, in orchestrator/table.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ptutils.errors import OrchestratorError, PtutilsError
from ptutils.plan import pending_eval_steps
from ptutils.slots import world_size_of
from ptutils.store.base import CheckpointKind, SessionStatus, Store, new_id

CANCEL_ATTEMPTS = 20
"""Compare-and-set attempts of `cancel` against a session that keeps moving."""


STATES = ("queued", "waiting", "preempted", "lost", "running", "paused", "completed", "failed",
          "cancelled")
"""What `status` shows: the stored status of a finished or paused session; otherwise what
is true now. `running`: a worker holds a live lease. With no live lease: `lost` (a lease
expired: its worker died, reconcile requeues it), `waiting` (its next chunk waits for an
Eval result), `preempted` (stopped at a preemption checkpoint, its continuation queued),
else `queued`. `paused`: `ptutils run` was stopped on request (`run --resume` continues)."""


def display_state(store: Store, doc: dict[str, Any], now: float) -> tuple[str, int | None]:
    """(state, the Eval step it waits for or None): see STATES."""
    status = str(doc["status"])
    if status not in (SessionStatus.QUEUED, SessionStatus.RUNNING):
        return status, None
    lease = doc.get("lease") or {}
    if lease:
        return ("running" if float(lease.get("expires", 0)) > now else "lost"), None
    waiting = _awaited_eval(store, doc)
    if waiting is not None:
        return "waiting", waiting
    ckpt = doc.get("checkpoint") or {}
    if ckpt.get("kind") == str(CheckpointKind.PREEMPT) and ckpt.get("step") == doc["step"]:
        return "preempted", None
    return "queued", None


def _awaited_eval(store: Store, doc: dict[str, Any]) -> int | None:
    """The Eval step the session's next chunk waits for, if its result is not in yet."""
    try:
        steps = pending_eval_steps(doc, int(doc["step"]))
    except PtutilsError:
        return None  # a config that no longer parses: the worker will say so
    if not steps:
        return None
    n = steps[-1]
    done = store.query_statistics(doc["_id"], phase="eval", step_min=n, step_max=n)
    return None if done else n


def session_row(store: Store, doc: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """What `status` shows of one session (also its --json form).

    `status` is the stored status, `state` what is true now (see STATES); `now` is the
    store's clock, by which leases are judged. `world_size`: the slots the session
    needs; `devices`: the device ids a running session holds (`lease.devices`: "" for
    a CPU slot, "0", "1", ... for GPUs), None when it does not run.
    """
    now = store.now() if now is None else now
    sid, step = doc["_id"], int(doc["step"])
    loss = store.query_statistics(sid, name="loss", phase="train", step_min=step,
                                  step_max=step) if step else []
    evals = store.query_statistics(sid, phase="eval")
    last_eval: dict[str, float] = {}
    eval_step = None
    if evals:
        eval_step = max(p["step"] for p in evals)
        last_eval = {p["name"]: p["value"] for p in evals if p["step"] == eval_step}
    state, waiting_for = display_state(store, doc, now)
    lease = doc.get("lease") or {}
    error = doc.get("error") or {}
    return {
        "id": sid,
        "name": doc["name"],
        "status": doc["status"],
        "state": state,
        "waiting_for": waiting_for,
        "step": step,
        "total_steps": int(doc["total_steps"]),
        "loss": loss[-1]["value"] if loss else None,
        "eval_step": eval_step,
        "eval": last_eval,
        "worker": lease.get("worker") if state == "running" else None,
        "world_size": _world_size(doc),
        "devices": list(lease.get("devices") or []) if state == "running" else None,
        "attempts": int(doc.get("attempts") or 0),
        "sweep": doc.get("sweep"),
        "created": float(doc.get("created") or 0),
        "age": now - float(doc.get("created") or now),
        "updated_ago": now - float(doc.get("updated") or now),
        "error": error.get("message"),
    }


def _world_size(doc: dict[str, Any]) -> int:
    try:
        return world_size_of(doc)
    except PtutilsError:
        return 1  # a bad value: the worker fails the session, naming the key


def _stored_statuses(state: str) -> list[str]:
    """Stored statuses a session shown as `state` can have."""
    if state in ("queued", "waiting", "preempted", "lost", "running"):
        return [str(SessionStatus.QUEUED), str(SessionStatus.RUNNING)]
    return [state]


def status_rows(
    store: Store,
    refs: Sequence[str] = (),
    *,
    status: str | None = None,
    sweep: str | None = None,
) -> list[dict[str, Any]]:
    """Rows for the named sessions (names or ids), or every session matching the filters.

    `status` filters on the state shown (see STATES), not on the stored status.
    """
    if refs:
        docs = [store.get_session(ref) for ref in refs]
    else:
        docs = store.find_sessions(status=_stored_statuses(status) if status else None,
                                   sweep=sweep)
    now = store.now()
    rows = [session_row(store, doc, now) for doc in docs]
    return [r for r in rows if status is None or r["state"] == status]


def all_finished(rows: Sequence[dict[str, Any]]) -> bool:
    return bool(rows) and all(SessionStatus(r["status"]).finished for r in rows)


def cancel(store: Store, ref: str) -> dict[str, Any]:
    """Mark a session cancelled; its queued tasks become stale, its running chunk stops.

    The token changes (every queued message is fenced out) and the lease is dropped, so
    the worker running a chunk fails its next lease renewal, stops at the next step and
    discards the chunk. A session already finished is returned unchanged.
    """
    for _ in range(CANCEL_ATTEMPTS):
        doc = store.get_session(ref)
        if SessionStatus(doc["status"]).finished:
            return doc
        new = store.cas_session(
            doc["_id"],
            {"token": doc["token"], "status": doc["status"]},
            {"status": str(SessionStatus.CANCELLED), "lease": None, "token": new_id()},
        )
        if new is not None:
            return new
    raise OrchestratorError(
        f"could not cancel session {ref!r}: it changed {CANCEL_ATTEMPTS} times while trying"
    )
