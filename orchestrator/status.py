"""`ptutils status`, `ptutils watch`, `ptutils cancel`: follow and stop sessions."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ptutils.errors import OrchestratorError
from ptutils.store.base import SessionStatus, Store, new_id

CANCEL_ATTEMPTS = 20
"""Compare-and-set attempts of `cancel` against a session that keeps moving."""


def session_row(store: Store, doc: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """What `status` shows of one session (also its --json form)."""
    now = time.time() if now is None else now
    sid, step = doc["_id"], int(doc["step"])
    loss = store.query_statistics(sid, name="loss", phase="train", step_min=step,
                                  step_max=step) if step else []
    evals = store.query_statistics(sid, phase="eval")
    last_eval: dict[str, float] = {}
    eval_step = None
    if evals:
        eval_step = max(p["step"] for p in evals)
        last_eval = {p["name"]: p["value"] for p in evals if p["step"] == eval_step}
    lease = doc.get("lease") or {}
    live = bool(lease) and float(lease.get("expires", 0)) > now
    error = doc.get("error") or {}
    return {
        "id": sid,
        "name": doc["name"],
        "status": doc["status"],
        "step": step,
        "total_steps": int(doc["total_steps"]),
        "loss": loss[-1]["value"] if loss else None,
        "eval_step": eval_step,
        "eval": last_eval,
        "worker": lease.get("worker") if live else None,
        "attempts": int(doc.get("attempts") or 0),
        "sweep": doc.get("sweep"),
        "created": float(doc.get("created") or 0),
        "age": now - float(doc.get("created") or now),
        "updated_ago": now - float(doc.get("updated") or now),
        "error": error.get("message"),
    }


def status_rows(
    store: Store,
    refs: Sequence[str] = (),
    *,
    status: str | None = None,
    sweep: str | None = None,
) -> list[dict[str, Any]]:
    """Rows for the named sessions (names or ids), or every session matching the filters."""
    if refs:
        docs = [store.get_session(ref) for ref in refs]
    else:
        docs = store.find_sessions(status=status, sweep=sweep)
    now = time.time()
    return [session_row(store, doc, now) for doc in docs]


def headline_metric(row: dict[str, Any]) -> str:
    """The eval metric to show: an accuracy if there is one, else the first by name."""
    if not row["eval"]:
        return ""
    names = sorted(row["eval"])
    name = next((n for n in names if n.endswith("accuracy")), names[0])
    return f"{name}={row['eval'][name]:.4g} @{row['eval_step']}"


def format_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def status_table(rows: Sequence[dict[str, Any]]) -> Any:
    """A rich Table of status rows."""
    from rich.table import Table

    colors = {"completed": "green", "failed": "red", "running": "cyan", "queued": "yellow",
              "cancelled": "magenta", "paused": "blue"}
    table = Table("name", "id", "status", "step", "loss", "last eval", "worker", "age")
    table.columns[5].overflow = "fold"
    for row in rows:
        status = row["status"]
        shown = f"[{colors.get(status, 'white')}]{status}[/]"
        if row["error"]:
            shown += f"\n{row['error'][:120]}"
        table.add_row(
            row["name"], row["id"][:8], shown, f"{row['step']}/{row['total_steps']}",
            "" if row["loss"] is None else f"{row['loss']:.4g}", headline_metric(row),
            row["worker"] or "", format_age(row["age"]),
        )
    return table


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
