"""The local store's SQLite database: schema, per-process connections, transactions, rows.

WAL mode and a busy timeout let several processes share the file; every write is a
`BEGIN IMMEDIATE` transaction, so a read-modify-write never deadlocks on a lock upgrade.
Documents are kept as JSON text (NaN allowed), with the queried fields in columns.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

from ptutils.errors import StoreError
from ptutils.store.base import StatPoint
from ptutils.store.curves import GRAIN

SCHEMA_VERSION = 2
"""Recorded in SQLite's `user_version`; a newer database is refused, not misread.
2: `statistic_grains` (summaries an older ptutils would not keep up to date)."""

BUSY_TIMEOUT_S = 60.0
"""How long a writer waits for another process's transaction before failing."""

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS sessions (
        id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, status TEXT, sweep TEXT,
        created REAL NOT NULL, doc TEXT NOT NULL, updated REAL)""",
    "ALTER_ADD_UPDATED",
    "CREATE INDEX IF NOT EXISTS sessions_status ON sessions(status, created)",
    "CREATE INDEX IF NOT EXISTS sessions_sweep ON sessions(sweep, created)",
    "CREATE INDEX IF NOT EXISTS sessions_created ON sessions(created, name)",
    "CREATE INDEX IF NOT EXISTS sessions_updated ON sessions(updated, name)",
    """CREATE TABLE IF NOT EXISTS session_tags (
        tag TEXT NOT NULL, session TEXT NOT NULL, PRIMARY KEY (tag, session)) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS session_tags_session ON session_tags(session)",
    """CREATE TABLE IF NOT EXISTS checkpoints (
        session TEXT NOT NULL, step INTEGER NOT NULL, kind TEXT NOT NULL,
        manifest BLOB NOT NULL, checksum TEXT NOT NULL, segments TEXT NOT NULL,
        size INTEGER NOT NULL, metrics TEXT NOT NULL, extra TEXT NOT NULL,
        created REAL NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('complete', 'deleting')),
        PRIMARY KEY (session, step, kind))""",
    """CREATE TABLE IF NOT EXISTS segment_refs (
        hash TEXT NOT NULL, session TEXT NOT NULL, step INTEGER NOT NULL, kind TEXT NOT NULL,
        PRIMARY KEY (hash, session, step, kind)) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS segment_refs_ckpt ON segment_refs(session, step, kind)",
    """CREATE TABLE IF NOT EXISTS statistics (
        session TEXT NOT NULL, phase TEXT NOT NULL, step INTEGER NOT NULL, name TEXT NOT NULL,
        value REAL, special TEXT, time REAL NOT NULL,
        PRIMARY KEY (session, phase, step, name)) WITHOUT ROWID""",
    # One series in step order, with its values (the table's key, phase included, is in
    # every index of a WITHOUT ROWID table): queries by name and curves read only this.
    "CREATE INDEX IF NOT EXISTS statistics_curve ON statistics(session, name, step, value)",
    "DROP INDEX IF EXISTS statistics_name",  # (session, name, step): the one above serves it
    """CREATE TABLE IF NOT EXISTS statistic_grains (
        session TEXT NOT NULL, phase TEXT NOT NULL, name TEXT NOT NULL, grain INTEGER NOT NULL,
        n INTEGER NOT NULL, finite INTEGER NOT NULL, first INTEGER NOT NULL,
        last INTEGER NOT NULL, ffirst INTEGER, flast INTEGER, low REAL, low_step INTEGER,
        high REAL, high_step INTEGER,
        PRIMARY KEY (session, phase, name, grain)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS chores (
        name TEXT PRIMARY KEY, last REAL NOT NULL) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS documents (
        kind TEXT NOT NULL, key TEXT NOT NULL, version INTEGER NOT NULL, body TEXT NOT NULL,
        PRIMARY KEY (kind, key)) WITHOUT ROWID""",
)

CKPT_COLUMNS = "session, step, kind, manifest, checksum, segments, size, metrics, extra, created"
"""The checkpoint columns `checkpoint_doc` reads, in its order."""

CKPT_KEY = "session = ? AND step = ? AND kind = ?"
"""Selects one checkpoint's rows (in `checkpoints` and `segment_refs`) by its key."""

STAT_COLUMNS = "session, phase, step, name, value, special, time"
"""The statistics columns `stat_rows` writes and `stat_doc` reads, in their order."""


class Database:
    """One SQLite file: a connection per process (a forked child opens its own)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self._init_schema()

    def write(self) -> AbstractContextManager[sqlite3.Connection]:
        """A transaction holding the write lock from the start (no upgrade deadlocks)."""
        return self._transaction("IMMEDIATE")

    def read(self) -> AbstractContextManager[sqlite3.Connection]:
        """A consistent read snapshot (no write lock)."""
        return self._transaction("DEFERRED")

    def close(self) -> None:
        """Close this process's connection (reopened on next use)."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    @contextmanager
    def _transaction(self, mode: str) -> Iterator[sqlite3.Connection]:
        with self._lock, sqlite_errors(self.path):
            conn = self._connection()
            conn.execute(f"BEGIN {mode}")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._conn = _connect(self.path)
        return self._conn

    def _init_schema(self) -> None:
        with self.write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} was written by a newer ptutils (schema {version}, this "
                    f"one reads {SCHEMA_VERSION}): upgrade ptutils to open it"
                )
            for stmt in _SCHEMA:
                if stmt == "ALTER_ADD_UPDATED":
                    _add_updated_column(conn)
                else:
                    conn.execute(stmt)
            if version < 2:
                backfill_grains(conn)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _add_updated_column(conn: sqlite3.Connection) -> None:
    """Give a database made before the `updated` column (listings filter and sort by it)
    that column, filled from each document."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(sessions)")}
    if "updated" in columns:
        return
    conn.execute("ALTER TABLE sessions ADD COLUMN updated REAL")
    rows = conn.execute("SELECT id, created, doc FROM sessions").fetchall()
    conn.executemany(
        "UPDATE sessions SET updated = ? WHERE id = ?",
        [(float(json.loads(doc).get("updated") or created), sid) for sid, created, doc in rows],
    )


def _connect(db_path: Path) -> sqlite3.Connection:
    with sqlite_errors(db_path):
        conn = sqlite3.connect(
            db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{db_path}: SQLite refused WAL mode ({mode}); use a local disk")
        conn.execute("PRAGMA synchronous = FULL")
    return conn


@contextmanager
def sqlite_errors(db_path: Path) -> Iterator[None]:
    """Turn SQLite failures into StoreError naming the database file."""
    try:
        yield
    except sqlite3.IntegrityError:
        raise
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise StoreError(
                f"{db_path} stayed locked by another process for {BUSY_TIMEOUT_S:.0f}s: {exc}"
            ) from exc
        raise StoreError(f"{db_path}: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        raise StoreError(
            f"{db_path} is not a usable ptutils store database ({exc}): move it away or pass "
            "another folder as --store"
        ) from exc


# --- values ---------------------------------------------------------------------------
def to_json(value: Any, what: str) -> str:
    """Compact JSON text (NaN allowed); `StoreError` naming `what` if it cannot be."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} is not JSON-serializable: {exc}") from exc


def plain_json(value: Any, what: str) -> Any:
    """`value` as it reads back from the database (a JSON round trip)."""
    return json.loads(to_json(value, what))


def as_text(value: Any) -> str:
    """An enum's value or the string itself (sqlite3 binds only plain str)."""
    return str(value.value) if isinstance(value, Enum) else str(value)


def where_sql(clauses: Sequence[str]) -> str:
    """The SQL ` WHERE a AND b` for the clauses, or "" for none."""
    return " WHERE " + " AND ".join(clauses) if clauses else ""


def in_clause(column: str, values: Sequence[Any]) -> str:
    """`column IN (?,?,...)` with one placeholder per value."""
    return f"{column} IN ({','.join('?' * len(values))})"


# --- sessions -------------------------------------------------------------------------
SESSION_COLUMNS = "id, name, status, sweep, created, doc, updated"
"""The sessions columns `session_row` fills, in its order."""


def session_row(doc: dict[str, Any], text: str) -> tuple[Any, ...]:
    """(id, name, status, sweep, created, doc, updated) of a session document and its
    JSON text."""
    status, sweep = doc.get("status"), doc.get("sweep")
    created = float(doc.get("created") or time.time())
    return (
        doc["_id"],
        doc["name"],
        None if status is None else str(status),
        None if sweep is None else str(sweep),
        created,
        text,
        float(doc.get("updated") or created),
    )


def session_where(query: Any) -> tuple[list[str], list[Any]]:
    """SQL conditions and arguments of a `SessionQuery` (each served by an index)."""
    where: list[str] = []
    args: list[Any] = []
    if query.name:
        where.append("name >= ? AND name < ?")  # a prefix, as a range of the name index
        args += [query.name, query.name + "\U0010ffff"]
    if query.status is not None:
        where.append(in_clause("status", query.status) if query.status else "0")
        args += [as_text(s) for s in query.status]
    if query.sweep is not None:
        where.append("sweep = ?")
        args.append(query.sweep)
    for tag in query.all_tags:
        where.append("id IN (SELECT session FROM session_tags WHERE tag = ?)")
        args.append(tag)
    if query.since is not None:
        where.append("updated >= ?")
        args.append(float(query.since))
    return where, args


def save_tags(conn: sqlite3.Connection, doc: dict[str, Any]) -> None:
    """Replace the session's rows in the tag index with its document's `tags`."""
    conn.execute("DELETE FROM session_tags WHERE session = ?", (doc["_id"],))
    tags = doc.get("tags") or []
    conn.executemany(
        "INSERT OR IGNORE INTO session_tags (tag, session) VALUES (?, ?)",
        [(str(t), doc["_id"]) for t in tags],
    )


def load_session(
    conn: sqlite3.Connection, ref: str, *, by_name: bool = True
) -> dict[str, Any] | None:
    """The session document with id `ref` (or else name `ref`), None if there is none."""
    row = conn.execute("SELECT doc FROM sessions WHERE id = ?", (ref,)).fetchone()
    if row is None and by_name:
        row = conn.execute("SELECT doc FROM sessions WHERE name = ?", (ref,)).fetchone()
    return None if row is None else json.loads(row[0])


def update_session_doc(
    conn: sqlite3.Connection, session_id: str, change: Callable[[dict[str, Any]], bool]
) -> None:
    """Apply `change` to the session's document in place and store it if it says it
    changed something (`updated` is left alone: this is not a state change). Inside the
    caller's write transaction; a missing session is left missing."""
    doc = load_session(conn, session_id, by_name=False)
    if doc is not None and change(doc):
        conn.execute("UPDATE sessions SET doc = ? WHERE id = ?",
                     (to_json(doc, "session document"), session_id))


def session_exists(conn: sqlite3.Connection, session_id: str) -> bool:
    """Whether a session with this id exists (no document decoded)."""
    return conn.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone() is not None


# --- checkpoints ----------------------------------------------------------------------
def checkpoint_doc(row: tuple[Any, ...]) -> dict[str, Any]:
    """The checkpoint document of a row selected as `CKPT_COLUMNS`."""
    session, step, kind, manifest, checksum, segments, size, metrics, extra, created = row
    return {
        **json.loads(extra),
        "session": session,
        "step": step,
        "kind": kind,
        "manifest": bytes(manifest),
        "checksum": checksum,
        "segments": [h for h, _ in json.loads(segments)],
        "size": size,
        "metrics": json.loads(metrics),
        "created": created,
    }


def insert_checkpoint(conn: sqlite3.Connection, doc: dict[str, Any], sizes: Sequence[int]) -> None:
    """Insert or replace a complete checkpoint row and its segment references.

    `sizes` are the byte lengths of `doc["segments"]`, in order.
    """
    key = (doc["session"], doc["step"], doc["kind"])
    conn.execute(
        f"INSERT OR REPLACE INTO checkpoints ({CKPT_COLUMNS}, state) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,'complete')",
        (
            *key,
            doc["manifest"],
            doc["checksum"],
            json.dumps([[h, n] for h, n in zip(doc["segments"], sizes)]),
            doc["size"],
            to_json(doc["metrics"], "checkpoint metrics"),
            "{}",
            doc["created"],
        ),
    )
    delete_refs(conn, *key)
    conn.executemany(
        "INSERT OR IGNORE INTO segment_refs (hash, session, step, kind) VALUES (?,?,?,?)",
        [(h, *key) for h in doc["segments"]],
    )


def ref_hashes(conn: sqlite3.Connection, session: str, step: int, kind: str) -> set[str]:
    """The segments one checkpoint references."""
    rows = conn.execute(
        f"SELECT hash FROM segment_refs WHERE {CKPT_KEY}", (session, step, kind)
    ).fetchall()
    return {r[0] for r in rows}


def delete_refs(conn: sqlite3.Connection, session: str, step: int, kind: str) -> None:
    """Drop one checkpoint's segment references."""
    conn.execute(f"DELETE FROM segment_refs WHERE {CKPT_KEY}", (session, step, kind))


def is_referenced(conn: sqlite3.Connection, digest: str) -> bool:
    """Whether any checkpoint row references the segment."""
    row = conn.execute("SELECT 1 FROM segment_refs WHERE hash = ? LIMIT 1", (digest,)).fetchone()
    return row is not None


# --- statistics -----------------------------------------------------------------------
def stat_rows(session_id: str, points: Iterable[Any]) -> list[tuple[Any, ...]]:
    """The statistics rows of the points; non-finite values go in `special` (SQLite
    stores NaN as NULL). One lean pass: a chunk writes hundreds, in the checkpoint
    writer's thread beside training."""
    rows = []
    append, isfinite = rows.append, math.isfinite
    for point in points:
        p = point if isinstance(point, StatPoint) else StatPoint(*point)
        phase = p.phase if type(p.phase) is str else as_text(p.phase)
        value = float(p.value)
        if isfinite(value):
            append((session_id, phase, int(p.step), p.name, value, None, float(p.time)))
        else:
            append((session_id, phase, int(p.step), p.name, None, repr(value), float(p.time)))
    return rows


def insert_many(conn: sqlite3.Connection, head: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """`head` VALUES (...),(...): the rows in statements of up to `ROWS_PER_INSERT` rows.

    One statement is one `sqlite3_step`, where `executemany` steps once per row, letting go
    of the GIL each time: in the checkpoint writer's thread, each of those hand-offs costs
    the training thread beside it a wake-up."""
    if not rows:
        return
    width = len(rows[0])
    one = "(" + ",".join("?" * width) + ")"
    for at in range(0, len(rows), ROWS_PER_INSERT):
        part = rows[at:at + ROWS_PER_INSERT]
        conn.execute(f"{head} VALUES {','.join([one] * len(part))}",
                     [v for row in part for v in row])


ROWS_PER_INSERT = 256
"""Rows of one multi-row INSERT (x 7 columns, well under SQLite's 32,766 parameters)."""


def stat_doc(row: tuple[Any, ...]) -> dict[str, Any]:
    """The point of a row selected as `STAT_COLUMNS`, non-finite values restored."""
    session, phase, step, name, value, special, at = row
    return {
        "session": session,
        "phase": phase,
        "step": step,
        "name": name,
        "value": float(special) if special is not None else value,
        "time": at,
    }


SERIES = "session = ? AND name = ? AND phase = ? AND step >= ? AND step <= ?"
"""Selects one series' rows in a step range (the `statistics_curve` index serves it)."""

GRAIN_COLUMNS = "grain, n, finite, first, last, ffirst, flast, low, low_step, high, high_step"
"""The `statistic_grains` columns of a `curves.Grain`, in its order."""

_EXTREME = ("(SELECT step FROM statistics WHERE session = ?1 AND name = ?3 AND phase = ?2 "
            "AND step >= ?5 AND step <= ?6 AND value IS NOT NULL ORDER BY value {}, step LIMIT 1)")

GRAIN_SQL = f"""
INSERT OR REPLACE INTO statistic_grains (session, phase, name, {GRAIN_COLUMNS})
SELECT ?1, ?2, ?3, ?4, COUNT(*), COUNT(value), MIN(step), MAX(step),
       MIN(CASE WHEN value IS NOT NULL THEN step END),
       MAX(CASE WHEN value IS NOT NULL THEN step END),
       MIN(value), {_EXTREME.format("ASC")}, MAX(value), {_EXTREME.format("DESC")}
FROM statistics WHERE session = ?1 AND name = ?3 AND phase = ?2 AND step >= ?5 AND step <= ?6
HAVING COUNT(*) > 0"""
"""Summarize one grain (session, phase, name, grain, first step, last step) from its
points; a grain left without points is deleted by `GRAIN_EMPTY_SQL`."""

GRAIN_EMPTY_SQL = """
DELETE FROM statistic_grains WHERE session = ?1 AND phase = ?2 AND name = ?3 AND grain = ?4
AND NOT EXISTS (SELECT 1 FROM statistics WHERE session = ?1 AND name = ?3 AND phase = ?2
                AND step >= ?5 AND step <= ?6)"""


def summarize_grains(conn: sqlite3.Connection, session_id: str,
                     keys: Iterable[tuple[str, str, int]]) -> None:
    """Summarize the (phase, name, grain) of a session again, in the caller's transaction."""
    rows = [(session_id, phase, name, g, g * GRAIN, (g + 1) * GRAIN - 1)
            for phase, name, g in sorted(set(keys))]
    conn.executemany(GRAIN_SQL, rows)
    conn.executemany(GRAIN_EMPTY_SQL, rows)


def backfill_grains(conn: sqlite3.Connection) -> None:
    """Summarize every grain of a database made before `statistic_grains`."""
    keys = conn.execute(
        f"SELECT DISTINCT session, phase, name, step / {GRAIN} FROM statistics").fetchall()
    for session_id, phase, name, g in keys:
        summarize_grains(conn, session_id, [(phase, name, g)])
