"""Content-addressed segment files of the local store: `<folder>/<hh>/<hash>`, written once.

A segment is written to a temp file named after its hash and writer pid, fsynced, read
back and verified (length + xxh3_128), then renamed into place and its folder fsynced:
a file at its final name is always complete. A crash leaves only a temp file, which a
later writer of the same segment (or `collect_garbage`) removes once its writer is dead
or it is older than `STALE_TEMP_S`. Which files are still referenced is the database's
business (see `LocalStore`), not this module's.
"""

from __future__ import annotations

import math
import os
import re
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import xxhash

from ptutils.errors import CheckpointCorrupt, StoreError
from ptutils.procs import pid_alive

if TYPE_CHECKING:
    from ptutils.codec import Segment

READ_BLOCK = 8 << 20
"""Bytes read at a time when a written segment is hashed back."""

STALE_TEMP_S = 3600.0
"""A temp segment file older than this (or whose writer died) is a crash leftover."""

_HASH_RE = re.compile(r"^[0-9a-f]{32}$")
_TEMP_RE = re.compile(r"^\.([0-9a-f]{32})\.(\d+)\.[0-9a-f]+\.tmp$")


class SegmentFiles:
    """The segment files under one folder, named by their xxh3_128 hex digest."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, digest: str, where: str = "") -> Path:
        """Where the segment `digest` lives; `CheckpointCorrupt` for a name that is no hash."""
        if not _HASH_RE.match(digest):
            raise CheckpointCorrupt(f"{where or 'checkpoint'}: invalid segment name {digest!r}")
        return self.folder / digest[:2] / digest

    def missing(self, segments: Iterable[Segment]) -> list[Segment]:
        """The segments with no complete file on disk."""
        return [s for s in segments if not _present(self.path(s.hash), s.nbytes)]

    def write_missing(self, segments: Iterable[Segment]) -> int:
        """Write every segment not already present; returns the bytes written."""
        written = 0
        for seg in segments:
            if not _present(self.path(seg.hash), seg.nbytes):
                self.write(seg)
                written += seg.nbytes
        return written

    def write(self, seg: Segment) -> None:
        """Temp file, fsync, re-read and verify, rename, fsync the folder."""
        path = self.path(seg.hash)
        folder = path.parent
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            _fsync_dir(folder.parent)
        _remove_stale_temps(folder, seg.hash)
        tmp = folder / f".{seg.hash}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            _write_synced(tmp, seg)
            _verify(tmp, seg)
            os.replace(tmp, path)
            _fsync_dir(folder)
        except OSError as exc:
            raise StoreError(f"cannot write segment {path}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)

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
        return sum(_remove_stale_temps(folder, None, cutoff) for folder in self._subfolders())

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


def _present(path: Path, nbytes: int) -> bool:
    """A complete segment file: at its final name with the right size (temps never count)."""
    try:
        return path.stat().st_size == nbytes
    except FileNotFoundError:
        return False


def _write_synced(path: Path, seg: Segment) -> None:
    with open(path, "wb") as f:
        for chunk in seg.chunks():
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def _verify(tmp: Path, seg: Segment) -> None:
    """Read the written file back: it must have the segment's length and hash."""
    digest, nbytes = _file_digest(tmp)
    if (digest, nbytes) != (seg.hash, seg.nbytes):
        raise StoreError(
            f"segment {seg.hash} failed verification after writing {tmp}: read back "
            f"{nbytes} bytes hashing to {digest}, expected {seg.nbytes} bytes; the disk "
            "may be full or failing, or the state changed while it was being saved"
        )


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


    return True


def _remove_stale_temps(folder: Path, digest: str | None, cutoff: float | None = None) -> int:
    """Remove temp files (of `digest`, or all) whose writer died or that are too old."""
    cutoff = time.time() - STALE_TEMP_S if cutoff is None else cutoff
    removed = 0
    for path in folder.glob(f".{digest or '*'}.*.tmp"):
        m = _TEMP_RE.match(path.name)
        if m is None:
            continue
        if _mtime(path) < cutoff or not pid_alive(int(m.group(2))):
            path.unlink(missing_ok=True)
            removed += 1
    return removed
