"""The embedded store: a folder holding an SQLite database and content-addressed segments.

Layout (mirrors the MongoDB data model of DESIGN §5):

    root/ptutils.db              sessions, checkpoints, statistics (SQLite, WAL mode)
    root/segments/<hh>/<hash>    State segments, named by their xxh3_128, written once

Several processes on one machine may share a folder: WAL + a busy timeout serialize the
writers, and every read-modify-write (CAS, checkpoint commit, delete) is one
`BEGIN IMMEDIATE` transaction. Segment files are only ever unlinked while holding that
write lock, and a checkpoint commit re-checks its segments under the same lock, so a
concurrent delete can never leave a committed checkpoint pointing at a missing file.
Not for network filesystems (SQLite's WAL needs shared memory).
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import xxhash

from ptutils.errors import (
    CheckpointCorrupt,
    CheckpointNotFound,
    CodecError,
    SessionExists,
    SessionNotFound,
    StoreError,
)
from ptutils.store import DEFAULT_STORE
from ptutils.store.base import StatPoint, Store

if TYPE_CHECKING:
    from ptutils.codec import Encoded, Segment

DB_NAME = "ptutils.db"
SEGMENTS_DIR = "segments"
SCHEMA_VERSION = 1
"""Recorded in SQLite's `user_version`; a newer database is refused, not misread."""

BUSY_TIMEOUT_S = 60.0
"""How long a writer waits for another process's transaction before failing."""

READ_BLOCK = 8 << 20
COMMIT_ATTEMPTS = 5
STALE_TEMP_S = 3600.0
"""A temp segment file older than this (or whose writer died) is a crash leftover."""

_HASH_RE = re.compile(r"^[0-9a-f]{32}$")
_TEMP_RE = re.compile(r"^\.([0-9a-f]{32})\.(\d+)\.[0-9a-f]+\.tmp$")
_CKPT_RESERVED = frozenset(
    "session step kind manifest checksum segments size created state bytes_written".split()
)
"""Checkpoint fields `update_checkpoint` may not change."""

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS sessions (
        id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, status TEXT, sweep TEXT,
        created REAL NOT NULL, doc TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS sessions_status ON sessions(status, created)",
    "CREATE INDEX IF NOT EXISTS sessions_sweep ON sessions(sweep, created)",
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
    "CREATE INDEX IF NOT EXISTS statistics_name ON statistics(session, name, step)",
)

_CKPT_COLUMNS = "session, step, kind, manifest, checksum, segments, size, metrics, extra, created"


class LocalStore(Store):
    """Sessions, checkpoints and statistics in a folder; safe to share between processes."""

    def __init__(self, root: str | os.PathLike[str] = DEFAULT_STORE) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)
        self.segments_dir = self.root / SEGMENTS_DIR
        self._db_path = self.root / DB_NAME
        self._lock = threading.RLock()
        self._conn_obj: sqlite3.Connection | None = None
        self._pid = os.getpid()
        _prepare_root(self.root)
        self._init_schema()

    def __repr__(self) -> str:
        return f"LocalStore({self.url!r})"

    # --- connection and transactions -----------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        """This process's connection (a forked child opens its own)."""
        if self._conn_obj is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._conn_obj = _connect(self._db_path)
        return self._conn_obj

    @contextmanager
    def _txn(self, mode: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
        """One transaction; IMMEDIATE takes the write lock up front (no upgrade deadlocks)."""
        with self._lock, _sqlite_errors(self._db_path):
            conn = self._conn()
            conn.execute(f"BEGIN {mode}")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _read(self) -> Any:
        """A consistent read snapshot (no write lock)."""
        return self._txn("DEFERRED")

    def _init_schema(self) -> None:
        with self._txn() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self._db_path} was written by a newer ptutils (schema {version}, this "
                    f"one reads {SCHEMA_VERSION}): upgrade ptutils to open it"
                )
            for stmt in _SCHEMA:
                conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        """Close this process's database connection (reopened on next use)."""
        with self._lock:
            if self._conn_obj is not None and self._pid == os.getpid():
                self._conn_obj.close()
            self._conn_obj = None

    # --- sessions ----------------------------------------------------------------------
    def create_session(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Insert a session document; `SessionExists` if the name is taken."""
        text = _dumps(doc, "session document")
        doc = json.loads(text)
        if not isinstance(doc.get("_id"), str) or not isinstance(doc.get("name"), str):
            raise StoreError("a session document needs string `_id` and `name` fields")
        with self._txn() as conn:
            row = conn.execute(
                "SELECT id FROM sessions WHERE name = ? OR id = ?", (doc["name"], doc["_id"])
            ).fetchone()
            if row is not None:
                raise SessionExists(
                    f"a session named {doc['name']!r} (or with id {doc['_id']}) already exists "
                    f"in {self.url}: pick another name, or resume that session"
                )
            conn.execute(
                "INSERT INTO sessions (id, name, status, sweep, created, doc) VALUES (?,?,?,?,?,?)",
                _session_row(doc, text),
            )
            _save_tags(conn, doc)
        return doc

    def get_session(self, ref: str) -> dict[str, Any]:
        """The session with this id, or else this name."""
        with self._read() as conn:
            doc = _load_session(conn, ref)
        if doc is None:
            raise SessionNotFound(f"no session with id or name {ref!r} in {self.url}")
        return doc

    def find_sessions(
        self,
        *,
        status: str | Sequence[str] | None = None,
        sweep: str | None = None,
        tag: str | None = None,
    ) -> list[dict[str, Any]]:
        """Sessions matching every given filter, oldest first."""
        where, args = [], []
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            args += [_text(s) for s in statuses]
        if sweep is not None:
            where.append("sweep = ?")
            args.append(sweep)
        if tag is not None:
            where.append("id IN (SELECT session FROM session_tags WHERE tag = ?)")
            args.append(tag)
        sql = "SELECT doc FROM sessions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._read() as conn:
            rows = conn.execute(sql + " ORDER BY created, rowid", args).fetchall()
        return [json.loads(r[0]) for r in rows]

    def cas_session(
        self, session_id: str, expect: dict[str, Any], update: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Atomically apply `update` if every `expect` field (dotted allowed) matches.

        A missing field, or a field under a None parent, compares as None. Returns None
        when the expectation fails or the session does not exist (a fenced task on a
        deleted session does nothing).
        """
        if "_id" in update:
            raise StoreError("cas_session cannot change a session's `_id`")
        expect = json.loads(_dumps(expect, "cas expectation"))
        update = json.loads(_dumps(update, "cas update"))
        with self._txn() as conn:
            doc = _load_session(conn, session_id, by_name=False)
            if doc is None or any(_get_path(doc, k) != v for k, v in expect.items()):
                return None
            for key, value in update.items():
                _set_path(doc, key, value)
            if "updated" not in update:
                doc["updated"] = time.time()
            text = _dumps(doc, "session document")
            try:
                conn.execute(
                    "UPDATE sessions SET id=?, name=?, status=?, sweep=?, created=?, doc=? "
                    "WHERE id=?",
                    (*_session_row(doc, text), session_id),
                )
            except sqlite3.IntegrityError as exc:
                raise SessionExists(f"a session named {doc['name']!r} already exists") from exc
            _save_tags(conn, doc)
        return json.loads(text)

    def delete_session(self, session_id: str) -> None:
        """Remove a session, its checkpoints, its unshared segments and its statistics.

        Idempotent: deleting a session that is already gone does nothing.
        """
        with self._read() as conn:
            keys = conn.execute(
                "SELECT step, kind FROM checkpoints WHERE session = ?", (session_id,)
            ).fetchall()
        for step, kind in keys:
            self.delete_checkpoint(session_id, step, kind)
        with self._txn() as conn:
            conn.execute("DELETE FROM statistics WHERE session = ?", (session_id,))
            conn.execute("DELETE FROM session_tags WHERE session = ?", (session_id,))
            conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))

    # --- checkpoints -------------------------------------------------------------------
    def put_checkpoint(
        self,
        session_id: str,
        step: int,
        kind: str,
        state: Any,
        *,
        metrics: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """Write new segments (verified), then insert or replace the checkpoint row."""
        from ptutils import codec

        self._require_session(session_id)
        encoded = codec.encode(state)
        written = self._store_segments(encoded.segments)
        for _ in range(COMMIT_ATTEMPTS):
            doc, missing = self._commit_checkpoint(
                session_id, int(step), _text(kind), encoded, metrics or {}
            )
            if doc is not None:
                doc["bytes_written"] = written
                return doc
            # A concurrent delete or garbage collection removed a segment we meant to reuse.
            written += self._store_segments(missing)
        raise StoreError(
            f"checkpoint {session_id} step {step}: segments kept disappearing while it was "
            f"committed ({COMMIT_ATTEMPTS} attempts); is something deleting files in {self.url}?"
        )

    def _require_session(self, session_id: str) -> None:
        with self._read() as conn:
            if _load_session(conn, session_id, by_name=False) is None:
                raise SessionNotFound(f"no session with id {session_id!r} in {self.url}")

    def _store_segments(self, segments: Iterable[Segment]) -> int:
        """Write every segment not already present; returns the bytes written."""
        written = 0
        for seg in segments:
            path = self._segment_path(seg.hash)
            if not _segment_present(path, seg.nbytes):
                self._write_segment(seg, path)
                written += seg.nbytes
        return written

    def _write_segment(self, seg: Segment, path: Path) -> None:
        """Temp file, fsync, re-read and verify, rename, fsync the folder."""
        folder = path.parent
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            _fsync_dir(folder.parent)
        _remove_stale_temps(folder, seg.hash)
        tmp = folder / f".{seg.hash}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "wb") as f:
                for chunk in seg.chunks():
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            digest, nbytes = _file_digest(tmp)
            if (digest, nbytes) != (seg.hash, seg.nbytes):
                raise StoreError(
                    f"segment {seg.hash} failed verification after writing {tmp}: read back "
                    f"{nbytes} bytes hashing to {digest}, expected {seg.nbytes} bytes; the disk "
                    "may be full or failing, or the state changed while it was being saved"
                )
            os.replace(tmp, path)
            _fsync_dir(folder)
        except OSError as exc:
            raise StoreError(f"cannot write segment {path}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)

    def _commit_checkpoint(
        self, session_id: str, step: int, kind: str, encoded: Encoded, metrics: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, list[Segment]]:
        """Insert the row if all segments are on disk (checked under the write lock)."""
        from ptutils import codec

        segments = encoded.segments
        hashes = [s.hash for s in segments]
        with self._txn() as conn:
            missing = [
                s for s in segments if not _segment_present(self._segment_path(s.hash), s.nbytes)
            ]
            if missing:
                return None, missing
            if (
                conn.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone()
                is None
            ):
                raise SessionNotFound(f"session {session_id} was deleted while checkpointing")
            old = _ref_hashes(conn, session_id, step, kind)
            doc = {
                "session": session_id,
                "step": step,
                "kind": kind,
                "manifest": bytes(encoded.manifest),
                "checksum": codec.checksum(encoded.manifest),
                "segments": hashes,
                "size": sum(s.nbytes for s in segments),
                "metrics": json.loads(_dumps(metrics, "checkpoint metrics")),
                "created": time.time(),
            }
            conn.execute(
                f"INSERT OR REPLACE INTO checkpoints ({_CKPT_COLUMNS}, state) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,'complete')",
                (
                    session_id,
                    step,
                    kind,
                    doc["manifest"],
                    doc["checksum"],
                    json.dumps([[s.hash, s.nbytes] for s in segments]),
                    doc["size"],
                    _dumps(doc["metrics"], "checkpoint metrics"),
                    "{}",
                    doc["created"],
                ),
            )
            _delete_refs(conn, session_id, step, kind)
            conn.executemany(
                "INSERT OR IGNORE INTO segment_refs (hash, session, step, kind) VALUES (?,?,?,?)",
                [(h, session_id, step, kind) for h in hashes],
            )
        if old - set(hashes):  # segments of a replaced manifest that nothing else uses
            with self._txn() as conn:
                self._unlink_unreferenced(conn, old - set(hashes))
        return doc, []

    def get_checkpoint(
        self, session_id: str, step: int | None = None, kind: str | None = None
    ) -> dict[str, Any]:
        """The complete checkpoint at `step` (latest if None), of `kind` if given."""
        sql = f"SELECT {_CKPT_COLUMNS} FROM checkpoints WHERE session = ? AND state = 'complete'"
        args: list[Any] = [session_id]
        if step is not None:
            sql += " AND step = ?"
            args.append(int(step))
        if kind is not None:
            sql += " AND kind = ?"
            args.append(_text(kind))
        with self._read() as conn:
            row = conn.execute(sql + " ORDER BY step DESC, created DESC LIMIT 1", args).fetchone()
        if row is None:
            what = "" if step is None else f" at step {step}"
            what += "" if kind is None else f" of kind {_text(kind)}"
            raise CheckpointNotFound(f"session {session_id} has no checkpoint{what}")
        return _ckpt_doc(row)

    def list_checkpoints(self, session_id: str) -> list[dict[str, Any]]:
        """Complete checkpoints by step then kind (without manifests; load_state fetches it)."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_CKPT_COLUMNS} FROM checkpoints WHERE session = ? AND state = 'complete'"
                " ORDER BY step, kind",
                (session_id,),
            ).fetchall()
        docs = [_ckpt_doc(r) for r in rows]
        for doc in docs:
            del doc["manifest"]
        return docs

    def load_state(self, checkpoint: dict[str, Any]) -> Any:
        """Decode a checkpoint's State, verifying every segment's checksum."""
        from ptutils import codec

        session, step, kind = checkpoint["session"], checkpoint["step"], checkpoint["kind"]
        where = f"checkpoint of session {session} at step {step} ({kind})"
        if checkpoint.get("manifest") is None:
            checkpoint = self.get_checkpoint(session, step, kind)
        manifest = checkpoint["manifest"]
        if checkpoint.get("checksum") not in (None, codec.checksum(manifest)):
            raise CheckpointCorrupt(f"{where}: its manifest fails its checksum")
        opened: list[str] = []

        def open_segment(digest: str) -> BinaryIO:
            opened.append(digest)
            path = self._segment_path(digest, where)
            try:
                return open(path, "rb")
            except FileNotFoundError:
                raise CheckpointCorrupt(f"{where}: segment {digest} is missing ({path})") from None

        try:
            return codec.decode(manifest, open_segment, verify=True)
        except (CodecError, OSError) as exc:
            msg = str(exc)
            if opened and not any(h in msg for h in opened):
                msg += f" (reading segment {opened[-1]})"
            raise CheckpointCorrupt(f"{where}: {msg}") from exc

    def update_checkpoint(
        self, session_id: str, step: int, kind: str, update: dict[str, Any]
    ) -> None:
        """Set `metrics` (or `metrics.name`) and extra fields of a complete checkpoint."""
        bad = sorted(k for k in update if k.split(".")[0] in _CKPT_RESERVED)
        if bad:
            raise StoreError(f"update_checkpoint cannot change {', '.join(bad)}")
        update = json.loads(_dumps(update, "checkpoint update"))
        key = (session_id, int(step), _text(kind))
        with self._txn() as conn:
            row = conn.execute(
                "SELECT metrics, extra FROM checkpoints WHERE session = ? AND step = ? "
                "AND kind = ? AND state = 'complete'",
                key,
            ).fetchone()
            if row is None:
                raise CheckpointNotFound(
                    f"session {key[0]} has no checkpoint at step {key[1]} ({key[2]})"
                )
            doc = {**json.loads(row[1]), "metrics": json.loads(row[0])}
            for k, v in update.items():
                _set_path(doc, k, v)
            metrics = doc.pop("metrics")
            conn.execute(
                "UPDATE checkpoints SET metrics = ?, extra = ? WHERE session = ? AND step = ? "
                "AND kind = ?",
                (_dumps(metrics, "metrics"), _dumps(doc, "checkpoint fields"), *key),
            )

    def delete_checkpoint(self, session_id: str, step: int, kind: str) -> None:
        """Mark deleting, then drop the row and the segments no other checkpoint uses."""
        key = (session_id, int(step), _text(kind))
        with self._txn() as conn:
            conn.execute(
                "UPDATE checkpoints SET state = 'deleting' WHERE session = ? AND step = ? "
                "AND kind = ?",
                key,
            )
        with self._txn() as conn:
            row = conn.execute(
                "SELECT state FROM checkpoints WHERE session = ? AND step = ? AND kind = ?", key
            ).fetchone()
            if row is None or row[0] != "deleting":
                return  # already gone, or written again since: the newer put wins
            hashes = _ref_hashes(conn, *key)
            _delete_refs(conn, *key)
            self._unlink_unreferenced(conn, hashes)
            conn.execute("DELETE FROM checkpoints WHERE session = ? AND step = ? AND kind = ?", key)

    def _unlink_unreferenced(self, conn: sqlite3.Connection, hashes: Iterable[str]) -> int:
        """Delete segment files no checkpoint row references (caller holds the write lock)."""
        removed = 0
        for digest in hashes:
            if conn.execute(
                "SELECT 1 FROM segment_refs WHERE hash = ? LIMIT 1", (digest,)
            ).fetchone():
                continue
            try:
                self._segment_path(digest).unlink()
                removed += 1
            except FileNotFoundError:
                pass
        return removed

    def collect_garbage(self, *, older_than: float = STALE_TEMP_S) -> int:
        """Remove crash leftovers: unreferenced segments and temp files older than `older_than`.

        Safe while other processes write: a put that meant to reuse a removed segment
        notices at commit time and writes it again. Returns the number of files removed.
        """
        cutoff = time.time() - older_than
        removed, candidates = 0, []
        for folder in sorted(p for p in self.segments_dir.iterdir() if p.is_dir()):
            removed += _remove_stale_temps(folder, None, cutoff)
            for path in folder.iterdir():
                if _HASH_RE.match(path.name) and _mtime(path) < cutoff:
                    candidates.append(path.name)
        for i in range(0, len(candidates), 500):
            with self._txn() as conn:
                removed += self._unlink_unreferenced(conn, candidates[i : i + 500])
        return removed

    def _segment_path(self, digest: str, where: str = "") -> Path:
        if not _HASH_RE.match(digest):
            raise CheckpointCorrupt(f"{where or 'checkpoint'}: invalid segment name {digest!r}")
        return self.segments_dir / digest[:2] / digest

    # --- statistics --------------------------------------------------------------------
    def write_statistics(self, session_id: str, points: Iterable[StatPoint]) -> int:
        """Upsert points on (session, phase, step, name) in one transaction."""
        rows = [_stat_row(session_id, p) for p in points]
        if rows:
            with self._txn() as conn:
                conn.executemany(
                    "INSERT OR REPLACE INTO statistics "
                    "(session, phase, step, name, value, special, time) VALUES (?,?,?,?,?,?,?)",
                    rows,
                )
        return len(rows)

    def delete_statistics(self, session_id: str, *, after_step: int) -> int:
        """Remove the session's points with step > after_step."""
        with self._txn() as conn:
            cur = conn.execute(
                "DELETE FROM statistics WHERE session = ? AND step > ?",
                (session_id, int(after_step)),
            )
            return cur.rowcount

    def query_statistics(
        self,
        session_id: str | Sequence[str] | None = None,
        *,
        name: str | None = None,
        phase: str | None = None,
        step_min: int | None = None,
        step_max: int | None = None,
    ) -> list[dict[str, Any]]:
        """Points matching every filter, ordered by session, step, name."""
        where, args = [], []
        if session_id is not None:
            ids = [session_id] if isinstance(session_id, str) else list(session_id)
            where.append(f"session IN ({','.join('?' * len(ids))})")
            args += ids
        for sql, value in (
            ("name = ?", name),
            ("phase = ?", phase),
            ("step >= ?", step_min),
            ("step <= ?", step_max),
        ):
            if value is not None:
                where.append(sql)
                args.append(_text(value) if isinstance(value, Enum) else value)
        sql = "SELECT session, phase, step, name, value, special, time FROM statistics"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._read() as conn:
            rows = conn.execute(sql + " ORDER BY session, step, name, phase", args).fetchall()
        return [
            {
                "session": s,
                "phase": ph,
                "step": st,
                "name": n,
                "value": float(sp) if sp is not None else v,
                "time": t,
            }
            for s, ph, st, n, v, sp, t in rows
        ]


# --- helpers ----------------------------------------------------------------------------
def _prepare_root(root: Path) -> None:
    """Create the folder, or say clearly why it cannot be a store."""
    if root.exists() and not root.is_dir():
        raise StoreError(
            f"local store path {root} is a file, not a folder: pass a folder (created if "
            "missing) or a mongodb:// URL as --store"
        )
    try:
        (root / SEGMENTS_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(
            f"cannot create the local store folder {root}: {exc.strerror or exc}; pass a "
            "folder you can write to as --store"
        ) from exc
    if not os.access(root, os.W_OK | os.X_OK) or not os.access(root / SEGMENTS_DIR, os.W_OK):
        raise StoreError(
            f"the local store folder {root} is not writable by this user: fix its "
            "permissions or pass another folder as --store"
        )


def _connect(db_path: Path) -> sqlite3.Connection:
    with _sqlite_errors(db_path):
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
def _sqlite_errors(db_path: Path) -> Iterator[None]:
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


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} is not JSON-serializable: {exc}") from exc


def _text(value: Any) -> str:
    """An enum's value or the string itself (sqlite3 binds only plain str)."""
    return str(value.value) if isinstance(value, Enum) else str(value)


def _get_path(doc: dict[str, Any], key: str) -> Any:
    """doc[a][b] for "a.b"; None when a level is missing or not a dict."""
    cur: Any = doc
    for part in key.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def _set_path(doc: dict[str, Any], key: str, value: Any) -> None:
    """doc[a][b] = value for "a.b", creating (or replacing non-dict) levels."""
    *parents, last = key.split(".")
    cur = doc
    for part in parents:
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            nxt = cur[part] = {}
        cur = nxt
    cur[last] = value


def _session_row(doc: dict[str, Any], text: str) -> tuple[Any, ...]:
    status, sweep = doc.get("status"), doc.get("sweep")
    return (
        doc["_id"],
        doc["name"],
        None if status is None else str(status),
        None if sweep is None else str(sweep),
        float(doc.get("created") or time.time()),
        text,
    )


def _save_tags(conn: sqlite3.Connection, doc: dict[str, Any]) -> None:
    conn.execute("DELETE FROM session_tags WHERE session = ?", (doc["_id"],))
    tags = doc.get("tags") or []
    conn.executemany(
        "INSERT OR IGNORE INTO session_tags (tag, session) VALUES (?, ?)",
        [(str(t), doc["_id"]) for t in tags],
    )


def _load_session(
    conn: sqlite3.Connection, ref: str, *, by_name: bool = True
) -> dict[str, Any] | None:
    row = conn.execute("SELECT doc FROM sessions WHERE id = ?", (ref,)).fetchone()
    if row is None and by_name:
        row = conn.execute("SELECT doc FROM sessions WHERE name = ?", (ref,)).fetchone()
    return None if row is None else json.loads(row[0])


def _ckpt_doc(row: tuple[Any, ...]) -> dict[str, Any]:
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


def _ref_hashes(conn: sqlite3.Connection, session: str, step: int, kind: str) -> set[str]:
    rows = conn.execute(
        "SELECT hash FROM segment_refs WHERE session = ? AND step = ? AND kind = ?",
        (session, step, kind),
    ).fetchall()
    return {r[0] for r in rows}


def _delete_refs(conn: sqlite3.Connection, session: str, step: int, kind: str) -> None:
    conn.execute(
        "DELETE FROM segment_refs WHERE session = ? AND step = ? AND kind = ?",
        (session, step, kind),
    )


def _stat_row(session_id: str, point: Any) -> tuple[Any, ...]:
    """A statistics row; non-finite values go in `special` (SQLite stores NaN as NULL)."""
    p = point if isinstance(point, StatPoint) else StatPoint(*point)
    value = float(p.value)
    finite = math.isfinite(value)
    return (
        session_id,
        _text(p.phase),
        int(p.step),
        p.name,
        value if finite else None,
        None if finite else repr(value),
        float(p.time),
    )


def _segment_present(path: Path, nbytes: int) -> bool:
    """A complete segment file: at its final name with the right size (temps never count)."""
    try:
        return path.stat().st_size == nbytes
    except FileNotFoundError:
        return False


def _file_digest(path: Path) -> tuple[str, int]:
    """xxh3_128 hex digest and length of a file, read back in blocks."""
    hasher = xxhash.xxh3_128()
    buf = bytearray(READ_BLOCK)
    view = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            hasher.update(view[:n])
            total += n
    return hasher.hexdigest(), total


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return math.inf


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(folder: Path, digest: str | None, cutoff: float | None = None) -> int:
    """Remove temp files (of `digest`, or all) whose writer died or that are too old."""
    cutoff = time.time() - STALE_TEMP_S if cutoff is None else cutoff
    removed = 0
    for path in folder.glob(f".{digest or '*'}.*.tmp"):
        m = _TEMP_RE.match(path.name)
        if m is None:
            continue
        if _mtime(path) < cutoff or not _pid_alive(int(m.group(2))):
            path.unlink(missing_ok=True)
            removed += 1
    return removed
