"""The Store interface: where sessions, checkpoints and statistics live.

Two backends implement it: `LocalStore` (a folder with SQLite + segment files) and
`MongoStore` (MongoDB collections + a GridFS bucket). The same contract tests run
against both (tests/test_store_contract.py).

Contract
--------
Sessions
  * A session document is a plain dict (see `SESSION_FIELDS`). `_id` is a string.
  * `create_session` fails with `SessionExists` when the name is taken.
  * `cas_session(id, expect, update)` applies `update` (a dict of top-level fields,
    dotted keys allowed for `lease.*`) only if every `expect` field equals the stored
    value; it returns the updated document, or None when the expectation failed.
    This is the fencing primitive: every task expects `step` and `token`.
  * Leases: `acquire_lease` succeeds when the session token matches and the lease is
    free, expired, or already held by the same worker; `renew_lease` only for the
    holder; `release_lease` only for the holder. Times are UNIX seconds (float) from
    the caller's clock (`now=`), so tests can drive expiry.

Checkpoints
  * `put_checkpoint` encodes the State (ptutils.codec), writes every segment that the
    store does not already hold (content addressed: a segment is named by its hash and
    written once), verifies what it wrote (length + checksum), and only then inserts
    the checkpoint document. A crash at any point leaves no visible checkpoint, or a
    complete one. Unique on (session, step, kind): writing it again replaces the
    manifest idempotently.
  * `load_state` reads segments, verifies each checksum, and raises
    `CheckpointCorrupt` naming session, step and segment on any mismatch.
  * `delete_checkpoint` is two-phase and idempotent: mark the document deleting,
    delete segments no other checkpoint references, delete the document. Deleting
    something already gone is success. A segment referenced by another checkpoint is
    never deleted.
  * `mark_corrupt` flags a checkpoint that failed to load (`corrupt: {reason, time,
    segments}`) and drops the data of its bad segments, so that writing the same State
    again stores them afresh (and clears the flag) instead of reusing rotten bytes.

Housekeeping
  * `collect_garbage(older_than=s)` removes crash leftovers older than `s` seconds:
    unreferenced segments, stale upload registrations or temp files, unfinished
    deletions. Idempotent, and safe next to running writers (a put in progress is
    never robbed of a segment it is about to reference).
  * `claim_periodic(name, every)` is True for one caller per `every` seconds across
    every process sharing the store: it throttles housekeeping that Save triggers.

Documents
  * `get_document` / `put_document(kind, key, body, version=)` keep small JSON records
    (a search's asks, tells and decisions) with a version: `put_document` is a
    compare-and-set on it, so two drivers never both win the same update.

Statistics
  * Points are `(phase, step, name, value)` with a time. Writes are batched and
    idempotent on (session, phase, step, name): writing a point again overwrites it.
  * `delete_statistics(session, after_step=s)` removes points with step > s (used when
    a chunk restarts from s, so a lost attempt's points are replaced, not duplicated).
  * `statistic_buckets(session, phase, name, buckets, start=, end=)` returns one
    statistic downsampled by the store (ptutils.store.curves: min and max per bucket
    of steps, the same buckets on every backend), reading only what it needs.
  * Both keep the session's `summary` (ptutils.store.summary: last train loss, last eval
    metrics, newest point time) with one extra update per call, so listings need no
    statistics query.

Listing
  * `list_sessions(query, sort=, descending=, limit=, offset=)`: a page of the sessions
    matching a `SessionQuery` (name prefix, tags, sweep, search, statuses, updated
    since), sorted by `created` or `updated` (ties by name), every filter and sort served
    by an index; `count_sessions(query)` counts them. `ptutils status` and the
    dashboard list through these.
"""

from __future__ import annotations

import abc
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ptutils.store.curves import Curve, check_request, from_points

GC_GRACE_S = 3600.0
"""Garbage collection leaves segments, uploads and unreferenced files younger than this
alone: a writer in progress may be about to reference them."""

_EVENT_ATTEMPTS = 20


class SessionStatus(StrEnum):
    """Lifecycle of a stored session; serializes as its value."""

    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    @property
    def finished(self) -> bool:
        return self in (SessionStatus.COMPLETED, SessionStatus.FAILED, SessionStatus.CANCELLED)


class CheckpointKind(StrEnum):
    """Why a checkpoint was written."""

    CHUNK = "chunk"
    PREEMPT = "preempt"
    BEST = "best"
    FINAL = "final"
    INIT = "init"
    """A warm start's step 0 (`init:`): the seeded session with weights loaded into its
    network. Retention always keeps it."""

    def __str__(self) -> str:
        return self.value


SESSION_FIELDS = (
    "_id",
    "name",
    "config",
    "config_hash",
    "status",
    "step",
    "total_steps",
    "token",
    "lease",
    "checkpoint",
    "attempts",
    "error",
    "created",
    "updated",
    "tags",
    "sweep",
    "meta",
    "events",
    "init",
    "summary",
)
"""Top-level fields of a session document. `lease` is {"worker", "expires"} or None;
`checkpoint` is {"step", "kind"} of the latest complete checkpoint or None; `events` is
the recent history of what happened to the session ({time, kind, message}, newest last);
`init` (warm starts only, see ptutils.warmstart) records where step 0 came from;
`summary` is what a listing shows of its statistics (ptutils.store.summary), kept by
`write_statistics`."""

EVENTS_KEPT = 100
"""A session document keeps its last this many events."""


def new_id() -> str:
    """A fresh session or token id (32 hex chars)."""
    return uuid.uuid4().hex


def new_session_doc(
    name: str,
    config: dict[str, Any],
    config_hash: str,
    total_steps: int,
    *,
    tags: Sequence[str] = (),
    sweep: str | None = None,
    status: SessionStatus = SessionStatus.QUEUED,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A session document ready for `Store.create_session`."""
    now = time.time()
    return {
        "_id": new_id(),
        "name": name,
        "config": config,
        "config_hash": config_hash,
        "status": str(status),
        "step": 0,
        "total_steps": int(total_steps),
        "token": new_id(),
        "lease": None,
        "checkpoint": None,
        "attempts": 0,
        "error": None,
        "created": now,
        "updated": now,
        "tags": list(tags),
        "sweep": sweep,
        "meta": dict(meta or {}),
        "events": [],
        "summary": {"complete": True},
    }


def event(kind: str, message: str, now: float) -> dict[str, Any]:
    """One entry of a session's `events`."""
    return {"time": float(now), "kind": str(kind), "message": str(message)}


def with_event(doc: dict[str, Any], entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The session's `events` with `entry` appended, bounded to the last EVENTS_KEPT."""
    return [*(doc.get("events") or []), entry][-EVENTS_KEPT:]


SESSION_SORTS = ("created", "updated")
"""Fields `Store.list_sessions` sorts by (each indexed on both backends)."""

LISTING_OMITS = ("events", "code")
"""Session fields `Store.list_sessions` leaves out: a listing never shows them, and they
are the bulk of a document (the last 100 events, the session's own .py files)."""


@dataclass(frozen=True)
class SessionQuery:
    """Filters of `Store.list_sessions` / `count_sessions`; every one given must hold.

    `name`: a name prefix; `tags`: tags the session has (all of them); `search`: the
    sessions of this search (its tag `search:NAME`); `status`: stored statuses;
    `since`: `updated` at or after this time (UNIX seconds).
    """

    name: str | None = None
    tags: tuple[str, ...] = ()
    sweep: str | None = None
    search: str | None = None
    status: tuple[str, ...] | None = None
    since: float | None = None

    @property
    def all_tags(self) -> tuple[str, ...]:
        return (*self.tags, *((f"search:{self.search}",) if self.search else ()))


def check_page(sort: str, limit: int | None, offset: int) -> None:
    """`StoreError` naming a sort field that is not indexed, or a negative page."""
    from ptutils.errors import StoreError

    if sort not in SESSION_SORTS:
        raise StoreError(f"sessions sort by one of {', '.join(SESSION_SORTS)}, not {sort!r}")
    if (limit is not None and limit < 0) or offset < 0:
        raise StoreError(f"a page needs limit >= 0 and offset >= 0 (got {limit}, {offset})")


@dataclass(frozen=True)
class StatPoint:
    """One statistic value of a session at a step."""

    phase: str
    step: int
    name: str
    value: float
    time: float = field(default_factory=time.time)


class Store(abc.ABC):
    """Sessions, checkpoints and statistics. Backends: local folder, MongoDB."""

    url: str  # how the store was opened, with any password removed

    # --- sessions -------------------------------------------------------------------
    @abc.abstractmethod
    def create_session(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Insert a new session document; `SessionExists` if its name is taken."""

    @abc.abstractmethod
    def get_session(self, ref: str) -> dict[str, Any]:
        """The session with this id or name; `SessionNotFound` otherwise."""

    @abc.abstractmethod
    def find_sessions(
        self,
        *,
        status: str | Sequence[str] | None = None,
        sweep: str | None = None,
        tag: str | None = None,
    ) -> list[dict[str, Any]]:
        """Sessions matching every given filter, oldest first."""

    @abc.abstractmethod
    def list_sessions(
        self,
        query: SessionQuery = SessionQuery(),
        *,
        sort: str = "created",
        descending: bool = True,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """A page of the sessions matching `query`, sorted by `sort` (one of
        SESSION_SORTS; ties by name) and without the LISTING_OMITS fields: one indexed
        query, whatever the number of sessions (`status`, the dashboard)."""

    @abc.abstractmethod
    def count_sessions(self, query: SessionQuery = SessionQuery()) -> int:
        """How many sessions match `query`."""

    @abc.abstractmethod
    def cas_session(
        self, session_id: str, expect: dict[str, Any], update: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Set `update` if all `expect` fields match; the new doc, or None if they did not.

        `updated` is set to the current time on success. Dotted keys in `update`
        (`lease.expires`) set nested fields.
        """

    @abc.abstractmethod
    def delete_session(self, session_id: str) -> None:
        """Remove a session, its checkpoints, unreferenced segments and statistics."""

    def now(self) -> float:
        """The store's clock (seconds since the epoch): leases are judged by it, not by
        the clock of the worker or reconciler asking. Backends with a server override it."""
        return time.time()

    def acquire_lease(
        self, session_id: str, token: str, worker: str, ttl: float, *, now: float | None = None,
        also: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Take the lease for `worker` if the token matches and the lease is free or expired;
        `also`: fields set in the same compare-and-set (a Train task's attempt count and
        status: one write instead of two)."""
        now = self.now() if now is None else now
        doc = self.get_session(session_id)
        if doc.get("token") != token:
            return None
        lease = doc.get("lease")
        if lease and lease.get("worker") != worker and float(lease.get("expires", 0)) > now:
            return None
        # The lease is identified by its holder and expiry, not compared whole: it may
        # carry more fields (`devices`), and a subdocument match depends on field order.
        held = (
            {"lease.worker": lease.get("worker"), "lease.expires": lease.get("expires")}
            if lease
            else {"lease": None}
        )
        return self.cas_session(
            session_id,
            {"token": token, **held},
            {"lease": {"worker": worker, "expires": now + ttl}, **(also or {})},
        )

    def renew_lease(
        self, session_id: str, worker: str, ttl: float, *, now: float | None = None
    ) -> bool:
        """Extend the lease held by `worker`; False if it no longer holds it."""
        now = self.now() if now is None else now
        return (
            self.cas_session(session_id, {"lease.worker": worker}, {"lease.expires": now + ttl})
            is not None
        )

    def release_lease(self, session_id: str, worker: str) -> bool:
        """Drop the lease held by `worker`; False if it did not hold it."""
        return self.cas_session(session_id, {"lease.worker": worker}, {"lease": None}) is not None

    def add_event(self, session_id: str, kind: str, message: str) -> dict[str, Any] | None:
        """Append an event to the session's `events` (compare-and-set on `updated`).

        Returns the new document, or None if the session does not exist.
        """
        from ptutils.errors import SessionNotFound, StoreError

        entry = event(kind, message, self.now())
        for _ in range(_EVENT_ATTEMPTS):
            try:
                doc = self.get_session(session_id)
            except SessionNotFound:
                return None
            new = self.cas_session(
                session_id, {"updated": doc.get("updated")}, {"events": with_event(doc, entry)}
            )
            if new is not None:
                return new
        raise StoreError(
            f"session {session_id} changed {_EVENT_ATTEMPTS} times while an event was added "
            f"to it ({kind}: {message})"
        )

    # --- checkpoints ----------------------------------------------------------------
    @abc.abstractmethod
    def put_checkpoint(
        self,
        session_id: str,
        step: int,
        kind: str,
        state: Any,
        *,
        metrics: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """Write segments (new ones only), verify, then insert the checkpoint document.

        Returns the checkpoint document, which includes `bytes_written` (bytes of new
        segments this call stored) and `size` (total bytes of the state's segments).
        """

    @abc.abstractmethod
    def get_checkpoint(
        self, session_id: str, step: int | None = None, kind: str | None = None
    ) -> dict[str, Any]:
        """The checkpoint at `step` (latest if None), of `kind` if given.

        Documents being deleted are never returned. `CheckpointNotFound` otherwise.
        """

    @abc.abstractmethod
    def list_checkpoints(self, session_id: str) -> list[dict[str, Any]]:
        """Complete checkpoints of a session, by step then kind."""

    @abc.abstractmethod
    def load_state(self, checkpoint: dict[str, Any]) -> Any:
        """Decode the State of a checkpoint document; `CheckpointCorrupt` on bad data."""

    @abc.abstractmethod
    def update_checkpoint(
        self, session_id: str, step: int, kind: str, update: dict[str, Any]
    ) -> None:
        """Set fields (metrics, kind tags) on an existing checkpoint document."""

    @abc.abstractmethod
    def delete_checkpoint(self, session_id: str, step: int, kind: str) -> None:
        """Two-phase, idempotent delete; shared segments survive."""

    @abc.abstractmethod
    def bad_segments(self, checkpoint: dict[str, Any]) -> list[str]:
        """Segments of the checkpoint that are missing or fail their checksum (each read)."""

    @abc.abstractmethod
    def drop_segments(self, digests: Iterable[str]) -> int:
        """Delete the data of these segments whoever references them (they are rotten);
        the number removed. A later put of the same content writes them afresh."""

    def mark_corrupt(self, checkpoint: dict[str, Any], reason: str) -> list[str]:
        """Flag a checkpoint that fails to load, drop its rotten segments; their hashes.

        The flag (`corrupt: {reason, time, segments}`) keeps it from being loaded or
        kept again; writing the same (session, step, kind) later replaces it unflagged.
        """
        from ptutils.errors import CheckpointNotFound

        bad = self.bad_segments(checkpoint)
        self.drop_segments(bad)
        flag = {"reason": str(reason), "time": self.now(), "segments": bad}
        try:
            self.update_checkpoint(
                checkpoint["session"], checkpoint["step"], checkpoint["kind"], {"corrupt": flag}
            )
        except CheckpointNotFound:
            pass  # deleted meanwhile: nothing left to flag
        return bad

    def checkpoint_problem(self, checkpoint: dict[str, Any]) -> str | None:
        """Why the checkpoint cannot be loaded (its flag, its manifest, its segments, each
        read and hashed), or None if it is intact."""
        from ptutils import codec

        flag = checkpoint.get("corrupt")
        if flag:
            return f"marked corrupt: {flag.get('reason', '?')}"
        full = checkpoint
        if full.get("manifest") is None:
            full = self.get_checkpoint(checkpoint["session"], checkpoint["step"],
                                       checkpoint["kind"])  # fmt: skip
        if full.get("checksum") not in (None, codec.checksum(bytes(full["manifest"]))):
            return "its manifest fails its checksum"
        bad = self.bad_segments(full)
        if bad:
            return f"segment(s) {', '.join(bad)} missing or failing their checksum"
        return None

    def load_latest_state(
        self, session_id: str, *, max_step: int | None = None
    ) -> tuple[dict[str, Any], Any] | None:
        """(checkpoint, state) of the newest checkpoint that decodes, newest first.

        A corrupt checkpoint (flagged, or failing to decode) is skipped: falls back to the
        previous complete one. None if there is none.
        """
        from ptutils.errors import CheckpointCorrupt

        cands = [
            c
            for c in self.list_checkpoints(session_id)
            if (max_step is None or c["step"] <= max_step) and not c.get("corrupt")
        ]
        cands.sort(key=lambda c: (c["step"], c.get("created", 0)), reverse=True)
        last_error: Exception | None = None
        for ckpt in cands:
            try:
                return ckpt, self.load_state(ckpt)
            except CheckpointCorrupt as exc:
                last_error = exc
                continue
        if last_error is not None:
            raise last_error
        return None

    # --- statistics -----------------------------------------------------------------
    @abc.abstractmethod
    def write_statistics(self, session_id: str, points: Iterable[StatPoint]) -> int:
        """Upsert points idempotently on (session, phase, step, name); returns count."""

    @abc.abstractmethod
    def delete_statistics(self, session_id: str, *, after_step: int) -> int:
        """Remove points with step > after_step; returns how many."""

    @abc.abstractmethod
    def query_statistics(
        self,
        session_id: str | Sequence[str] | None = None,
        *,
        name: str | None = None,
        phase: str | None = None,
        step_min: int | None = None,
        step_max: int | None = None,
    ) -> list[dict[str, Any]]:
        """Points as dicts {session, phase, step, name, value, time}, by session, step, name."""

    def statistic_buckets(
        self,
        session_id: str,
        phase: str,
        name: str,
        buckets: int,
        *,
        start: int | None = None,
        end: int | None = None,
    ) -> Curve:
        """One statistic between steps `start` and `end` (inclusive; None: unbounded),
        min/max-downsampled to at most `buckets` buckets (ptutils.store.curves).

        A backend's `_summarized_curve` answers from summaries it keeps; without them
        (a backend that keeps none, a series written before them) every point of the
        range is read.
        """
        check_request(buckets, start, end)
        found = self._summarized_curve(session_id, phase, name, buckets, start, end)
        if found is not None:
            return found
        points = self.query_statistics(session_id, phase=phase, name=name,
                                       step_min=start, step_max=end)
        return from_points(points, buckets)

    def _summarized_curve(self, session_id: str, phase: str, name: str, buckets: int,
                          start: int | None, end: int | None) -> Curve | None:
        """`statistic_buckets` (arguments checked) from the backend's summaries; None
        where it has none for this series."""
        return None

    def statistic_series(self, session_id: str) -> list[tuple[str, str]]:
        """(phase, name) of every statistic the session has, sorted.

        This fallback reads every point; backends read their per-series summaries.
        """
        return sorted({(p["phase"], p["name"]) for p in self.query_statistics(session_id)})

    # --- documents (search state and other small records) ---------------------------
    @abc.abstractmethod
    def get_document(self, kind: str, key: str) -> dict[str, Any] | None:
        """The small JSON document (`kind`, `key`) as `{"version": n, "body": {...}}`, or
        None. Used for state that is not a session's (a search: ptutils.search)."""

    @abc.abstractmethod
    def put_document(
        self, kind: str, key: str, body: dict[str, Any], *, version: int | None
    ) -> dict[str, Any] | None:
        """Compare-and-set: write `body` if the stored version is `version` (None: only
        if there is no such document); the new `{"version": version + 1 (or 1), "body"}`,
        or None when the expectation failed. `body` must be JSON-serializable."""

    @abc.abstractmethod
    def list_documents(self, kind: str) -> list[str]:
        """The keys of the documents of `kind`, sorted."""

    @abc.abstractmethod
    def delete_document(self, kind: str, key: str) -> None:
        """Remove a document; idempotent."""

    # --- housekeeping ---------------------------------------------------------------
    @abc.abstractmethod
    def collect_garbage(self, *, older_than: float = GC_GRACE_S) -> int:
        """Remove crash leftovers older than `older_than` seconds; the number removed."""

    @abc.abstractmethod
    def claim_periodic(self, name: str, every: float, *, now: float | None = None) -> bool:
        """True if chore `name` last ran (was claimed) `every` seconds ago or never:
        it is then claimed for this caller. At most one caller per period wins."""

    # --- lifecycle ------------------------------------------------------------------
    def close(self) -> None:
        """Release connections and files."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def iter_sessions(self) -> Iterator[dict[str, Any]]:
        yield from self.find_sessions()
