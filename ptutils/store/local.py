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

The database lives in `sqlite_db`, the segment files in `segment_files`; this module
keeps the two consistent.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ptutils.errors import (
    CheckpointCorrupt,
    CheckpointNotFound,
    CodecError,
    SessionExists,
    SessionNotFound,
    StoreError,
)
from ptutils.store import DEFAULT_STORE, curves, summary
from ptutils.store import sqlite_db as db
from ptutils.store.base import LISTING_OMITS, SessionQuery, StatPoint, Store, check_page
from ptutils.store.curves import Curve
from ptutils.store.document import get_path, set_path
from ptutils.store.segment_files import READ_BLOCK, STALE_TEMP_S, SegmentFiles
from ptutils.store.sqlite_db import BUSY_TIMEOUT_S, SCHEMA_VERSION, Database

if TYPE_CHECKING:
    import numpy as np

    from ptutils.codec import Encoded, Segment

__all__ = [
    "BUSY_TIMEOUT_S",
    "COMMIT_ATTEMPTS",
    "DB_NAME",
    "READ_BLOCK",
    "SCHEMA_VERSION",
    "SEGMENTS_DIR",
    "STALE_TEMP_S",
    "LocalStore",
]

DB_NAME = "ptutils.db"
SEGMENTS_DIR = "segments"
COMMIT_ATTEMPTS = 5
"""How often a checkpoint commit re-writes segments deleted under it before giving up."""

_CKPT_RESERVED = frozenset(
    "session step kind manifest checksum segments size created state bytes_written".split()
)
"""Checkpoint fields `update_checkpoint` may not change."""

_GC_BATCH = 500
"""Segments checked per write transaction by `collect_garbage` (short lock holds)."""


class LocalStore(Store):
    """Sessions, checkpoints and statistics in a folder; safe to share between processes."""

    def __init__(self, root: str | os.PathLike[str] = DEFAULT_STORE) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)
        self.segments_dir = self.root / SEGMENTS_DIR
        _prepare_root(self.root)
        self._segments = SegmentFiles(self.segments_dir)
        self._db = Database(self.root / DB_NAME)

    def __repr__(self) -> str:
        return f"LocalStore({self.url!r})"

    @property
    def segment_syncs(self) -> int:
        """Sync calls (syncfs, or fsync where it is missing) that this object's
        checkpoint writes made for segment files; each put adds at most 2 on Linux."""
        return self._segments.syncs

    def close(self) -> None:
        """Close this process's database connection (reopened on next use)."""
        self._db.close()

    # --- sessions ----------------------------------------------------------------------
    def create_session(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Insert a session document; `SessionExists` if the name is taken."""
        text = db.to_json(doc, "session document")
        doc = json.loads(text)
        if not isinstance(doc.get("_id"), str) or not isinstance(doc.get("name"), str):
            raise StoreError("a session document needs string `_id` and `name` fields")
        with self._db.write() as conn:
            row = conn.execute(
                "SELECT id FROM sessions WHERE name = ? OR id = ?", (doc["name"], doc["_id"])
            ).fetchone()
            if row is not None:
                raise SessionExists(
                    f"a session named {doc['name']!r} (or with id {doc['_id']}) already exists "
                    f"in {self.url}: pick another name, or resume that session"
                )
            conn.execute(
                f"INSERT INTO sessions ({db.SESSION_COLUMNS}) VALUES (?,?,?,?,?,?,?)",
                db.session_row(doc, text),
            )
            db.save_tags(conn, doc)
        return doc

    def get_session(self, ref: str) -> dict[str, Any]:
        """The session with this id, or else this name."""
        with self._db.read() as conn:
            doc = db.load_session(conn, ref)
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
            where.append(db.in_clause("status", statuses))
            args += [db.as_text(s) for s in statuses]
        if sweep is not None:
            where.append("sweep = ?")
            args.append(sweep)
        if tag is not None:
            where.append("id IN (SELECT session FROM session_tags WHERE tag = ?)")
            args.append(tag)
        sql = "SELECT doc FROM sessions" + db.where_sql(where) + " ORDER BY created, rowid"
        with self._db.read() as conn:
            rows = conn.execute(sql, args).fetchall()
        return [json.loads(r[0]) for r in rows]

    def list_sessions(
        self,
        query: SessionQuery = SessionQuery(),
        *,
        sort: str = "created",
        descending: bool = True,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """A page of matching sessions by `sort` (indexed), without LISTING_OMITS."""
        check_page(sort, limit, offset)
        where, args = db.session_where(query)
        order = "DESC" if descending else "ASC"
        sql = (f"SELECT doc FROM sessions{db.where_sql(where)} ORDER BY {sort} {order}, "
               f"name {order} LIMIT ? OFFSET ?")
        with self._db.read() as conn:
            rows = conn.execute(sql, [*args, -1 if limit is None else limit, offset]).fetchall()
        docs = [json.loads(r[0]) for r in rows]
        for doc in docs:
            for key in LISTING_OMITS:
                doc.pop(key, None)
        return docs

    def count_sessions(self, query: SessionQuery = SessionQuery()) -> int:
        where, args = db.session_where(query)
        with self._db.read() as conn:
            return int(conn.execute(f"SELECT count(*) FROM sessions{db.where_sql(where)}",
                                    args).fetchone()[0])

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
        expect = db.plain_json(expect, "cas expectation")
        update = db.plain_json(update, "cas update")
        with self._db.write() as conn:
            doc = db.load_session(conn, session_id, by_name=False)
            if doc is None or any(get_path(doc, k) != v for k, v in expect.items()):
                return None
            for key, value in update.items():
                set_path(doc, key, value)
            if "updated" not in update:
                doc["updated"] = time.time()
            text = db.to_json(doc, "session document")
            try:
                conn.execute(
                    "UPDATE sessions SET id=?, name=?, status=?, sweep=?, created=?, doc=?, "
                    "updated=? WHERE id=?",
                    (*db.session_row(doc, text), session_id),
                )
            except sqlite3.IntegrityError as exc:
                raise SessionExists(f"a session named {doc['name']!r} already exists") from exc
            db.save_tags(conn, doc)
        return json.loads(text)

    def delete_session(self, session_id: str) -> None:
        """Remove a session, its checkpoints, its unshared segments and its statistics.

        Idempotent: deleting a session that is already gone does nothing.
        """
        with self._db.read() as conn:
            keys = conn.execute(
                "SELECT step, kind FROM checkpoints WHERE session = ?", (session_id,)
            ).fetchall()
        for step, kind in keys:
            self.delete_checkpoint(session_id, step, kind)
        with self._db.write() as conn:
            conn.execute("DELETE FROM statistics WHERE session = ?", (session_id,))
            conn.execute("DELETE FROM statistic_grains WHERE session = ?", (session_id,))
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
                session_id, int(step), db.as_text(kind), encoded, metrics or {}
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
        with self._db.read() as conn:
            if not db.session_exists(conn, session_id):
                raise SessionNotFound(f"no session with id {session_id!r} in {self.url}")

    def _store_segments(self, segments: Iterable[Segment]) -> int:
        """Write every segment not already present; returns the bytes written."""
        return self._segments.write_missing(segments)

    def _commit_checkpoint(
        self, session_id: str, step: int, kind: str, encoded: Encoded, metrics: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, list[Segment]]:
        """Insert the row if all segments are on disk (checked under the write lock)."""
        from ptutils import codec

        segments = encoded.segments
        doc = {
            "session": session_id,
            "step": step,
            "kind": kind,
            "manifest": bytes(encoded.manifest),
            "checksum": codec.checksum(encoded.manifest),
            "segments": [s.hash for s in segments],
            "size": sum(s.nbytes for s in segments),
            "metrics": db.plain_json(metrics, "checkpoint metrics"),
        }
        with self._db.write() as conn:
            missing = self._segments.missing(segments)
            if missing:
                return None, missing
            if not db.session_exists(conn, session_id):
                raise SessionNotFound(f"session {session_id} was deleted while checkpointing")
            replaced = db.ref_hashes(conn, session_id, step, kind) - set(doc["segments"])
            doc["created"] = time.time()
            db.insert_checkpoint(conn, doc, [s.nbytes for s in segments])
        if replaced:  # segments of a replaced manifest that nothing else uses
            with self._db.write() as conn:
                self._unlink_unreferenced(conn, replaced)
        return doc, []

    def get_checkpoint(
        self, session_id: str, step: int | None = None, kind: str | None = None
    ) -> dict[str, Any]:
        """The complete checkpoint at `step` (latest if None), of `kind` if given."""
        sql = f"SELECT {db.CKPT_COLUMNS} FROM checkpoints WHERE session = ? AND state = 'complete'"
        args: list[Any] = [session_id]
        if step is not None:
            sql += " AND step = ?"
            args.append(int(step))
        if kind is not None:
            sql += " AND kind = ?"
            args.append(db.as_text(kind))
        with self._db.read() as conn:
            row = conn.execute(sql + " ORDER BY step DESC, created DESC LIMIT 1", args).fetchone()
        if row is None:
            what = "" if step is None else f" at step {step}"
            what += "" if kind is None else f" of kind {db.as_text(kind)}"
            raise CheckpointNotFound(f"session {session_id} has no checkpoint{what}")
        return db.checkpoint_doc(row)

    def list_checkpoints(self, session_id: str) -> list[dict[str, Any]]:
        """Complete checkpoints by step then kind (without manifests; load_state fetches it)."""
        with self._db.read() as conn:
            rows = conn.execute(
                f"SELECT {db.CKPT_COLUMNS} FROM checkpoints "
                "WHERE session = ? AND state = 'complete' ORDER BY step, kind",
                (session_id,),
            ).fetchall()
        docs = [db.checkpoint_doc(r) for r in rows]
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
            path = self._segments.path(digest, where)
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
        update = db.plain_json(update, "checkpoint update")
        key = (session_id, int(step), db.as_text(kind))
        with self._db.write() as conn:
            row = conn.execute(
                f"SELECT metrics, extra FROM checkpoints WHERE {db.CKPT_KEY} "
                "AND state = 'complete'",
                key,
            ).fetchone()
            if row is None:
                raise CheckpointNotFound(
                    f"session {key[0]} has no checkpoint at step {key[1]} ({key[2]})"
                )
            doc = {**json.loads(row[1]), "metrics": json.loads(row[0])}
            for k, v in update.items():
                set_path(doc, k, v)
            metrics = doc.pop("metrics")
            conn.execute(
                f"UPDATE checkpoints SET metrics = ?, extra = ? WHERE {db.CKPT_KEY}",
                (db.to_json(metrics, "metrics"), db.to_json(doc, "checkpoint fields"), *key),
            )

    def delete_checkpoint(self, session_id: str, step: int, kind: str) -> None:
        """Mark deleting, then drop the row and the segments no other checkpoint uses."""
        key = (session_id, int(step), db.as_text(kind))
        with self._db.write() as conn:
            conn.execute(f"UPDATE checkpoints SET state = 'deleting' WHERE {db.CKPT_KEY}", key)
        self._finish_deletion(key)

    def _finish_deletion(self, key: tuple[str, int, str]) -> None:
        """Second phase of a delete: a row still marked deleting goes, with its segments."""
        with self._db.write() as conn:
            row = conn.execute(f"SELECT state FROM checkpoints WHERE {db.CKPT_KEY}", key).fetchone()
            if row is None or row[0] != "deleting":
                return  # already gone, or written again since: the newer put wins
            hashes = db.ref_hashes(conn, *key)
            db.delete_refs(conn, *key)
            self._unlink_unreferenced(conn, hashes)
            conn.execute(f"DELETE FROM checkpoints WHERE {db.CKPT_KEY}", key)

    def bad_segments(self, checkpoint: dict[str, Any]) -> list[str]:
        """Segments of the checkpoint whose file is missing or fails its hash."""
        from ptutils import codec

        manifest = checkpoint.get("manifest")
        if manifest is None:
            manifest = self.get_checkpoint(
                checkpoint["session"], checkpoint["step"], checkpoint["kind"]
            )["manifest"]
        try:
            pairs = codec.segment_hashes(manifest)
        except CodecError:
            return []  # the manifest itself is bad: no segment to blame
        return [h for h, n in pairs if not self._segments.intact(h, n)]

    def drop_segments(self, digests: Iterable[str]) -> int:
        """Unlink rotten segment files (under the write lock, as every unlink is)."""
        with self._db.write():
            return sum(self._segments.unlink(h) for h in dict.fromkeys(digests))

    def _unlink_unreferenced(self, conn: sqlite3.Connection, hashes: Iterable[str]) -> int:
        """Delete segment files no checkpoint row references (caller holds the write lock)."""
        return sum(self._segments.unlink(h) for h in hashes if not db.is_referenced(conn, h))

    def collect_garbage(self, *, older_than: float = STALE_TEMP_S) -> int:
        """Remove crash leftovers: unreferenced segments and temp files older than `older_than`.

        Safe while other processes write: a put that meant to reuse a removed segment
        notices at commit time and writes it again. Returns the number of files removed.
        """
        cutoff = time.time() - older_than
        with self._db.read() as conn:
            stuck = conn.execute(
                "SELECT session, step, kind FROM checkpoints WHERE state = 'deleting'"
            ).fetchall()
        for key in stuck:  # a deleter died between its two phases
            self._finish_deletion(tuple(key))
        removed = self._segments.remove_stale_temps(cutoff)
        candidates = self._segments.older_than(cutoff)
        for i in range(0, len(candidates), _GC_BATCH):
            with self._db.write() as conn:
                removed += self._unlink_unreferenced(conn, candidates[i : i + _GC_BATCH])
        return removed

    def claim_periodic(self, name: str, every: float, *, now: float | None = None) -> bool:
        """Claim chore `name` if it was last claimed `every` seconds ago, or never."""
        now = self.now() if now is None else now
        with self._db.write() as conn:
            row = conn.execute("SELECT last FROM chores WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] > now - every:
                return False
            conn.execute("INSERT OR REPLACE INTO chores (name, last) VALUES (?, ?)", (name, now))
        return True

    # --- documents ---------------------------------------------------------------------
    def get_document(self, kind: str, key: str) -> dict[str, Any] | None:
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT version, body FROM documents WHERE kind = ? AND key = ?", (kind, key)
            ).fetchone()
        return None if row is None else {"version": int(row[0]), "body": json.loads(row[1])}

    def put_document(
        self, kind: str, key: str, body: dict[str, Any], *, version: int | None
    ) -> dict[str, Any] | None:
        text = db.to_json(body, f"document {kind}/{key}")
        with self._db.write() as conn:
            row = conn.execute(
                "SELECT version FROM documents WHERE kind = ? AND key = ?", (kind, key)
            ).fetchone()
            if (None if row is None else int(row[0])) != version:
                return None
            new = 1 if version is None else version + 1
            conn.execute(
                "INSERT OR REPLACE INTO documents (kind, key, version, body) VALUES (?,?,?,?)",
                (kind, key, new, text),
            )
        return {"version": new, "body": json.loads(text)}

    def list_documents(self, kind: str) -> list[str]:
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT key FROM documents WHERE kind = ? ORDER BY key", (kind,)
            ).fetchall()
        return [r[0] for r in rows]

    def delete_document(self, kind: str, key: str) -> None:
        with self._db.write() as conn:
            conn.execute("DELETE FROM documents WHERE kind = ? AND key = ?", (kind, key))

    # --- statistics --------------------------------------------------------------------
    def write_statistics(self, session_id: str, points: Iterable[StatPoint]) -> int:
        """Upsert points on (session, phase, step, name) and fold them into the session's
        `summary` (ptutils.store.summary), in one transaction."""
        points = list(points)
        rows = db.stat_rows(session_id, points)
        if rows:
            batch = summary.summarize(points)
            with self._db.write() as conn:
                db.insert_many(conn, f"INSERT OR REPLACE INTO statistics ({db.STAT_COLUMNS})",
                               rows)
                db.summarize_grains(conn, session_id,
                                    {(r[1], r[3], r[2] // curves.GRAIN) for r in rows})
                db.update_session_doc(conn, session_id, lambda doc: summary.apply(doc, batch))
        return len(rows)

    def delete_statistics(self, session_id: str, *, after_step: int) -> int:
        """Remove the session's points with step > after_step."""
        with self._db.write() as conn:
            cur = conn.execute(
                "DELETE FROM statistics WHERE session = ? AND step > ?",
                (session_id, int(after_step)),
            )
            if cur.rowcount == 0:  # the common case (a task's start): nothing to redo,
                return 0           # and a transaction that writes nothing costs no sync
            grain = int(after_step) // curves.GRAIN
            conn.execute("DELETE FROM statistic_grains WHERE session = ? AND grain > ?",
                         (session_id, grain))
            cut = conn.execute("SELECT phase, name FROM statistic_grains WHERE session = ? "
                               "AND grain = ?", (session_id, grain)).fetchall()
            db.summarize_grains(conn, session_id, [(p, n, grain) for p, n in cut])
            db.update_session_doc(conn, session_id,
                                  lambda doc: summary.trim(doc, int(after_step)))
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
            where.append(db.in_clause("session", ids))
            args += ids
        for sql, value in (
            ("name = ?", name),
            ("phase = ?", phase),
            ("step >= ?", step_min),
            ("step <= ?", step_max),
        ):
            if value is not None:
                where.append(sql)
                args.append(db.as_text(value) if isinstance(value, Enum) else value)
        sql = f"SELECT {db.STAT_COLUMNS} FROM statistics" + db.where_sql(where)
        with self._db.read() as conn:
            rows = conn.execute(sql + " ORDER BY session, step, name, phase", args).fetchall()
        return [db.stat_doc(r) for r in rows]

    def _summarized_curve(self, session_id: str, phase: str, name: str, buckets: int,
                          start: int | None, end: int | None) -> Curve:
        """One statistic min/max-downsampled (ptutils.store.curves) from the summaries of
        its grains, kept in `statistic_grains` by every write, and the few points needed
        beside them (the range's cut grains, a narrow span)."""
        import numpy as np
        series = (session_id, name, db.as_text(phase))
        first = -1 if start is None else start // curves.GRAIN
        last = _STEP_MAX if end is None else end // curves.GRAIN
        with self._db.read() as conn:
            rows = conn.execute(
                f"SELECT {db.GRAIN_COLUMNS} FROM statistic_grains WHERE session = ? AND "
                "phase = ? AND name = ? AND grain >= ? AND grain <= ? ORDER BY grain",
                (session_id, series[2], name, first, last)).fetchall()  # fmt: skip

            def raw(low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
                found = conn.execute(
                    f"SELECT step, value, special FROM statistics WHERE {db.SERIES} "
                    "ORDER BY step", (*series, low, high)).fetchall()  # fmt: skip
                steps = np.fromiter((r[0] for r in found), np.int64, len(found))
                values = np.fromiter((float(r[2]) if r[2] is not None else r[1]
                                      for r in found), np.float64, len(found))
                return steps, values

            return curves.assemble([curves.Grain(*r) for r in rows], raw, buckets, start, end)

    def statistic_series(self, session_id: str) -> list[tuple[str, str]]:
        """From the grain summaries (their key's prefix), not the points."""
        with self._db.read() as conn:
            rows = conn.execute("SELECT DISTINCT phase, name FROM statistic_grains "
                                "WHERE session = ? ORDER BY phase, name", (session_id,))
            return [(str(p), str(n)) for p, n in rows]


_STEP_MAX = 2**63 - 1
"""The last step of an unbounded range (SQLite's integers)."""


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
