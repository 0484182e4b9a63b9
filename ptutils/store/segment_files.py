"""Content-addressed segment files of the local store: `<folder>/<hh>/<hash>`, written once.

A put writes its missing segments to temp files named after their hash and writer pid,
in parallel threads (`WRITE_THREADS`). Each thread copies the segment's bytes into an
aligned buffer of its own (`WRITE_BLOCK`, allocated once and reused), hashes the copy
and writes that same copy, so the file holds exactly the bytes that were hashed: a State
changed while it was being saved fails verification (length + xxh3_128) instead of
landing under a wrong name, with no second read of the file. Segments of `DIRECT_MIN`
bytes and more go straight to the disk (`O_DIRECT`), skipping a copy into the page
cache and the flush of it later; smaller ones, and all of them on a filesystem that
refuses direct I/O (`EINVAL`), are plain buffered writes.

The segments are then made durable with a bounded number of syncs whatever their
count: one filesystem barrier for the data (`syncfs`), the renames into place, and a
second barrier for the names. The caller commits its record only after that, so a
file at its final name is always complete and on disk when a checkpoint lists it.
(Before, every segment took a file fsync and a folder fsync: 1,270 syncs for a 200 MB
State.) Where `syncfs` is missing (not Linux), each file and folder is fsynced instead.
`syncs` counts the sync calls made, for tests and benchmarks.

A crash leaves only temp files, which a later writer of the same segment (or
`collect_garbage`) removes once its writer is dead or it is older than `STALE_TEMP_S`.
Which files are still referenced is the database's business (see `LocalStore`), not
this module's.
"""

from __future__ import annotations

import ctypes
import errno
import math
import mmap
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import xxhash

from ptutils.errors import CheckpointCorrupt, StoreError
from ptutils.procs import pid_alive

if TYPE_CHECKING:
    from ptutils.codec import Segment

READ_BLOCK = 8 << 20
"""Bytes read at a time when a segment file is hashed (`intact`)."""

WRITE_BLOCK = 8 << 20
"""Bytes copied, hashed and written at a time by one writer thread (its buffer's size)."""

DIRECT_MIN = 1 << 20
"""Smaller segments are written through the page cache: a direct write waits for the
device, which costs more than the copy it saves on a few KiB (the barrier flushes them)."""

_ALIGN = 4096
"""Alignment of O_DIRECT buffers, offsets and lengths (any logical block size up to 4 KiB)."""

_O_DIRECT = getattr(os, "O_DIRECT", 0)

WRITE_THREADS = max(1, min(4, os.cpu_count() or 1))
"""Threads that write and verify the segments of one put."""

PARALLEL_MIN = 8 << 20
"""Bytes to write below which a put writes its segments in the calling thread: for a
small State, starting threads and handing the GIL between them costs more CPU than the
copying and hashing they would share (and a background put then takes that CPU from
the training thread)."""

STALE_TEMP_S = 3600.0
"""A temp segment file older than this (or whose writer died) is a crash leftover."""

_HASH_RE = re.compile(r"^[0-9a-f]{32}$")
_TEMP_RE = re.compile(r"^\.([0-9a-f]{32})\.(\d+)\.[0-9a-f]+\.tmp$")


class SegmentFiles:
    """The segment files under one folder, named by their xxh3_128 hex digest."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.syncs = 0
        """Sync calls (syncfs or fsync) made by this object's writes."""
        self._direct = bool(_O_DIRECT)
        self._root = str(folder)
        self._ready: set[str] = set()
        """Subfolders made, and cleared of dead writers' temp files, by this object."""

    def path(self, digest: str, where: str = "") -> Path:
        """Where the segment `digest` lives; `CheckpointCorrupt` for a name that is no hash."""
        return Path(self._file(digest, where))

    def _file(self, digest: str, where: str = "") -> str:
        """`path` as a string (the write path makes a few per segment: no Path objects)."""
        if not _HASH_RE.match(digest):
            raise CheckpointCorrupt(f"{where or 'checkpoint'}: invalid segment name {digest!r}")
        return f"{self._root}/{digest[:2]}/{digest}"

    def missing(self, segments: Iterable[Segment]) -> list[Segment]:
        """The segments with no complete file on disk."""
        return [s for s in segments if not _present(self._file(s.hash), s.nbytes)]

    def write_missing(self, segments: Iterable[Segment]) -> int:
        """Write every segment not already present, durably; returns the bytes written."""
        todo: dict[str, tuple[Segment, str]] = {}
        for seg in segments:
            if seg.hash not in todo:
                final = self._file(seg.hash)
                if not _present(final, seg.nbytes):
                    todo[seg.hash] = (seg, final)
        if not todo:
            return 0
        jobs = list(todo.values())
        temps: list[str] = []
        renamed = 0
        try:
            if len(jobs) == 1 or sum(seg.nbytes for seg, _ in jobs) < PARALLEL_MIN:
                for seg, final in jobs:
                    temps.append(self._write_temp(seg, final))
            else:
                with ThreadPoolExecutor(min(WRITE_THREADS, len(jobs))) as pool:
                    futures = [pool.submit(self._write_temp, seg, final) for seg, final in jobs]
                errors = [f.exception() for f in futures if f.exception() is not None]
                temps.extend(f.result() for f in futures if f.exception() is None)
                if errors:
                    raise errors[0]
            self._barrier(temps)  # the data is on disk before any final name exists
            for tmp, (_, final) in zip(temps, jobs, strict=True):
                os.replace(tmp, final)
                renamed += 1
            self._barrier(sorted({os.path.dirname(final) for _, final in jobs}), dirs=True)
        except OSError as exc:
            raise StoreError(f"cannot write segments under {self.folder}: {exc}") from exc
        finally:
            for tmp in temps[renamed:]:  # a renamed temp is gone: no failing unlink for it
                _unlink(tmp)
        return sum(seg.nbytes for seg, _ in jobs)

    def write(self, seg: Segment) -> None:
        """Write one segment durably (see `write_missing`)."""
        path = self.path(seg.hash)
        path.unlink(missing_ok=True)  # rewrite a damaged copy
        self.write_missing([seg])

    def _write_temp(self, seg: Segment, final: str) -> str:
        """The segment in a verified temp file next to its `final` name (not yet synced)."""
        folder = os.path.dirname(final)
        if folder not in self._ready:  # once per folder for this object, not per segment
            os.makedirs(folder, exist_ok=True)
            _remove_stale_temps(Path(folder))
            self._ready.add(folder)
        tmp = f"{folder}/.{seg.hash}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            try:
                digest, nbytes = self._write_file(tmp, seg)
            except FileNotFoundError:  # the folder was removed since (by hand): again
                os.makedirs(folder, exist_ok=True)
                digest, nbytes = self._write_file(tmp, seg)
            if (digest, nbytes) != (seg.hash, seg.nbytes):
                raise StoreError(
                    f"segment {seg.hash} failed verification while writing {tmp}: its "
                    f"{nbytes} bytes hash to {digest}, expected {seg.nbytes} bytes; the "
                    "state changed while it was being saved"
                )
        except BaseException:
            _unlink(tmp)
            raise
        return tmp

    def _write_file(self, tmp: str, seg: Segment) -> tuple[str, int]:
        """Write the segment's bytes to `tmp` (direct I/O where the filesystem takes it);
        returns the xxh3_128 digest and length of the bytes written."""
        if self._direct and seg.nbytes >= DIRECT_MIN:
            try:
                return _write_segment(tmp, seg, direct=True)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct = False  # no O_DIRECT here: buffered writes from now on
        return _write_segment(tmp, seg, direct=False)

    def _barrier(self, paths: list[str], *, dirs: bool = False) -> None:
        """Make `paths` (and, with `dirs`, the entries in those folders) durable: one
        `syncfs` of the store's filesystem, else an fsync of each path."""
        if _syncfs(self.folder):
            self._count(1)
            return
        for path in paths:
            _fsync_path(path)
        if dirs:
            _fsync_path(self.folder)
        self._count(len(paths) + int(dirs))

    def _count(self, n: int) -> None:
        with _SYNC_LOCK:
            self.syncs += n

    def intact(self, digest: str, nbytes: int) -> bool:
        """Whether the segment's file is there with its length and hash (read in full)."""
        try:
            return _file_digest(self.path(digest)) == (digest, nbytes)
        except (CheckpointCorrupt, FileNotFoundError):
            return False

    def unlink(self, digest: str) -> bool:
        """Remove the segment's file; False if it was already gone."""
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            return False
        return True

    def remove_stale_temps(self, cutoff: float) -> int:
        """Remove temp files whose writer died or that were last touched before `cutoff`."""
        return sum(_remove_stale_temps(folder, cutoff) for folder in self._subfolders())

    def older_than(self, cutoff: float) -> list[str]:
        """Digests of the segment files last modified before `cutoff`."""
        return [
            path.name
            for folder in self._subfolders()
            for path in folder.iterdir()
            if _HASH_RE.match(path.name) and _mtime(path) < cutoff
        ]

    def _subfolders(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_dir())


def _present(path: str, nbytes: int) -> bool:
    """A complete segment file: at its final name with the right size (temps never count)."""
    try:
        return os.stat(path).st_size == nbytes
    except FileNotFoundError:
        return False


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


_FREE_BUFFERS: list[memoryview] = []
"""Page-aligned write buffers of `WRITE_BLOCK` bytes not in use, kept for the next put
(at most `WRITE_THREADS` are kept: 32 MiB)."""
_BUFFER_LOCK = threading.Lock()


def _take_buffer() -> memoryview:
    with _BUFFER_LOCK:
        if _FREE_BUFFERS:
            return _FREE_BUFFERS.pop()
    return memoryview(mmap.mmap(-1, WRITE_BLOCK))


def _give_buffer(buf: memoryview) -> None:
    with _BUFFER_LOCK:
        if len(_FREE_BUFFERS) < WRITE_THREADS:
            _FREE_BUFFERS.append(buf)


def _write_segment(path: str, seg: Segment, *, direct: bool) -> tuple[str, int]:
    """Copy the segment block by block into this thread's buffer, hash the copy, write it.

    With `direct`, the file is opened with O_DIRECT: every write is a whole number of
    `_ALIGN` blocks from the aligned buffer (the last one padded with what the buffer
    holds), and the file is cut back to the segment's length at the end."""
    hasher = xxhash.xxh3_128()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags | (_O_DIRECT if direct else 0), 0o644)
    buf = _take_buffer()
    total = 0
    try:
        for piece in seg.chunks(WRITE_BLOCK):
            n = len(piece)
            buf[:n] = piece
            hasher.update(buf[:n])
            _write_all(fd, buf[: -(-n // _ALIGN) * _ALIGN] if direct else buf[:n])
            total += n
        if direct and total % _ALIGN:
            os.ftruncate(fd, total)
    finally:
        os.close(fd)
        _give_buffer(buf)
    return hasher.hexdigest(), total


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


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


def _fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SYNC_LOCK = threading.Lock()
_LIBC_SYNCFS: list[object] = []


def _syncfs(folder: Path) -> bool:
    """syncfs(2) of the filesystem holding `folder` (Linux); False where unavailable."""
    if not _LIBC_SYNCFS:
        try:
            fn = ctypes.CDLL(None, use_errno=True).syncfs
            fn.argtypes = [ctypes.c_int]
            _LIBC_SYNCFS.append(fn)
        except (AttributeError, OSError):
            _LIBC_SYNCFS.append(None)
    fn = _LIBC_SYNCFS[0]
    if fn is None:
        return False
    fd = os.open(folder, os.O_RDONLY)
    try:
        if fn(fd) != 0:  # type: ignore[operator]
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}", str(folder))
    finally:
        os.close(fd)
    return True


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return math.inf


def _remove_stale_temps(folder: Path, cutoff: float | None = None) -> int:
    """Remove the temp files in `folder` whose writer died or that are too old."""
    cutoff = time.time() - STALE_TEMP_S if cutoff is None else cutoff
    removed = 0
    with os.scandir(folder) as entries:
        names = [e.name for e in entries]
    for name in names:
        m = _TEMP_RE.match(name)
        if m is None:
            continue
        path = folder / name
        if _mtime(path) < cutoff or not pid_alive(int(m.group(2))):
            path.unlink(missing_ok=True)
            removed += 1
    return removed
