"""The single-file State format: `dump`/`load` on file objects, `dumps`/`loads` on bytes.

Layout (all integers little-endian)::

    magic      12 bytes  b"\\x89PTSTATE\\r\\n\\x1a\\n"  (no zip "PK", no pickle "\\x80")
    version     u16      FORMAT_VERSION
    flags       u16      0
    length      u64      manifest length in bytes
    digest     16 bytes  xxh3_128 of the manifest
    manifest   `length` bytes (msgpack, see segments.py)
    segments   each distinct segment once, in manifest order, each starting at a
               multiple of 64 bytes from the start (zero padding), so zero-copy views
               are aligned for every dtype.

Every byte is covered: header fields are checked, the manifest and every segment by
their checksums, padding must be zero, and nothing may follow the last segment.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, BinaryIO

import xxhash

from ptutils.codec.buffers import allocate, check_room, readonly_views, view_of
from ptutils.codec.rawbytes import new_bytes
from ptutils.codec.segments import (
    FORMAT_VERSION,
    Encoded,
    Entry,
    Plan,
    checksum,
    encode,
    guard,
    materialize,
    parse_manifest,
    read_into,
    read_segment,
)
from ptutils.codec.structure import decode_tree
from ptutils.errors import CodecError

MAGIC = b"\x89PTSTATE\r\n\x1a\n"
ALIGN = 64
MAX_MANIFEST = 2**30
"""Largest manifest accepted (1 GiB); a bigger length field means a corrupt header."""

_HEADER = struct.Struct("<12sHHQ16s")
_ZEROS = bytes(ALIGN)


def _header(manifest: bytes) -> bytes:
    digest = xxhash.xxh3_128(manifest).digest()
    return _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(manifest), digest)


def _parts(encoded: Encoded) -> Iterator[bytes | memoryview]:
    """The blob as a sequence of pieces: header, manifest, then padding and segment views."""
    yield _header(encoded.manifest)
    yield encoded.manifest
    position = _HEADER.size + len(encoded.manifest)
    for segment in encoded.segments:
        pad = -position % ALIGN
        if pad:
            yield _ZEROS[:pad]
        yield from segment.chunks()
        position += pad + segment.nbytes


def dumps(state: Any) -> bytes:
    """The State as one blob; tensor bytes are copied once, into the result."""
    parts = list(_parts(encode(state)))
    allocated = new_bytes(sum(len(p) for p in parts))
    if allocated is None:
        return b"".join(parts)
    out, dest = allocated
    with dest:
        position = 0
        for part in parts:
            dest[position : position + len(part)] = part
            position += len(part)
    return out


def dump(state: Any, fileobj: BinaryIO) -> int:
    """Stream the State to a binary file object; returns the bytes written.

    Tensor bytes are written straight from tensor memory: the extra memory is the
    manifest, not the state.
    """
    written = 0
    for part in _parts(encode(state)):
        written += _write_all(fileobj, part)
    return written


def _write_all(fileobj: BinaryIO, data: bytes | memoryview) -> int:
    view = memoryview(data)
    done = 0
    while done < len(view):
        got = fileobj.write(view[done:])
        done += len(view) - done if got is None else got
    return done


def loads(data: Any, *, zero_copy: bool = False, verify: bool = True) -> Any:
    """Decode a blob held in memory (bytes, bytearray, memoryview, mmap).

    With `zero_copy=True` arrays are views on `data` (no copy; they keep it alive).
    If `data` is read-only (bytes), those tensors are read-only views: writing to them
    is undefined behaviour; pass a bytearray for writable ones. Otherwise every array
    owns its memory, filled with one copy from `data`.
    """
    with guard("cannot load the state blob"):
        view = _byte_view(data)
        plan, start = _parse_head(
            view[: _HEADER.size], lambda n: view[_HEADER.size : _HEADER.size + n]
        )
        offsets = _check_layout(view, plan, start)
        if verify:
            for digest, nbytes in plan.segments:
                _verify(view[offsets[digest] : offsets[digest] + nbytes], digest)
        if zero_copy:
            arrays = _views(plan, view, offsets)
        else:
            arrays = materialize(plan, lambda h, n, target: _copy(view, offsets[h], target))
        return decode_tree(plan.tree, arrays)


def load(fileobj: BinaryIO, *, verify: bool = True) -> Any:
    """Decode a blob from a binary file object, reading segments straight into arrays."""
    with guard("cannot load the state blob"):
        plan, start = _parse_head(_read(fileobj, _HEADER.size), lambda n: _read(fileobj, n))
        _check_size(fileobj, plan, start)
        position = start

        def fill(digest: str, nbytes: int, target: memoryview) -> None:
            nonlocal position
            _skip_padding(fileobj, position)
            read_segment(fileobj, digest, target, verify=verify)
            position += -position % ALIGN + nbytes

        arrays = materialize(plan, fill)
        if read_into(fileobj, memoryview(bytearray(1))):
            raise CodecError(
                "unexpected bytes after the last segment: corrupt or concatenated blob"
            )
        return decode_tree(plan.tree, arrays)


def _byte_view(data: Any) -> memoryview:
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _read(fileobj: BinaryIO, nbytes: int) -> bytes:
    """Up to `nbytes` from the stream, in bounded pieces (never trusts `nbytes` for one allocation)."""
    pieces, left = [], nbytes
    while left:
        piece = fileobj.read(min(left, 64 * 2**20))
        if not piece:
            break
        pieces.append(piece)
        left -= len(piece)
    return b"".join(pieces)


def _parse_head(head: Any, read_manifest: Any) -> tuple[Plan, int]:
    """Validate header and manifest; the parsed plan and where segment data starts."""
    if len(head) < _HEADER.size or bytes(head[: len(MAGIC)]) != MAGIC:
        raise CodecError(_foreign(bytes(head[:16])))
    _, version, flags, length, digest = _HEADER.unpack(head)
    if version != FORMAT_VERSION:
        hint = "upgrade ptutils to read it" if version > FORMAT_VERSION else "unknown version"
        raise CodecError(
            f"blob format version {version}: this ptutils reads {FORMAT_VERSION}; {hint}"
        )
    if flags or length > MAX_MANIFEST:
        raise CodecError(f"corrupt header (flags {flags}, manifest length {length})")
    manifest = read_manifest(length)
    if len(manifest) < length:
        raise CodecError(
            f"truncated blob: the manifest needs {length} bytes, {len(manifest)} present"
        )
    if xxhash.xxh3_128(manifest).digest() != digest:
        raise CodecError("the manifest fails its checksum: corrupt blob")
    return parse_manifest(manifest), _HEADER.size + length


def _foreign(prefix: bytes) -> str:
    """Say what a blob that is not ours looks like."""
    if not prefix:
        return "empty input (0 bytes): not a ptutils State blob"
    if prefix.startswith(b"PK\x03\x04"):
        return (
            "this is a zip archive (what torch.save writes), not a ptutils State blob; "
            "load it with torch.load(..., weights_only=True) and save it again with ptutils.codec"
        )
    if prefix[0] == 0x80 and len(prefix) > 1 and prefix[1] <= 5:
        return "this is a pickle, not a ptutils State blob; ptutils never unpickles"
    if MAGIC.startswith(prefix):
        return f"truncated blob: {len(prefix)} bytes, the header alone needs {_HEADER.size}"
    if prefix.startswith(MAGIC):
        return f"truncated header: {len(prefix)} bytes, needs {_HEADER.size}"
    return f"not a ptutils State blob (starts with {prefix.hex()}, expected {MAGIC.hex()})"


def _check_layout(view: memoryview, plan: Plan, start: int) -> dict[str, int]:
    """Offsets of the segments in a blob held in memory; checks padding and length."""
    offsets, position = {}, start
    for digest, nbytes in plan.segments:
        pad = -position % ALIGN
        if position + pad > len(view):
            raise CodecError(_short(view, position + pad))
        if bytes(view[position : position + pad]) != _ZEROS[:pad]:
            raise CodecError(f"corrupt padding before segment {digest}")
        offsets[digest] = position + pad
        position += pad + nbytes
    if len(view) < position:
        raise CodecError(_short(view, position))
    if len(view) > position:
        raise CodecError(f"{len(view) - position} unexpected bytes after the last segment")
    return offsets


def _short(view: memoryview, needed: int) -> str:
    return f"truncated blob: {len(view)} bytes, the manifest describes {needed}"


def _check_size(fileobj: BinaryIO, plan: Plan, start: int) -> None:
    """Refuse early (before allocating) a seekable file too short for its manifest."""
    try:
        if not fileobj.seekable():
            return
        here = fileobj.tell()
        end = fileobj.seek(0, 2)
        fileobj.seek(here)
    except (OSError, AttributeError, ValueError):
        return
    needed = start
    for _, nbytes in plan.segments:
        needed += -needed % ALIGN + nbytes
    if end - here + start < needed:
        raise CodecError(
            f"truncated blob: {end - here + start} bytes, the manifest describes {needed}"
        )


def _skip_padding(fileobj: BinaryIO, position: int) -> None:
    pad = -position % ALIGN
    if pad and _read(fileobj, pad) != _ZEROS[:pad]:
        raise CodecError(f"corrupt or truncated padding at byte {position}")


def _verify(piece: memoryview, digest: str) -> None:
    if checksum(piece) != digest:
        raise CodecError(
            f"segment {digest} fails its checksum (got {checksum(piece)}): corrupt data"
        )


def _copy(view: memoryview, offset: int, target: memoryview) -> None:
    """One copy from the blob into the destination array."""
    target[:] = view[offset : offset + len(target)]


def _views(plan: Plan, view: memoryview, offsets: dict[str, int]) -> list[Any]:
    """Arrays sharing the blob's memory; an array whose segments are not one fresh run of
    the blob (a repeat of earlier bytes) gets its own copy, so no two arrays alias."""
    check_room(plan.nbytes - plan.stored_nbytes)  # at least this much is copied
    shared: set[str] = set()
    with readonly_views():
        return [_view_or_copy(entry, view, offsets, shared) for entry in plan.entries]


def _view_or_copy(entry: Entry, view: memoryview, offsets: dict[str, int], shared: set[str]) -> Any:
    if not entry.refs:
        return view_of(entry.spec, view, 0)
    start = offsets[entry.refs[0].hash]
    fresh = all(r.hash not in shared and offsets[r.hash] == start + r.offset for r in entry.refs)
    if fresh:
        shared.update(r.hash for r in entry.refs)
        return view_of(entry.spec, view, start)
    value, dest = allocate(entry.spec)
    for r in entry.refs:
        _copy(view, offsets[r.hash], dest[r.offset : r.offset + r.nbytes])
    return value
