"""The MongoDB store: sessions, checkpoints and statistics in collections, State in GridFS.

Layout (DESIGN §5): collections `sessions`, `checkpoints`, `statistics`, and a GridFS
bucket (`states`) holding content-addressed segments: a segment is a GridFS file whose
`_id` and filename are its xxh3_128 hash, written once and shared by every checkpoint
that contains it. Two small bookkeeping collections coordinate writers and deleters:

- `<bucket>_uploads`: one document per put in flight, listing the segments it will
  reference, inserted before it looks at GridFS and removed after its checkpoint
  document is in. A segment listed there counts as referenced.
- `<bucket>_deletions`: a tombstone per segment being deleted. A deleter inserts it,
  then checks references, then removes the data; a writer that finds a tombstone waits
  for it to go. So if a writer saw no tombstone, its upload registration precedes the
  deleter's reference check, which then sees it: a segment a put relies on is never
  deleted under it.

Transient server errors (connection refused or reset, primary stepping down, timeouts)
are retried with exponential backoff for `retry_seconds`, then `StoreUnavailable`
names the URL without its password. Every retried write is idempotent: segments are
content addressed, checkpoint and statistic documents have deterministic `_id`s and are
replaced, and a compare-and-set whose outcome is unknown checks whether it applied.
"""

from __future__ import annotations

import datetime as _dt
import io
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from enum import Enum
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit

import pymongo
from bson import Binary, Int64
from gridfs.errors import CorruptGridFile, FileExists
from pymongo import ReplaceOne, ReturnDocument
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)

from ptutils import codec
from ptutils.errors import (
    CheckpointCorrupt,
    CheckpointNotFound,
    CodecError,
    SessionExists,
    SessionNotFound,
    StoreError,
    StoreUnavailable,
)
from ptutils.store.base import StatPoint, Store, new_id

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_DB = "ptutils"
"""Database used when the URL names none."""

CHUNK_SIZE = 255 * 1024
"""GridFS chunk size of segments (the GridFS default); fixed, so every writer of a
segment produces identical chunks."""

GC_GRACE_S = 3600.0
"""`gc_segments` leaves segments and registrations younger than this alone."""

UPLOAD_WAIT_S = 10.0
"""How long a writer waits for another live writer to finish the same segment before
it takes over (deletes the partial copy and uploads it itself)."""

TOMBSTONE_STALE_S = 60.0
"""A deletion tombstone older than this was left by a crashed deleter."""

CHUNK_BATCH = 16
"""GridFS chunks per insert or read (4 MiB): what a save or load holds beyond the State."""

STAT_BATCH = 5000
"""Statistic points per insert."""

_SEGMENT_ATTEMPTS = 4
_COMMIT_ATTEMPTS = 4
_CKPT_RESERVED = frozenset(
    {"_id", "session", "step", "kind", "manifest", "checksum", "segments", "size",
     "created", "state", "bytes_written", "deleting_since"}
)  # fmt: skip
# Server error codes that mean "try again" (shutdown, stepdown, not primary, ...).
_TRANSIENT_CODES = frozenset(
    {6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436}
)


class _Interrupted(StoreUnavailable):
    """A transient server error raised from inside `codec.decode` (which lets ptutils
    errors through unchanged); the retry loop unwraps and retries it."""

    def __init__(self, cause: PyMongoError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def is_transient(exc: BaseException) -> bool:
    """True for errors a retry can cure: lost connections, elections, shutdowns."""
    if isinstance(exc, _Interrupted | ConnectionFailure):
        return True
    if isinstance(exc, OperationFailure) and not isinstance(exc, BulkWriteError):
        return exc.code in _TRANSIENT_CODES or exc.has_error_label("RetryableWriteError")
    return False


def redact_url(url: str) -> str:
    """`url` with the password replaced by `***` (`mongodb://user:***@host/db`)."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{hosts}").geturl()


def _password(url: str) -> str:
    userinfo, at, _ = urlsplit(url).netloc.rpartition("@")
    return userinfo.split(":", 1)[1] if at and ":" in userinfo else ""


def _db_name(url: str) -> str:
    return unquote(urlsplit(url).path.strip("/")) or DEFAULT_DB


def _key(*parts: Any) -> str:
    """A deterministic `_id` from fields: each percent-quoted, so `/` cannot collide."""
    return "/".join(quote(str(p), safe="") for p in parts)


def _plain(value: Any) -> Any:
    """Enums (SessionStatus, CheckpointKind) as their plain values, recursively."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _match(expect: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Equality conditions with sub-documents spelled as dotted fields.

    `{"lease": {"worker": w, "expires": t}}` becomes `lease.worker == w and
    lease.expires == t`: the same test for a lease (always exactly these fields), and a
    form every MongoDB-compatible server evaluates (nx-27017 rejects a query on a whole
    sub-document). `None` keeps MongoDB's meaning: null or missing.
    """
    out: dict[str, Any] = {}
    for k, v in expect.items():
        if isinstance(v, dict) and v and not any(str(x).startswith("$") for x in v):
            out.update(_match(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _get_path(doc: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(doc, dict):
            return None
        doc = doc.get(part)
    return doc


def _enc_number(value: Any) -> Any:
    """NaN and ±inf as the strings "nan", "inf", "-inf"; other values unchanged.

    BSON stores them natively, but nx-27017 (JSON inside) refuses them; strings are
    stored and read back the same by every server.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def _dec_number(value: Any) -> Any:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return value


def _metrics_in(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: _enc_number(v) for k, v in metrics.items()}


def _metrics_out(metrics: dict[str, Any] | None) -> dict[str, Any]:
    return {k: _dec_number(v) for k, v in (metrics or {}).items()}


def _timestamp(value: Any) -> float:
    """Seconds since the epoch of a GridFS `uploadDate` (nx-27017 returns a string)."""
    if isinstance(value, _dt.datetime):
        stamp = value if value.tzinfo else value.replace(tzinfo=_dt.UTC)
        return stamp.timestamp()
    if isinstance(value, str):
        try:
            return _timestamp(_dt.datetime.fromisoformat(value))
        except ValueError:
            return 0.0
    return 0.0


def _is_duplicate(exc: PyMongoError) -> bool:
    """A unique-index violation, however the server words it (nx-27017 sends no code)."""
    if isinstance(exc, FileExists | DuplicateKeyError):
        return True
    if isinstance(exc, BulkWriteError):
        errors = exc.details.get("writeErrors", [])
        return bool(errors) and all(e.get("code") in (11000, 11001) for e in errors)
    return isinstance(exc, OperationFailure) and (
        exc.code in (11000, 11001) or "UNIQUE constraint" in str(exc)
    )


def _recut(pieces: Iterable[memoryview], size: int) -> Iterator[bytes]:
    """The bytes of `pieces` as `size`-byte chunks (the last may be shorter)."""
    pending = bytearray()
    for piece in pieces:
        view = memoryview(piece).cast("B")
        while view:
            if not pending and len(view) >= size:
                yield bytes(view[:size])
                view = view[size:]
                continue
            take = size - len(pending)
            pending += view[:take]
            view = view[take:]
            if len(pending) == size:
                yield bytes(pending)
                pending.clear()
    if pending:
        yield bytes(pending)


class _SegmentStream(io.RawIOBase):
    """A stored segment as a raw stream with `readinto`, so the codec fills tensors
    straight from the chunks, a few MiB at a time, without a full copy.

    A missing or short chunk raises CheckpointCorrupt naming the segment; a transient
    error raises `_Interrupted`, which the codec passes through to the retry loop.
    """

    def __init__(self, chunks: Iterator[bytes], digest: str, where: str) -> None:
        self._chunks, self._digest, self._where = chunks, digest, where
        self._current = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        done = 0
        while done < len(target):
            if not self._current:
                chunk = self._next_chunk()
                if chunk is None:
                    break
                self._current = memoryview(chunk)
            n = min(len(self._current), len(target) - done)
            target[done : done + n] = self._current[:n]
            self._current = self._current[n:]
            done += n
        return done

    def _next_chunk(self) -> bytes | None:
        try:
            return next(self._chunks, None)
        except CorruptGridFile as exc:
            raise CheckpointCorrupt(f"{self._where}: segment {self._digest}: {exc}") from None
        except PyMongoError as exc:
            if is_transient(exc):
                raise _Interrupted(exc) from None
            raise


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
    ) -> None:
        self.url = redact_url(url)
        self.retry_seconds = float(retry_seconds)
        self._secret = _password(url)
        try:
            self.client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
                url, **self._client_options(url)
            )
        except (PyMongoError, ValueError) as exc:  # malformed URL, unresolvable mongodb+srv
            raise StoreError(
                f"cannot open MongoDB at {self.url}: {self._scrub(str(exc))}"
            ) from None
        self.db = self.client[db or _db_name(url)]
        self.bucket_name = bucket
        self._sessions = self.db["sessions"]
        self._ckpts = self.db["checkpoints"]
        self._stats = self.db["statistics"]
        # Underscores, not dots: nx-27017 only accepts dotted names for GridFS collections.
        self._uploads = self.db[f"{bucket}_uploads"]
        self._deletions = self.db[f"{bucket}_deletions"]
        self._files = self.db[f"{bucket}.files"]
        self._chunks = self.db[f"{bucket}.chunks"]
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
        self._ckpts.create_index([("session", 1), ("step", 1), ("kind", 1)], unique=True)
        self._ckpts.create_index("segments")
        self._stats.create_index(
            [("session", 1), ("phase", 1), ("step", 1), ("name", 1)], unique=True
        )
        self._stats.create_index([("session", 1), ("name", 1), ("step", 1)])
        self._uploads.create_index("segments")
        # The indexes every GridFS driver creates before its first upload.
        self._chunks.create_index([("files_id", 1), ("n", 1)], unique=True)
        self._files.create_index([("filename", 1), ("uploadDate", 1)])

    def close(self) -> None:
        self.client.close()

    # --- retries ---------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        """`text` with the password (raw or URL-decoded) replaced by ***."""
        for secret in {self._secret, unquote(self._secret)} - {""}:
            text = text.replace(secret, "***")
        return text

    def _retry(self, what: str, fn: Callable[[bool], T]) -> T:
        """`fn(retried)` until it succeeds, retrying transient errors with backoff.

        `retried` tells `fn` that an earlier attempt may have applied before its
        connection failed. Past `retry_seconds`: StoreUnavailable. Other server errors
        become StoreError; neither message ever contains the password.
        """
        deadline = time.monotonic() + self.retry_seconds
        delay, retried = 0.05, False
        while True:
            try:
                return fn(retried)
            except PyMongoError as exc:
                if not is_transient(exc):
                    raise StoreError(
                        f"MongoDB at {self.url}: {what} failed: {self._scrub(str(exc))}"
                    ) from None
                error = exc
            except _Interrupted as exc:
                error = exc.cause
            if time.monotonic() + delay > deadline:
                raise StoreUnavailable(
                    f"MongoDB at {self.url} unavailable: {what} still failing after "
                    f"{self.retry_seconds:g}s of retries ({type(error).__name__}: "
                    f"{self._scrub(str(error))})"
                ) from None
            log.warning("%s: %s; retrying in %.2fs", what, self._scrub(str(error)), delay)
            time.sleep(delay)
            delay, retried = min(delay * 2, 2.0), True

    # --- sessions --------------------------------------------------------------------
    def create_session(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Insert a session; SessionExists if its name (or id) is taken."""
        doc = _plain(dict(doc))
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
                _plain(status) if isinstance(status, str) else {"$in": _plain(list(status))}
            )
        if sweep is not None:
            query["sweep"] = sweep
        if tag is not None:
            query["tags"] = {"$in": [tag]}  # array membership; nx-27017 needs $in here
        return self._retry(
            "listing sessions",
            lambda _: list(self._sessions.find(query).sort([("created", 1), ("_id", 1)])),
        )

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
        changes = {**_plain(update), "updated": time.time()}
        query = {"_id": session_id, **_match(_plain(expect))}

        def attempt(retried: bool) -> dict[str, Any] | None:
            if retried:
                doc = self._sessions.find_one({"_id": session_id})
                if doc is not None and all(_get_path(doc, k) == v for k, v in changes.items()):
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
        self._retry(
            f"deleting statistics of {session_id}",
            lambda _: self._stats.delete_many({"session": session_id}),
        )
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
        step, kind = int(step), str(_plain(kind))
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
        self._register_upload(put_id, session_id, hashes)
        try:
            written = sum(
                self._retry(
                    f"storing segment {seg.hash} of {where}",
                    lambda retried, seg=seg: self._ensure_segment(seg, put_id, retried),
                )
                for seg in encoded.segments
            )
            doc = {
                "_id": _key(session_id, step, kind),
                "session": session_id,
                "step": step,
                "kind": kind,
                "manifest": Binary(encoded.manifest),
                "checksum": codec.checksum(encoded.manifest),
                "segments": hashes,
                "size": encoded.nbytes,
                "bytes_written": written,
                "metrics": _metrics_in(metrics or {}),
                "created": time.time(),
                "state": "complete",
            }
            old = self._retry(f"writing {where}", lambda _: self._commit(doc))
            stored = True
        finally:
            self._unregister_upload(put_id, retry=stored)
        for digest in dict.fromkeys((old or {}).get("segments", [])):
            if digest not in hashes:  # replaced: drop what only the old version used
                self._retry(
                    f"deleting segment {digest}",
                    lambda _, d=digest: self._delete_segment_if_unreferenced(d),
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
            self._ckpts.update_one(key, {"$set": rest})
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
            query["kind"] = str(_plain(kind))

        def find(_: bool) -> list[dict[str, Any]]:
            order = [("step", -1), ("created", -1)]
            return list(self._ckpts.find(query).sort(order).limit(1))

        found = self._retry(f"reading checkpoints of {session_id}", find)
        if not found:
            what = "" if step is None else f" at step {step}"
            what += "" if kind is None else f" of kind {_plain(kind)}"
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
        out["metrics"] = _metrics_out(out.get("metrics"))
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
            try:
                meta = self._files.find_one({"_id": digest})
            except PyMongoError as exc:
                if is_transient(exc):
                    raise _Interrupted(exc) from None
                raise
            if meta is None:
                raise CheckpointCorrupt(
                    f"{where}: segment {digest} is missing from GridFS bucket {self.bucket_name}"
                )
            if meta.get("length") != sizes.get(digest):
                raise CheckpointCorrupt(
                    f"{where}: segment {digest} holds {meta.get('length')} bytes, expected "
                    f"{sizes.get(digest)}"
                )
            return _SegmentStream(self._read_chunks(meta), digest, where)

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
            k: _metrics_in(v) if k == "metrics" and isinstance(v, dict)
            else _enc_number(v) if k.startswith("metrics.") else v
            for k, v in _plain(update).items()
        }  # fmt: skip
        key = _key(session_id, int(step), str(_plain(kind)))
        result = self._retry(
            f"updating checkpoint {key}",
            lambda _: self._ckpts.update_one({"_id": key, "state": "complete"}, {"$set": changes}),
        )
        if result.matched_count == 0:
            raise CheckpointNotFound(
                f"session {session_id} has no checkpoint at step {step} of kind {_plain(kind)}"
            )

    def delete_checkpoint(self, session_id: str, step: int, kind: str) -> None:
        """Mark the document deleting, drop segments nothing else references, drop it.

        Idempotent: a checkpoint already gone is success; one left `deleting` by a crash
        is finished. If the same checkpoint is written again meanwhile, the new one wins.
        """
        self._delete_checkpoint(_key(session_id, int(step), str(_plain(kind))))

    def _delete_checkpoint(self, key: str) -> int:
        """delete_checkpoint by `_id`; the number of segments it removed."""
        doc = self._retry(
            f"marking checkpoint {key} deleting",
            lambda _: self._ckpts.find_one_and_update(
                {"_id": key},
                {"$set": {"state": "deleting", "deleting_since": time.time()}},
                projection={"segments": 1},
                return_document=ReturnDocument.AFTER,
            ),
        )
        if doc is None:
            return 0
        removed = sum(
            self._retry(
                f"deleting segment {digest}",
                lambda _, d=digest: self._delete_segment_if_unreferenced(d),
            )
            for digest in dict.fromkeys(doc.get("segments", []))
        )
        self._retry(
            f"deleting checkpoint {key}",
            lambda _: self._ckpts.delete_one({"_id": key, "state": "deleting"}),
        )
        return removed

    # --- segments --------------------------------------------------------------------
    def _register_upload(self, put_id: str, session_id: str, hashes: list[str]) -> None:
        doc = {"_id": put_id, "session": session_id, "segments": hashes, "created": time.time()}

        def insert(retried: bool) -> None:
            try:
                self._uploads.insert_one(dict(doc))
            except DuplicateKeyError:
                if not retried:
                    raise
        self._retry("registering an upload", insert)

    def _unregister_upload(self, put_id: str, *, retry: bool) -> None:
        """Best effort (a leftover only pins segments until gc_segments drops it); no
        retries when the put failed, so its error is not delayed by a second wait."""
        try:
            if retry:
                self._retry("unregistering an upload",
                            lambda _: self._uploads.delete_one({"_id": put_id}))
            else:
                self._uploads.delete_one({"_id": put_id})
        except (StoreError, PyMongoError) as exc:
            log.warning("could not unregister upload %s: %s", put_id, self._scrub(str(exc)))

    def _ensure_segment(self, seg: codec.Segment, put_id: str, retried: bool) -> int:
        """Make sure a complete, verified copy of `seg` is stored; the bytes written.

        A segment found complete at the first look was verified by its writer and is
        reused as is. Otherwise: leftovers of a crashed writer (chunks without a complete
        files document) are removed unless another live put is uploading the same
        segment, in which case we wait for it; then upload, and read back to verify.
        """
        first = not retried
        for _ in range(_SEGMENT_ATTEMPTS):
            self._wait_for_deletion(seg.hash)
            status = self._segment_status(seg)
            if status == "complete":
                if first or self._verify(seg):
                    return 0
                self._drop_segment_data(seg.hash)  # corrupt copy: write it again
            elif status == "partial" or not first:
                if self._other_writer_finishes(seg, put_id):
                    first = False
                    continue
                self._drop_segment_data(seg.hash)
            first = False
            if not self._upload(seg):
                continue  # someone else's chunks are there: look again
            if self._verify(seg):
                return seg.nbytes
            self._drop_segment_data(seg.hash)
        raise StoreError(
            f"MongoDB at {self.url}: could not store segment {seg.hash} "
            f"after {_SEGMENT_ATTEMPTS} attempts (it kept failing verification)"
        )

    def _segment_status(self, seg: codec.Segment) -> str:
        """"absent", "partial" (files document of the wrong length), or "complete".

        GridFS inserts the files document after all chunks, so on MongoDB one that
        exists is complete; nx-27017 creates a zero-length one with the first chunk.
        """
        meta = self._files.find_one({"_id": seg.hash})
        if meta is None:
            return "absent"
        return "complete" if meta.get("length") == seg.nbytes else "partial"

    def _upload(self, seg: codec.Segment) -> bool:
        """Write `seg` as a GridFS file; False if chunks or a file of that name exist.

        The documents are GridFS's own (any driver reads them back), written the way
        GridFS writes them, chunks first and the files document last, but in batches of
        `CHUNK_BATCH` chunks: pymongo's GridIn buffers up to 32 MiB and then encodes it
        again, which took a 200 MB save to 1.5x the State's memory.
        """
        batch: list[dict[str, Any]] = []
        try:
            for n, data in enumerate(_recut(seg.chunks(), CHUNK_SIZE)):
                batch.append({"files_id": seg.hash, "n": n, "data": data})
                if len(batch) == CHUNK_BATCH:
                    self._chunks.insert_many(batch)
                    batch = []
            if batch:
                self._chunks.insert_many(batch)
            del batch
            self._files.insert_one({
                "_id": seg.hash, "filename": seg.hash, "length": Int64(seg.nbytes),
                "chunkSize": CHUNK_SIZE, "uploadDate": _dt.datetime.now(_dt.UTC),
                "metadata": {"created": time.time()},
            })  # fmt: skip
        except PyMongoError as exc:
            if _is_duplicate(exc):
                return False
            raise
        return True

    def _read_chunks(self, meta: dict[str, Any]) -> Iterator[bytes]:
        """The chunks of the GridFS file `meta`, in order, `CHUNK_BATCH` per query.

        CorruptGridFile if a chunk is missing or of the wrong size (as GridOut checks).
        Range queries bound the memory on any server (GridOut's cursor asks for 101
        chunks at first; nx-27017 answers with the whole file).
        """
        length, size = int(meta["length"]), int(meta["chunkSize"])
        count = -(-length // size)
        for first in range(0, count, CHUNK_BATCH):
            last = min(first + CHUNK_BATCH, count)
            query = {"files_id": meta["_id"], "n": {"$gte": first, "$lt": last}}
            docs = sorted(self._chunks.find(query, {"n": 1, "data": 1}), key=lambda d: d["n"])
            if [d["n"] for d in docs] != list(range(first, last)):
                raise CorruptGridFile(f"chunks {first}..{last - 1} are missing or repeated")
            for doc in docs:
                expected = size if doc["n"] < count - 1 else length - size * (count - 1)
                if len(doc["data"]) != expected:
                    raise CorruptGridFile(
                        f"chunk {doc['n']} holds {len(doc['data'])} bytes, expected {expected}"
                    )
                yield doc["data"]
            del docs

    def _verify(self, seg: codec.Segment) -> bool:
        """Read the stored segment back: right length and checksum."""
        meta = self._files.find_one({"_id": seg.hash})
        if meta is None or meta.get("length") != seg.nbytes:
            return False
        hasher = codec.Hasher()
        try:
            for chunk in self._read_chunks(meta):
                hasher.update(chunk)
        except CorruptGridFile:
            return False
        return hasher.hexdigest() == seg.hash

    def _other_writer_finishes(self, seg: codec.Segment, put_id: str) -> bool:
        """Wait while another registered put may be uploading `seg`; True if it completed."""
        deadline = time.monotonic() + UPLOAD_WAIT_S
        query = {"segments": {"$in": [seg.hash]}, "_id": {"$ne": put_id}}
        while time.monotonic() < deadline and self._uploads.find_one(query, {"_id": 1}):
            time.sleep(0.2)
            if self._segment_status(seg) == "complete":
                return True
        return False

    def _drop_segment_data(self, digest: str) -> bool:
        """Delete a segment's chunks, then its files document; False if neither existed."""
        chunks = self._chunks.delete_many({"files_id": digest}).deleted_count
        try:
            files = self._files.delete_one({"_id": digest}).deleted_count
        except OperationFailure:
            # nx-27017 answers "File with id ... not found" where MongoDB deletes nothing.
            if self._files.find_one({"_id": digest}, {"_id": 1}) is not None:
                raise
            files = 0
        return bool(chunks or files)

    def _wait_for_deletion(self, digest: str) -> None:
        """Wait until no deleter holds `digest`; clear a tombstone a crashed deleter left."""
        while (stone := self._deletions.find_one({"_id": digest})) is not None:
            if time.time() - float(stone.get("at", 0)) > TOMBSTONE_STALE_S:
                self._deletions.delete_one({"_id": digest, "token": stone.get("token")})
            else:
                time.sleep(0.05)

    def _referenced(self, digest: str) -> bool:
        """Does a live checkpoint, or a put in flight, use this segment?"""
        live = {"segments": {"$in": [digest]}, "state": {"$ne": "deleting"}}
        return (
            self._ckpts.find_one(live, {"_id": 1}) is not None
            or self._uploads.find_one({"segments": {"$in": [digest]}}, {"_id": 1}) is not None
        )

    def _delete_segment_if_unreferenced(self, digest: str) -> bool:
        """Tombstone, check references, delete data, lift the tombstone. True if deleted."""
        token = new_id()
        try:
            self._deletions.insert_one({"_id": digest, "token": token, "at": time.time()})
        except DuplicateKeyError:
            stone = self._deletions.find_one({"_id": digest})
            if stone is None or stone.get("token") != token:
                return False  # another deleter holds it (or just finished)
        try:
            return not self._referenced(digest) and self._drop_segment_data(digest)
        finally:
            self._deletions.delete_one({"_id": digest, "token": token})

    def gc_segments(self, *, older_than: float = GC_GRACE_S) -> int:
        """Remove crash leftovers older than `older_than` seconds; returns segments removed.

        Finishes deletions a crashed deleter left, drops registrations of puts that
        died, and deletes segments no checkpoint references. Young ones are left alone,
        and every deletion goes through the tombstone protocol, so a put in progress is
        never robbed of a segment it is about to reference.
        """
        cutoff = time.time() - older_than
        stuck = self._retry(
            "listing stuck deletions",
            lambda _: list(self._ckpts.find(
                {"state": "deleting", "deleting_since": {"$lt": cutoff}}, {"_id": 1}
            )),
        )  # fmt: skip
        removed = sum(self._delete_checkpoint(doc["_id"]) for doc in stuck)
        self._retry(
            "dropping stale upload registrations",
            lambda _: self._uploads.delete_many({"created": {"$lt": cutoff}}),
        )
        for digest in self._retry("listing segments", lambda _: self._gc_candidates(cutoff)):
            removed += self._retry(
                f"deleting segment {digest}",
                lambda _, d=digest: self._delete_segment_if_unreferenced(d),
            )
        return removed

    collect_garbage = gc_segments  # the name LocalStore uses

    def _gc_candidates(self, cutoff: float) -> list[str]:
        """Segments older than `cutoff` that no checkpoint or upload lists."""
        used = set(self._ckpts.distinct("segments")) | set(self._uploads.distinct("segments"))
        found = []
        for meta in self._files.find({}, {"_id": 1, "uploadDate": 1, "metadata": 1}):
            created = (meta.get("metadata") or {}).get("created")
            age_ref = float(created) if created is not None else _timestamp(meta.get("uploadDate"))
            if meta["_id"] not in used and age_ref < cutoff:
                found.append(meta["_id"])
        # Chunks whose files document never came (a writer died mid-upload). Their ObjectId
        # `_id`s carry the time they were written. nx-27017 never has such chunks.
        orphans = set(self._chunks.distinct("files_id")) - set(found) - used
        for digest in orphans:
            if self._files.find_one({"_id": digest}, {"_id": 1}) is not None:
                continue
            newest = self._chunks.find_one({"files_id": digest}, {"_id": 1}, sort=[("_id", -1)])
            stamp = getattr(newest and newest["_id"], "generation_time", None)
            if stamp is not None and stamp.timestamp() < cutoff:
                found.append(digest)
        return found

    # --- statistics ------------------------------------------------------------------
    def write_statistics(self, session_id: str, points: Iterable[StatPoint]) -> int:
        """Upsert points in batches; a point written again overwrites, never duplicates."""
        prefix = quote(session_id, safe="")
        docs: dict[str, dict[str, Any]] = {}
        for p in points:
            phase, name = str(_plain(p.phase)), str(p.name)
            doc_id = f"{prefix}/{quote(phase, safe='')}/{int(p.step)}/{name}"
            docs[doc_id] = {
                "_id": doc_id, "session": session_id, "phase": phase, "step": int(p.step),
                "name": name, "value": _enc_number(float(p.value)), "time": float(p.time),
            }  # fmt: skip
        batch = list(docs.values())
        for start in range(0, len(batch), STAT_BATCH):
            chunk = batch[start : start + STAT_BATCH]
            self._retry(f"writing statistics of {session_id}", lambda _, c=chunk: self._upsert(c))
        return len(batch)

    def _upsert(self, docs: list[dict[str, Any]]) -> None:
        """insert_many (fast path), then replace just the points that already existed."""
        try:
            self._stats.insert_many([dict(d) for d in docs], ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") not in (11000, 11001) for e in errors):
                raise
            dup = [docs[e["index"]] for e in errors]
            self._stats.bulk_write(
                [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in dup], ordered=False
            )

    def delete_statistics(self, session_id: str, *, after_step: int) -> int:
        result = self._retry(
            f"deleting statistics of {session_id}",
            lambda _: self._stats.delete_many(
                {"session": session_id, "step": {"$gt": int(after_step)}}
            ),
        )
        return result.deleted_count

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
        query: dict[str, Any] = {}
        if session_id is not None:
            query["session"] = (
                session_id if isinstance(session_id, str) else {"$in": list(session_id)}
            )
        if name is not None:
            query["name"] = name
        if phase is not None:
            query["phase"] = _plain(phase)
        steps = {op: int(v) for op, v in (("$gte", step_min), ("$lte", step_max)) if v is not None}
        if steps:
            query["step"] = steps
        order = [("session", 1), ("step", 1), ("name", 1), ("phase", 1)]
        docs = self._retry(
            "querying statistics",
            lambda _: list(self._stats.find(query, {"_id": 0}).sort(order)),
        )
        return [_point_out(d) for d in docs]


def _point_out(doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "session": doc["session"], "phase": doc["phase"], "step": doc["step"],
        "name": doc["name"], "value": float(_dec_number(doc["value"])), "time": doc.get("time"),
    }  # fmt: skip
