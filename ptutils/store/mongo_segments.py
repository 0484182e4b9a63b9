"""State segments in a GridFS bucket: content addressed, written once, shared.

A segment is a GridFS file whose `_id` and filename are its xxh3_128 hash, written once
and shared by every checkpoint that lists it in its `segments`. Two small bookkeeping
collections coordinate writers and deleters:

- `<bucket>_uploads`: one document per put in flight, listing the segments it will
  reference, inserted before it looks at GridFS and removed after its checkpoint
  document is in. A segment listed there counts as referenced.
- `<bucket>_deletions`: a tombstone per segment being deleted. A deleter inserts it,
  then checks references, then removes the data; a writer that finds a tombstone waits
  for it to go. So if a writer saw no tombstone, its upload registration precedes the
  deleter's reference check, which then sees it: a segment a put relies on is never
  deleted under it.
"""

from __future__ import annotations

import datetime as _dt
import io
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bson import Int64
from gridfs.errors import CorruptGridFile
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError

from ptutils import codec
from ptutils.errors import CheckpointCorrupt, StoreError
from ptutils.store.base import new_id
from ptutils.store.mongo_retry import Interrupted, Retry, is_duplicate, is_transient, log

CHUNK_SIZE = 255 * 1024
"""GridFS chunk size of segments (the GridFS default); fixed, so every writer of a
segment produces identical chunks."""

CHUNK_BATCH = 16
"""GridFS chunks per insert or read (4 MiB): what a save or load holds beyond the State."""

WRITE_THREADS = 4
"""Threads that upload and verify the segments of one put (each holds one batch of
`CHUNK_BATCH` chunks at a time)."""

UPLOAD_WAIT_S = 10.0
"""How long a writer waits for another live writer to finish the same segment before
it takes over (deletes the partial copy and uploads it itself)."""

TOMBSTONE_STALE_S = 60.0
"""A deletion tombstone older than this was left by a crashed deleter."""

_SEGMENT_ATTEMPTS = 4

Doc = dict[str, Any]


class SegmentStore:
    """The segments of one GridFS bucket, and who references them.

    References are the `segments` lists of live documents in `checkpoints` and of
    registered uploads. Every public method retries transient errors through `retry`.
    """

    def __init__(
        self,
        db: Database[Doc],
        bucket: str,
        checkpoints: Collection[Doc],
        retry: Retry,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bucket = bucket
        self._ckpts = checkpoints
        self._retry = retry
        self._now = clock  # the store's clock: every age is judged by it
        # Underscores, not dots: nx-27017 only accepts dotted names for GridFS collections.
        self._uploads = db[f"{bucket}_uploads"]
        self._deletions = db[f"{bucket}_deletions"]
        self._files = db[f"{bucket}.files"]
        self._chunks = db[f"{bucket}.chunks"]

    def create_indexes(self) -> None:
        """Idempotent; includes the indexes every GridFS driver creates before uploading."""
        self._uploads.create_index("segments")
        self._chunks.create_index([("files_id", 1), ("n", 1)], unique=True)
        self._files.create_index([("filename", 1), ("uploadDate", 1)])

    # --- uploads ---------------------------------------------------------------------
    def register(self, put_id: str, session_id: str, hashes: list[str]) -> None:
        """List the segments a put will reference, before it looks at any of them."""
        doc = {"_id": put_id, "session": session_id, "segments": hashes, "created": self._now()}

        def insert(retried: bool) -> None:
            try:
                self._uploads.insert_one(dict(doc))
            except DuplicateKeyError:
                if not retried:
                    raise

        self._retry("registering an upload", insert)

    def unregister(self, put_id: str, *, retry: bool) -> None:
        """Best effort (a leftover only pins segments until garbage collection drops it);
        no retries when the put failed, so its error is not delayed by a second wait."""
        try:
            if retry:
                self._retry("unregistering an upload",
                            lambda _: self._uploads.delete_one({"_id": put_id}))  # fmt: skip
            else:
                self._uploads.delete_one({"_id": put_id})
        except (StoreError, PyMongoError) as exc:
            log.warning("could not unregister upload %s: %s", put_id, self._retry.scrub(str(exc)))

    def write_all(self, segments: list[codec.Segment], put_id: str, where: str) -> int:
        """Store each of `segments` (see `write`) in `WRITE_THREADS` parallel threads;
        the bytes written. The first error is raised once every thread is done."""
        if len(segments) <= 1:
            return sum(self.write(seg, put_id, where) for seg in segments)
        with ThreadPoolExecutor(min(WRITE_THREADS, len(segments))) as pool:
            futures = [pool.submit(self.write, seg, put_id, where) for seg in segments]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]  # type: ignore[misc]
        return sum(f.result() for f in futures)

    def write(self, seg: codec.Segment, put_id: str, where: str) -> int:
        """Store `seg` unless a verified copy is there; the bytes written."""
        return self._retry(
            f"storing segment {seg.hash} of {where}",
            lambda retried: self._ensure(seg, put_id, retried),
        )

    def _ensure(self, seg: codec.Segment, put_id: str, retried: bool) -> int:
        """Make sure a complete, verified copy of `seg` is stored; the bytes written.

        A segment found complete at the first look was verified by its writer and is
        reused as is. Otherwise: leftovers of a crashed writer (chunks without a complete
        files document) are removed unless another live put is uploading the same
        segment, in which case we wait for it; then upload, and read back to verify.
        """
        first = not retried
        for _ in range(_SEGMENT_ATTEMPTS):
            self._wait_for_deletion(seg.hash)
            status = self._status(seg)
            if status == "complete":
                if first or self._verify(seg):
                    return 0
                self._drop_data(seg.hash)  # corrupt copy: write it again
            elif status == "partial" or not first:
                if self._other_writer_finishes(seg, put_id):
                    first = False
                    continue
                self._drop_data(seg.hash)
            first = False
            if not self._upload(seg):
                continue  # someone else's chunks are there: look again
            if self._verify(seg):
                return seg.nbytes
            self._drop_data(seg.hash)
        raise StoreError(
            f"MongoDB at {self._retry.url}: could not store segment {seg.hash} "
            f"after {_SEGMENT_ATTEMPTS} attempts (it kept failing verification)"
        )

    def _status(self, seg: codec.Segment) -> str:
        """The copy stored: "absent", "partial" (files document of the wrong length), or
        "complete".

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
        batch: list[Doc] = []
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
                "metadata": {"created": self._now()},
            })  # fmt: skip
        except PyMongoError as exc:
            if is_duplicate(exc):
                return False
            raise
        return True

    def _verify(self, seg: codec.Segment) -> bool:
        """Read the stored segment back: right length and checksum."""
        return self._intact(seg.hash, seg.nbytes)

    def _intact(self, digest: str, nbytes: int) -> bool:
        meta = self._files.find_one({"_id": digest})
        if meta is None or meta.get("length") != nbytes:
            return False
        hasher = codec.Hasher()
        try:
            for chunk in self._read_chunks(meta):
                hasher.update(chunk)
        except CorruptGridFile:
            return False
        return hasher.hexdigest() == digest

    def _other_writer_finishes(self, seg: codec.Segment, put_id: str) -> bool:
        """Wait while another registered put may be uploading `seg`; True if it completed."""
        deadline = time.monotonic() + UPLOAD_WAIT_S
        query = {"segments": {"$in": [seg.hash]}, "_id": {"$ne": put_id}}
        while time.monotonic() < deadline and self._uploads.find_one(query, {"_id": 1}):
            time.sleep(0.2)
            if self._status(seg) == "complete":
                return True
        return False

    # --- reads -----------------------------------------------------------------------
    def open(self, digest: str, nbytes: int | None, where: str) -> io.RawIOBase:
        """A stored segment of `nbytes` bytes as a stream; CheckpointCorrupt if it is
        missing or of another length. Called inside a retry (transient: Interrupted)."""
        try:
            meta = self._files.find_one({"_id": digest})
        except PyMongoError as exc:
            if is_transient(exc):
                raise Interrupted(exc) from None
            raise
        if meta is None:
            raise CheckpointCorrupt(
                f"{where}: segment {digest} is missing from GridFS bucket {self.bucket}"
            )
        if meta.get("length") != nbytes:
            raise CheckpointCorrupt(
                f"{where}: segment {digest} holds {meta.get('length')} bytes, expected {nbytes}"
            )
        return _SegmentStream(self._read_chunks(meta), digest, where)

    def _read_chunks(self, meta: Doc) -> Iterator[bytes]:
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

    # --- deletion --------------------------------------------------------------------
    def delete_unreferenced(self, digests: Iterable[str]) -> int:
        """Delete each of `digests` that nothing references; how many were deleted."""
        return sum(
            self._retry(f"deleting segment {digest}", lambda _, d=digest: self._delete(d))
            for digest in dict.fromkeys(digests)
        )

    def _delete(self, digest: str, *, referenced_too: bool = False) -> bool:
        """Tombstone, check references, delete data, lift the tombstone. True if deleted.

        `referenced_too` deletes a rotten segment that checkpoints still list: a writer
        waits for the tombstone and then uploads it afresh.
        """
        token = new_id()
        try:
            self._deletions.insert_one({"_id": digest, "token": token, "at": self._now()})
        except DuplicateKeyError:
            stone = self._deletions.find_one({"_id": digest})
            if stone is None or stone.get("token") != token:
                return False  # another deleter holds it (or just finished)
        try:
            return (referenced_too or not self._referenced(digest)) and self._drop_data(digest)
        finally:
            self._deletions.delete_one({"_id": digest, "token": token})

    def drop_rotten(self, digests: Iterable[str]) -> int:
        """Delete segments that fail their checksum, referenced or not; how many."""
        return sum(
            self._retry(
                f"dropping rotten segment {digest}",
                lambda _, d=digest: self._delete(d, referenced_too=True),
            )
            for digest in dict.fromkeys(digests)
        )

    def intact(self, digest: str, nbytes: int) -> bool:
        """Whether the stored segment is there, of `nbytes` bytes, and hashes to `digest`."""
        return self._retry(f"verifying segment {digest}", lambda _: self._intact(digest, nbytes))

    def _referenced(self, digest: str) -> bool:
        """Does a put in flight, or a live checkpoint, use this segment?

        Uploads are read first, checkpoints second: a put inserts its checkpoint document
        before it unregisters, so a put that is gone from the uploads by the first read
        has its checkpoint found by the second. (Checkpoints first lost a segment: the
        put committed after that read and unregistered before the next.)
        """
        if self._uploads.find_one({"segments": {"$in": [digest]}}, {"_id": 1}) is not None:
            return True
        live = {"segments": {"$in": [digest]}, "state": {"$ne": "deleting"}}
        return self._ckpts.find_one(live, {"_id": 1}) is not None

    def _drop_data(self, digest: str) -> bool:
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
            if self._now() - float(stone.get("at", 0)) > TOMBSTONE_STALE_S:
                self._deletions.delete_one({"_id": digest, "token": stone.get("token")})
            else:
                time.sleep(0.05)

    # --- garbage collection ----------------------------------------------------------
    def drop_stale_uploads(self, cutoff: float) -> None:
        """Forget registrations older than `cutoff` (puts that died)."""
        self._retry(
            "dropping stale upload registrations",
            lambda _: self._uploads.delete_many({"created": {"$lt": cutoff}}),
        )

    def unreferenced(self, cutoff: float) -> list[str]:
        """Segments older than `cutoff` that no checkpoint or upload lists."""
        return self._retry("listing segments", lambda _: self._gc_candidates(cutoff))

    def _gc_candidates(self, cutoff: float) -> list[str]:
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
    error raises `Interrupted`, which the codec passes through to the retry loop.
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
                raise Interrupted(exc) from None
            raise
