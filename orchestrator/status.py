"""`ptutils status`, `ptutils watch`, `ptutils cancel`: follow and stop sessions.

What a row holds is decided here; how it is drawn, in orchestrator/table.py.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ptutils.errors import OrchestratorError, PtutilsError
from ptutils.plan import pending_eval_steps
from ptutils.slots import world_size_of
from ptutils.store import summary as summaries
from ptutils.store.base import CheckpointKind, SessionQuery, SessionStatus, Store, new_id

CANCEL_ATTEMPTS = 20
"""Compare-and-set attempts of `cancel` against a session that keeps moving."""


STATES = ("queued", "waiting", "preempted", "lost", "running", "paused", "completed", "failed",
          "cancelled")
"""What `status` shows: the stored status of a finished or paused session; otherwise what
is true now. `running`: a worker holds a live lease. With no live lease: `lost` (a lease
expired: its worker died, reconcile requeues it), `waiting` (its next chunk waits for an
Eval result), `preempted` (stopped at a preemption checkpoint, its continuation queued),
else `queued`. `paused`: `ptutils pause` (`ptutils resume` continues it), or `ptutils run`
stopped on request (`run --resume` continues)."""


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
    known = summaries.read(doc)
    if known is not None and known["eval_step"] == n:
        return None  # its result is the latest one in: no query
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
    shown = _statistics_shown(store, doc)
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
        "loss": shown["loss"],
        "loss_step": shown["loss_step"],
        "eval_step": shown["eval_step"],
        "eval": shown["eval"],
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


def _statistics_shown(store: Store, doc: dict[str, Any]) -> dict[str, Any]:
    """{loss, loss_step, eval_step, eval} of a session: from its `summary` (no query),
    or, for the parts a session from an older ptutils lacks, from its statistics."""
    known = summaries.read(doc) or {"loss": None, "loss_step": None, "eval_step": None,
                                    "eval": {}, "complete": False}
    if known["complete"]:
        return known
    sid, step = doc["_id"], int(doc["step"])
    if known["loss"] is None and step:
        loss = store.query_statistics(sid, name="loss", phase="train", step_min=step,
                                      step_max=step)
        if loss:
            known.update(loss=loss[-1]["value"], loss_step=step)
    if known["eval_step"] is None:
        evals = store.query_statistics(sid, phase="eval")
        if evals:
            n = max(p["step"] for p in evals)
            known.update(eval_step=n, eval={p["name"]: p["value"] for p in evals
                                            if p["step"] == n})
    return known


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
    """Rows for the named sessions (names or ids), or every session matching the filters,
    oldest first.

    `status` filters on the state shown (see STATES), not on the stored status.
    """
    if refs:
        now = store.now()
        rows = [session_row(store, store.get_session(ref), now) for ref in refs]
        return [r for r in rows if status is None or r["state"] == status]
    listing = Listing(SessionQuery(sweep=sweep), state=status, limit=None)
    return list(listing.rows(store))


DEFAULT_LIMIT = 50
"""Sessions `status` shows without --limit/--all: the active ones, then the newest."""

PAGE_SIZE = 1000
"""Sessions read per query when every one is listed (--all): memory stays bounded."""

ACTIVE = (str(SessionStatus.QUEUED), str(SessionStatus.RUNNING))
"""Stored statuses of sessions that are not finished or paused."""


@dataclass(frozen=True)
class Listing:
    """Which sessions `status` shows, and in what order (the dashboard asks the same).

    `query` filters in the store (indexed); `state` filters on the state shown (see
    STATES; the store narrows to the stored statuses it can come from). `limit=None`
    lists every match, oldest first, read PAGE_SIZE at a time. Otherwise `page` 1 shows
    the active sessions (queued, running) and fills up to `limit` with the newest of the
    rest; page n > 1 the n-th `limit` newest. A page is shown oldest first.
    """

    query: SessionQuery = SessionQuery()
    state: str | None = None
    limit: int | None = DEFAULT_LIMIT
    page: int = 1
    sort: str = "created"

    def store_query(self) -> SessionQuery:
        if self.state is None:
            return self.query
        wanted = set(_stored_statuses(self.state))
        if self.query.status is not None:
            wanted &= set(self.query.status)
        return replace(self.query, status=tuple(sorted(wanted)))

    def docs(self, store: Store) -> Iterator[dict[str, Any]]:
        """The session documents shown, in the order shown."""
        if self.limit is None:
            yield from self._every(store, self.store_query())
            return
        yield from self.page_of(store)[0]

    def page_of(self, store: Store) -> tuple[list[dict[str, Any]], bool]:
        """(the documents of this page in the order shown, whether more match): one
        query per page, two on page 1 (the active ones, then the newest), no count."""
        assert self.limit is not None, "page_of needs a limit"
        query = self.store_query()
        if self.page > 1:
            docs = store.list_sessions(query, sort=self.sort, limit=self.limit + 1,
                                       offset=(self.page - 1) * self.limit)
            more = len(docs) > self.limit
            docs = docs[: self.limit]
        else:
            docs, more = self._active_then_newest(store, query)
        key = lambda d: (float(d.get(self.sort) or 0), d["name"])  # noqa: E731
        return sorted(docs, key=key), more

    def rows(self, store: Store, docs: Iterable[dict[str, Any]] | None = None
             ) -> Iterator[dict[str, Any]]:
        """The rows shown (see session_row), in the order shown (of `docs`, when given)."""
        now = store.now()
        for doc in self.docs(store) if docs is None else docs:
            row = session_row(store, doc, now)
            if self.state is None or row["state"] == self.state:
                yield row

    def _every(self, store: Store, query: SessionQuery) -> Iterator[dict[str, Any]]:
        offset = 0
        while True:
            docs = store.list_sessions(query, sort=self.sort, descending=False,
                                       limit=PAGE_SIZE, offset=offset)
            yield from docs
            if len(docs) < PAGE_SIZE:
                return
            offset += PAGE_SIZE

    def _active_then_newest(self, store: Store, query: SessionQuery
                            ) -> tuple[list[dict[str, Any]], bool]:
        assert self.limit is not None
        active_statuses = [s for s in ACTIVE if query.status is None or s in query.status]
        active = store.list_sessions(replace(query, status=tuple(active_statuses)),
                                     sort=self.sort, limit=self.limit + 1
                                     ) if active_statuses else []
        if len(active) > self.limit:
            return active[: self.limit], True
        picked = {d["_id"]: d for d in active}
        newest = store.list_sessions(query, sort=self.sort, limit=self.limit + 1)
        for doc in newest:
            if len(picked) >= self.limit:
                break
            picked.setdefault(doc["_id"], doc)
        more = any(d["_id"] not in picked for d in newest)
        return list(picked.values()), more


def parse_since(text: str, now: float) -> float:
    """UNIX seconds of `--since`: an age (`90s`, `30m`, `2h`, `7d`) or an ISO date/time
    (`2026-12-01`, `2026-12-01T09:30`, UTC unless it says otherwise). ValueError if
    neither."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if found:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[found[2]]
        return now - float(found[1]) * unit
    try:
        when = _dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is neither an age (90s, 30m, 2h, 7d, 1w) nor an ISO "
                         "date (2026-12-01, 2026-12-01T09:30)") from None
    return (when if when.tzinfo else when.replace(tzinfo=_dt.UTC)).timestamp()


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
