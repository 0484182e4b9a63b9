"""The MongoDB store: sessions, checkpoints and statistics in collections, State in GridFS.

Layout (DESIGN §5): collections `sessions`, `checkpoints`, `statistics` (buckets of
points, see mongo_stats.py), and a GridFS bucket (`states`) of content-addressed
segments shared between checkpoints (see mongo_segments.py for how writers and
deleters of segments stay out of each other's way).

Transient server errors are retried for `retry_seconds`, then `StoreUnavailable` names
the URL without its password (mongo_retry.py). Every retried write is idempotent:
segments are content addressed, checkpoint documents have deterministic `_id`s and are
replaced, statistic points are keys of upserted buckets, and a compare-and-set whose
outcome is unknown checks whether it applied.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import pymongo
from bson import Binary
from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError, PyMongoError

from ptutils import codec
from ptutils.errors import (
    CheckpointCorrupt,
    CheckpointNotFound,
    CodecError,
    SessionExists,
    SessionNotFound,
    StoreError,
)
from ptutils.store.base import (
    GC_GRACE_S,
    LISTING_OMITS,
    SESSION_SORTS,
    SessionQuery,
    StatPoint,
    Store,
    check_page,
    new_id,
)
from ptutils.store.curves import Curve
from ptutils.store.mongo_clock import ServerClock
from ptutils.store.mongo_fields import (
    decode_metrics,
    doc_key,
    encode_metrics,
    encode_number,
    get_path,
    match,
    plain,
)
from ptutils.store.mongo_retry import Retry, is_duplicate, is_transient, redact_url
from ptutils.store.mongo_segments import SegmentStore
from ptutils.store.mongo_stats import StatisticBuckets, summary_ops, trim_summary_ops
from ptutils.store.summary import summarize

__all__ = ["DEFAULT_DB", "GC_GRACE_S", "MongoStore", "is_transient", "redact_url"]

DEFAULT_DB = "ptutils"
"""Database used when the URL names none."""

_COMMIT_ATTEMPTS = 4
_CKPT_RESERVED = frozenset(
    {"_id", "session", "step", "kind", "manifest", "checksum", "segments", "size",
     "created", "state", "bytes_written", "deleting_since"}
)  # fmt: skip


def _session_filter(query: SessionQuery) -> dict[str, Any]:
    """The MongoDB filter of a `SessionQuery` (each condition on an indexed field)."""
    out: dict[str, Any] = {}
    if query.name:
        out["name"] = {"$gte": query.name, "$lt": query.name + "\U0010ffff"}  # a prefix
    if query.status is not None:
        out["status"] = {"$in": plain(list(query.status))}
    if query.sweep is not None:
        out["sweep"] = query.sweep
    tags = query.all_tags
    if len(tags) == 1:
        out["tags"] = {"$in": list(tags)}  # array membership; nx-27017 needs $in here
    elif tags:
        out["tags"] = {"$all": list(tags)}
    if query.since is not None:
        out["updated"] = {"$gte": float(query.since)}
    return out


def _db_name(url: str) -> str:
    return unquote(urlsplit(url).path.strip("/")) or DEFAULT_DB


class MongoStore(Store):
    """Sessions, checkpoints and statistics on a MongoDB server (or replica set).

    Thread-safe. Open one per process: a pymongo client must not cross a fork.
    """

    def __init__(
        self,
        url: str,
        *,
        db: str | None = None,
        bucket: str = "states",
        retry_seconds: float = 30.0,
        clock_skew: float = 0.0,
    ) -> None:
        """`clock_skew` (seconds) offsets this client's own clock: a test hook that plays
        a machine whose clock is wrong; `now()` still tells the server's time."""
        self._retry = Retry(url, retry_seconds)
        self.url, self.retry_seconds = self._retry.url, self._retry.seconds
        try:
            self.client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
                url, **self._client_options(url)
            )
        except (PyMongoError, ValueError) as exc:  # malformed URL, unresolvable mongodb+srv
            raise StoreError(
                f"cannot open MongoDB at {self.url}: {self._retry.scrub(str(exc))}"
            ) from None
        self.db = self.client[db or _db_name(url)]
        self._clock = ServerClock(self.db, self._retry, self.url, clock_skew)
        self.bucket_name = bucket
        self._sessions = self.db["sessions"]
        self._ckpts = self.db["checkpoints"]
        self._segments = SegmentStore(self.db, bucket, self._ckpts, self._retry, self.now)
        self._stats = StatisticBuckets(self.db["statistics"], self._retry)
        try:
            self._retry("creating indexes", lambda _: self._create_indexes())
        except StoreError:
            self.client.close()
            raise

    def __repr__(self) -> str:
        return f"MongoStore({self.url!r})"

    def _client_options(self, url: str) -> dict[str, Any]:
        """Short timeouts (unless the URL sets them) so a dead server fails fast into the
        retry loop; server selection never waits longer than the retry budget."""
        given = urlsplit(url).query.lower()
        select_ms = int(1000 * min(3.0, max(0.5, self.retry_seconds / 3)))
        defaults = {
            "serverSelectionTimeoutMS": select_ms,
            "connectTimeoutMS": select_ms,
            "socketTimeoutMS": 60_000,
        }
        return {k: v for k, v in defaults.items() if k.lower() + "=" not in given}

    def _create_indexes(self) -> None:
        """Idempotent: creating an index that exists is a no-op."""
        self._sessions.create_index("name", unique=True)
        for field in ("status", "tags", "sweep"):
            self._sessions.create_index(field)
        # listings: each sort with its tie-break (the unique name), walked either way;
        # not `_id`, which nx-27017 cannot put in a compound index
        for field in SESSION_SORTS:
            self._sessions.create_index([(field, -1), ("name", -1)])
        self._sessions.create_index([("status", 1), ("created", -1), ("name", -1)])
        self._ckpts.create_index([("session", 1), ("step", 1), ("kind", 1)], unique=True)
        self._ckpts.create_index("segments")
        self._stats.create_indexes()
        self._segments.create_indexes()

    def close(self) -> None:
        self.client.close()

    # --- clock -----------------------------------------------------------------------
    def now(self) -> float:
        """The server's clock (mongo_clock.py): no round trip but once a minute."""
        return self._clock.now()

    # --- sessions --------------------------------------------------------------------
    def create_session(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Insert a session; SessionExists if its name (or id) is taken."""
        doc = plain(dict(doc))
        doc.setdefault("_id", new_id())
        if not isinstance(doc["_id"], str) or not isinstance(doc.get("name"), str):
            raise StoreError("a session document needs string `_id` and `name` fields")

        def insert(retried: bool) -> dict[str, Any]:
            try:
                self._sessions.insert_one(dict(doc))
            except DuplicateKeyError:
                mine = self._sessions.find_one({"_id": doc["_id"]}) if retried else None
                if mine is not None and mine.get("token") == doc.get("token"):
                    return mine  # our own insert, applied before the connection broke
                raise SessionExists(
                    f"a session named {doc['name']!r} (or with id {doc['_id']}) "
                    f"already exists in {self.url}"
                ) from None
            return doc

        return self._retry(f"creating session {doc['name']!r}", insert)

    def get_session(self, ref: str) -> dict[str, Any]:
        def find(_: bool) -> dict[str, Any] | None:
            return self._sessions.find_one({"_id": ref}) or self._sessions.find_one({"name": ref})

        doc = self._retry(f"reading session {ref!r}", find)
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
        query: dict[str, Any] = {}
        if status is not None:
            query["status"] = (
                plain(status) if isinstance(status, str) else {"$in": plain(list(status))}
            )
        if sweep is not None:
            query["sweep"] = sweep
        if tag is not None:
            query["tags"] = {"$in": [tag]}  # array membership; nx-27017 needs $in here
        return self._retry(
            "listing sessions",
            lambda _: list(self._sessions.find(query).sort([("created", 1), ("_id", 1)])),
        )

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
        if limit == 0:
            return []
        order = -1 if descending else 1
        omit = dict.fromkeys(LISTING_OMITS, 0)

        def find(_: bool) -> list[dict[str, Any]]:
            cursor = self._sessions.find(_session_filter(query), omit)
            cursor = cursor.sort([(sort, order), ("name", order)]).skip(offset)
            return list(cursor.limit(limit) if limit else cursor)

        return self._retry("listing sessions", find)

    def count_sessions(self, query: SessionQuery = SessionQuery()) -> int:
        return int(self._retry("counting sessions",
                               lambda _: self._sessions.count_documents(_session_filter(query))))

    def cas_session(
        self, session_id: str, expect: dict[str, Any], update: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Apply `update` atomically if every `expect` field matches (find_one_and_update).

        After a connection error the outcome is unknown, and blindly trying again could
        report failure for an update that applied (its expectations no longer hold). So a
        retry first reads the document: if it carries every updated value, including the
        `updated` time this call chose, the update applied. If another writer changed
        those fields in between, the call reports failure although it applied: the safe
        side for a fencing token (the task stops; reconcile picks the session up).
        """
        if "_id" in update:
            raise StoreError("cas_session cannot change a session's `_id`")
        changes = {**plain(update), "updated": self.now()}
        query = {"_id": session_id, **match(plain(expect))}

        def attempt(retried: bool) -> dict[str, Any] | None:
            if retried:
                doc = self._sessions.find_one({"_id": session_id})
                if doc is not None and all(get_path(doc, k) == v for k, v in changes.items()):
                    return doc
            try:
                return self._sessions.find_one_and_update(
                    query, {"$set": changes}, return_document=ReturnDocument.AFTER
                )
            except DuplicateKeyError:
                raise SessionExists(
                    f"a session named {changes.get('name')!r} already exists in {self.url}"
                ) from None

        return self._retry(f"updating session {session_id}", attempt)

    def delete_session(self, session_id: str) -> None:
        """Remove checkpoints (and segments only they use), statistics, then the session.

        Idempotent, and safe to run again after a crash part way.
        """
        keys = self._retry(
            f"listing checkpoints of {session_id}",
            lambda _: list(self._ckpts.find({"session": session_id}, {"step": 1, "kind": 1})),
        )
        for key in keys:
            self.delete_checkpoint(session_id, key["step"], key["kind"])
        self._stats.delete_session(session_id)
        self._retry(
            f"deleting session {session_id}",
            lambda _: self._sessions.delete_one({"_id": session_id}),
        )

    # --- checkpoints -----------------------------------------------------------------
    def put_checkpoint(
        self,
        session_id: str,
        step: int,
        kind: str,
        state: Any,
        *,
        metrics: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """Store the segments this server lacks, verify them, then the checkpoint document.

        The document appears only once every segment is stored and verified, so a crash
        at any point leaves no checkpoint or a complete one (checkpoint before advance).
        """
        step, kind = int(step), str(plain(kind))
        found = self._retry(
            f"reading session {session_id}",
            lambda _: self._sessions.find_one({"_id": session_id}, {"_id": 1}),
        )
        if found is None:
            raise SessionNotFound(f"no session with id {session_id!r} in {self.url}")
        encoded = codec.encode(state)
        hashes = [s.hash for s in encoded.segments]
        where = f"checkpoint of session {session_id} at step {step} ({kind})"
        put_id, stored = new_id(), False
        self._segments.register(put_id, session_id, hashes)
        try:
            written = self._segments.write_all(encoded.segments, put_id, where)
            doc = {
                "_id": doc_key(session_id, step, kind),
                "session": session_id,
                "step": step,
                "kind": kind,
                "manifest": Binary(encoded.manifest),
                "checksum": codec.checksum(encoded.manifest),
                "segments": hashes,
                "size": encoded.nbytes,
                "bytes_written": written,
                "metrics": encode_metrics(metrics or {}),
                "created": self.now(),
                "state": "complete",
            }
            old = self._retry(f"writing {where}", lambda _: self._commit(doc))
            stored = True
        finally:
            self._segments.unregister(put_id, retry=stored)
        # Replaced: drop what only the old version used.
        self._segments.delete_unreferenced(
            d for d in (old or {}).get("segments", []) if d not in hashes
        )
        return self._ckpt_out(doc)

    def _commit(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        """Insert or replace the checkpoint document; the one it replaced, if any.

        Writing the same State again (a redelivered chunk) only refreshes metrics and
        times. Different content replaces the document atomically; nx-27017 cannot
        replace a document holding binary data (it answers as if nothing matched), so
        there the old document is deleted and the new one inserted.
        """
        key = {"_id": doc["_id"]}
        for _ in range(_COMMIT_ATTEMPTS):
            old = self._ckpts.find_one(key, {"manifest": 0})
            if old is None:
                try:
                    self._ckpts.insert_one(dict(doc))
                    return None
                except DuplicateKeyError:
                    continue  # a concurrent put of the same checkpoint: look again
            if old.get("checksum") != doc["checksum"]:
                self._ckpts.find_one_and_replace(key, doc)
            if self._ckpts.find_one({**key, "checksum": doc["checksum"]}, {"_id": 1}) is None:
                self._ckpts.delete_one({**key, "checksum": old.get("checksum")})
                continue
            rest = {k: v for k, v in doc.items() if k not in ("_id", "manifest")}
            self._ckpts.update_one(key, {"$set": rest, "$unset": {"corrupt": ""}})
            return old
        raise StoreError(
            f"MongoDB at {self.url}: checkpoint {doc['_id']} kept changing while it was "
            "written; is another process writing the same checkpoint?"
        )

    def get_checkpoint(
        self, session_id: str, step: int | None = None, kind: str | None = None
    ) -> dict[str, Any]:
        query: dict[str, Any] = {"session": session_id, "state": "complete"}
        if step is not None:
            query["step"] = int(step)
        if kind is not None:
            query["kind"] = str(plain(kind))

        def find(_: bool) -> list[dict[str, Any]]:
            order = [("step", -1), ("created", -1)]
            return list(self._ckpts.find(query).sort(order).limit(1))

        found = self._retry(f"reading checkpoints of {session_id}", find)
        if not found:
            what = "" if step is None else f" at step {step}"
            what += "" if kind is None else f" of kind {plain(kind)}"
            raise CheckpointNotFound(f"session {session_id} has no checkpoint{what}")
        return self._ckpt_out(found[0])

    def list_checkpoints(self, session_id: str) -> list[dict[str, Any]]:
        """Complete checkpoints by step then kind, without manifests (load_state fetches)."""
        docs = self._retry(
            f"listing checkpoints of {session_id}",
            lambda _: list(
                self._ckpts.find(
                    {"session": session_id, "state": "complete"}, {"manifest": 0}
                ).sort([("step", 1), ("kind", 1)])
            ),
        )
        return [self._ckpt_out(d) for d in docs]

    @staticmethod
    def _ckpt_out(doc: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in doc.items() if k not in ("_id", "state")}
        if "manifest" in out:
            out["manifest"] = bytes(out["manifest"])
        out["metrics"] = decode_metrics(out.get("metrics"))
        return out

    def load_state(self, checkpoint: dict[str, Any]) -> Any:
        """Stream every segment from GridFS into its tensors, verifying each checksum."""
        session, step, kind = checkpoint["session"], checkpoint["step"], checkpoint["kind"]
        where = f"checkpoint of session {session} at step {step} ({kind})"
        if checkpoint.get("manifest") is None:
            checkpoint = self.get_checkpoint(session, step, kind)
        manifest = bytes(checkpoint["manifest"])
        if checkpoint.get("checksum") not in (None, codec.checksum(manifest)):
            raise CheckpointCorrupt(f"{where}: its manifest fails its checksum")
        try:
            sizes = dict(codec.segment_hashes(manifest))
        except CodecError as exc:
            raise CheckpointCorrupt(f"{where}: {exc}") from exc

        def open_segment(digest: str) -> io.RawIOBase:
            return self._segments.open(digest, sizes.get(digest), where)

        def decode(_: bool) -> Any:
            try:
                return codec.decode(manifest, open_segment, verify=True)
            except CodecError as exc:
                raise CheckpointCorrupt(f"{where}: {exc}") from exc

        return self._retry(f"loading {where}", decode)

    def update_checkpoint(
        self, session_id: str, step: int, kind: str, update: dict[str, Any]
    ) -> None:
        """Set `metrics` (or `metrics.name`) and extra fields of a complete checkpoint."""
        bad = sorted(k for k in update if k.split(".")[0] in _CKPT_RESERVED)
        if bad:
            raise StoreError(f"update_checkpoint cannot change {', '.join(bad)}")
        changes = {
            k: encode_metrics(v) if k == "metrics" and isinstance(v, dict)
            else encode_number(v) if k.startswith("metrics.") else v
            for k, v in plain(update).items()
        }  # fmt: skip
        key = doc_key(session_id, int(step), str(plain(kind)))
        result = self._retry(
            f"updating checkpoint {key}",
            lambda _: self._ckpts.update_one({"_id": key, "state": "complete"}, {"$set": changes}),
        )
        if result.matched_count == 0:
            raise CheckpointNotFound(
                f"session {session_id} has no checkpoint at step {step} of kind {plain(kind)}"
            )

    def delete_checkpoint(self, session_id: str, step: int, kind: str) -> None:
        """Mark the document deleting, drop segments nothing else references, drop it.

        Idempotent: a checkpoint already gone is success; one left `deleting` by a crash
        is finished. If the same checkpoint is written again meanwhile, the new one wins.
        """
        self._delete_checkpoint(doc_key(session_id, int(step), str(plain(kind))))

    def _delete_checkpoint(self, key: str) -> int:
        """delete_checkpoint by `_id`; the number of segments it removed."""
        doc = self._retry(
            f"marking checkpoint {key} deleting",
            lambda _: self._ckpts.find_one_and_update(
                {"_id": key},
                {"$set": {"state": "deleting", "deleting_since": self.now()}},
                projection={"segments": 1},
                return_document=ReturnDocument.AFTER,
            ),
        )
        if doc is None:
            return 0
        removed = self._segments.delete_unreferenced(doc.get("segments", []))
        self._retry(
            f"deleting checkpoint {key}",
            lambda _: self._ckpts.delete_one({"_id": key, "state": "deleting"}),
        )
        return removed

    def gc_segments(self, *, older_than: float = GC_GRACE_S) -> int:
        """Remove crash leftovers older than `older_than` seconds; returns segments removed.

        Finishes deletions a crashed deleter left, drops registrations of puts that
        died, and deletes segments no checkpoint references. Young ones are left alone,
        and every deletion goes through the tombstone protocol, so a put in progress is
        never robbed of a segment it is about to reference.
        """
        cutoff = self.now() - older_than
        stuck = self._retry(
            "listing stuck deletions",
            lambda _: list(self._ckpts.find(
                {"state": "deleting", "deleting_since": {"$lt": cutoff}}, {"_id": 1}
            )),
        )  # fmt: skip
        removed = sum(self._delete_checkpoint(doc["_id"]) for doc in stuck)
        self._segments.drop_stale_uploads(cutoff)
        return removed + self._segments.delete_unreferenced(self._segments.unreferenced(cutoff))

    def collect_garbage(self, *, older_than: float = GC_GRACE_S) -> int:
        """The Store name of `gc_segments`."""
        return self.gc_segments(older_than=older_than)

    def bad_segments(self, checkpoint: dict[str, Any]) -> list[str]:
        """Segments of the checkpoint missing from GridFS or failing their hash."""
        manifest = checkpoint.get("manifest")
        if manifest is None:
            manifest = self.get_checkpoint(
                checkpoint["session"], checkpoint["step"], checkpoint["kind"]
            )["manifest"]
        try:
            pairs = codec.segment_hashes(bytes(manifest))
        except CodecError:
            return []  # the manifest itself is bad: no segment to blame
        return [h for h, n in pairs if not self._segments.intact(h, n)]

    def drop_segments(self, digests: Iterable[str]) -> int:
        """Delete rotten segments even if checkpoints list them (through the tombstone
        protocol, so a writer of the same segment waits and then uploads it afresh)."""
        return self._segments.drop_rotten(digests)

    def claim_periodic(self, name: str, every: float, *, now: float | None = None) -> bool:
        """Claim chore `name` (collection `chores`) if it was last claimed `every` s ago."""
        now = self.now() if now is None else now
        chores = self.db["chores"]

        def claim(retried: bool) -> bool:
            if retried:  # an earlier attempt may have applied: it counts as ours
                doc = chores.find_one({"_id": name})
                if doc is not None and doc.get("last") == now:
                    return True
            done = chores.find_one_and_update(
                {"_id": name, "last": {"$lte": now - every}}, {"$set": {"last": now}}
            )
            if done is not None:
                return True
            try:
                chores.insert_one({"_id": name, "last": now})
            except PyMongoError as exc:
                if is_duplicate(exc):
                    return False  # another process claimed it first
                raise
            return True

        return self._retry(f"claiming chore {name!r}", claim)

    # --- documents (collection `documents`, _id "KIND/KEY") ---------------------------
    def get_document(self, kind: str, key: str) -> dict[str, Any] | None:
        docs = self.db["documents"]
        found = self._retry(
            f"reading document {kind}/{key}", lambda _: docs.find_one({"_id": f"{kind}/{key}"})
        )
        return None if found is None else {"version": int(found["version"]),
                                           "body": found["body"]}

    def put_document(
        self, kind: str, key: str, body: dict[str, Any], *, version: int | None
    ) -> dict[str, Any] | None:
        from ptutils.store.sqlite_db import plain_json

        docs, _id = self.db["documents"], f"{kind}/{key}"
        body = plain_json(body, f"document {kind}/{key}")
        new = 1 if version is None else version + 1
        mark = new_id()  # tells a retried write that applied from another writer's

        def put(retried: bool) -> bool:
            if retried:
                cur = docs.find_one({"_id": _id})
                if cur is not None and cur.get("mark") == mark:
                    return True
            if version is None:
                try:
                    docs.insert_one({"_id": _id, "kind": kind, "version": new, "body": body,
                                     "mark": mark})
                except PyMongoError as exc:
                    if is_duplicate(exc):
                        return False
                    raise
                return True
            done = docs.find_one_and_update(
                {"_id": _id, "version": version},
                {"$set": {"version": new, "body": body, "mark": mark}},
            )
            return done is not None

        if not self._retry(f"writing document {kind}/{key}", put):
            return None
        return {"version": new, "body": body}

    def list_documents(self, kind: str) -> list[str]:
        docs = self.db["documents"]
        rows = self._retry(
            f"listing documents {kind}",
            lambda _: list(docs.find({"kind": kind}, {"_id": 1})),
        )
        return sorted(r["_id"].partition("/")[2] for r in rows)

    def delete_document(self, kind: str, key: str) -> None:
        docs = self.db["documents"]
        self._retry(f"deleting document {kind}/{key}",
                    lambda _: docs.delete_one({"_id": f"{kind}/{key}"}))

    # --- statistics ------------------------------------------------------------------
    def write_statistics(self, session_id: str, points: Iterable[StatPoint]) -> int:
        """Upsert points into their buckets (a point written again overwrites it), then
        fold them into the session's `summary` (one ordered bulk write)."""
        points = list(points)
        count = self._stats.write(session_id, points)
        self._update_summary(session_id, summary_ops(session_id, summarize(points)))
        return count

    def delete_statistics(self, session_id: str, *, after_step: int) -> int:
        removed = self._stats.delete_after(session_id, int(after_step))
        self._update_summary(session_id, trim_summary_ops(session_id, int(after_step)))
        return removed

    def _update_summary(self, session_id: str, ops: list[Any]) -> None:
        if ops:  # idempotent: a retry after an unknown outcome sets the same values
            self._retry(f"updating the summary of session {session_id}",
                        lambda _: self._sessions.bulk_write(ops, ordered=True))

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
        return self._stats.query(
            session_id, name=name, phase=phase, step_min=step_min, step_max=step_max
        )

    def _summarized_curve(self, session_id: str, phase: str, name: str, buckets: int,
                          start: int | None, end: int | None) -> Curve | None:
        """From the summaries of the statistic buckets (mongo_grains.py); None for a
        series written before them (read point by point)."""
        return self._stats.curve(session_id, phase, name, buckets, start, end)

    def statistic_series(self, session_id: str) -> list[tuple[str, str]]:
        found = self._stats.grains.series(session_id)
        return super().statistic_series(session_id) if found is None else found
