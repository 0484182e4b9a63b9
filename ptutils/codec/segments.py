"""Content-addressed segments and the manifest that ties them into a State.

`encode` cuts every array's bytes into segments of at most `MAX_SEGMENT` bytes, each
named by its xxh3_128 hex digest. Segments follow array boundaries, so an array that
did not change keeps its segment names: a store writes only the segments it lacks.
The manifest (msgpack) holds the format version, the structure, the tensor table and
the segment list; `decode` reads each segment straight into its destination array and
verifies length and checksum on the way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NamedTuple

import xxhash

from ptutils.codec.buffers import ArraySpec, allocate, array_bytes, check_room, spec_from
from ptutils.codec.structure import TreeEncoder, decode_tree, pack, unpack
from ptutils.errors import CodecError, PtutilsError

MAX_SEGMENT = 32 * 2**20
"""Largest segment in bytes; bigger arrays are split at this size."""

FORMAT = "ptutils.state"
FORMAT_VERSION = 1
"""Version of the manifest and of the single-file layout; bumped on any incompatible change."""

READ_CHUNK = 4 * 2**20
"""Bytes read (and hashed while still in cache) at a time."""

Hasher = xxhash.xxh3_128
"""Streaming checksum: `h = Hasher(); h.update(chunk); ...; h.hexdigest()`."""

_HASH = re.compile(r"[0-9a-f]{32}\Z")


def checksum(data: Any) -> str:
    """xxh3_128 hex digest of a bytes-like object: the name of a segment with these bytes."""
    return xxhash.xxh3_128(data).hexdigest()


@dataclass(frozen=True)
class Segment:
    """A run of at most `MAX_SEGMENT` bytes of one array, named by its checksum."""

    hash: str
    nbytes: int
    view: memoryview = field(repr=False, compare=False)

    def chunks(self, size: int = MAX_SEGMENT) -> Iterator[memoryview]:
        """The bytes in order, as views on the array's memory (no copies)."""
        for start in range(0, self.nbytes, size):
            yield self.view[start : start + size]


@dataclass
class Encoded:
    """An encoded State: the manifest and its distinct segments, in order."""

    manifest: bytes
    segments: list[Segment]

    @property
    def nbytes(self) -> int:
        """Bytes of segment data (each distinct segment once)."""
        return sum(s.nbytes for s in self.segments)


class Ref(NamedTuple):
    """Where a segment goes: `nbytes` bytes at `offset` inside one array."""

    hash: str
    offset: int
    nbytes: int


class Entry(NamedTuple):
    """One row of the tensor table, validated."""

    path: str
    spec: ArraySpec
    refs: tuple[Ref, ...]


@dataclass(frozen=True)
class Plan:
    """A parsed and validated manifest."""

    tree: bytes
    entries: list[Entry]
    segments: list[tuple[str, int]]

    @property
    def nbytes(self) -> int:
        """Bytes of all arrays once loaded (repeated segments count each time)."""
        return sum(entry.spec.nbytes for entry in self.entries)

    @property
    def stored_nbytes(self) -> int:
        """Bytes of segment data (each distinct segment once)."""
        return sum(nbytes for _, nbytes in self.segments)


@contextmanager
def guard(action: str) -> Iterator[None]:
    """Turn any error that is not already a ptutils error into a CodecError."""
    try:
        yield
    except PtutilsError:
        raise
    except Exception as exc:
        raise CodecError(f"{action}: {type(exc).__name__}: {exc}") from exc


class _Builder:
    """Collects the tensor table and the distinct segments while the tree is walked."""

    def __init__(self) -> None:
        self.tensors: list[dict[str, Any]] = []
        self.segments: list[Segment] = []
        self._known: set[str] = set()

    def add(self, value: Any, path: str) -> int:
        spec, view = array_bytes(value, path)
        refs = []
        for offset in range(0, len(view), MAX_SEGMENT):
            piece = view[offset : offset + MAX_SEGMENT]
            digest = checksum(piece)
            if digest not in self._known:
                self._known.add(digest)
                self.segments.append(Segment(digest, len(piece), piece))
            refs.append([digest, offset])
        self.tensors.append(
            {"path": path, "kind": spec.kind, "dtype": spec.dtype, "shape": list(spec.shape),
             "nbytes": len(view), "segments": refs}
        )  # fmt: skip
        return len(self.tensors) - 1


def encode(state: Any) -> Encoded:
    """Encode a State into a manifest and content-addressed segments.

    Segments are views on the arrays' memory: keep the state unchanged until they are
    written. CUDA tensors are copied to CPU first (they load back on CPU).
    """
    builder = _Builder()
    with guard("cannot encode the state"):
        tree = TreeEncoder(builder.add).encode(state)
        manifest = pack(
            {"format": FORMAT, "version": FORMAT_VERSION, "tree": tree,
             "tensors": builder.tensors,
             "segments": [[s.hash, s.nbytes] for s in builder.segments]}
        )  # fmt: skip
    return Encoded(manifest, builder.segments)


def parse_manifest(manifest: bytes | memoryview) -> Plan:
    """Validate a manifest; CodecError says what is wrong with it."""
    doc = unpack(manifest)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CodecError("not a ptutils State manifest")
    version = doc.get("version")
    if version != FORMAT_VERSION:
        hint = "upgrade ptutils to read it" if _newer(version) else "it is not a known version"
        raise CodecError(
            f"manifest format version {version!r}: this ptutils reads {FORMAT_VERSION}; {hint}"
        )
    tree, tensors, segments = doc.get("tree"), doc.get("tensors"), doc.get("segments")
    if (
        not isinstance(tree, bytes)
        or not isinstance(tensors, list)
        or not isinstance(segments, list)
    ):
        raise CodecError("manifest is missing its tree, tensor table or segment list")
    sizes = _segment_table(segments)
    entries = [_entry(i, row, sizes) for i, row in enumerate(tensors)]
    _check_order(entries, segments)
    return Plan(tree, entries, [(h, n) for h, n in segments])


def _newer(version: Any) -> bool:
    return type(version) is int and version > FORMAT_VERSION


def _segment_table(segments: list[Any]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for row in segments:
        if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], str)):
            raise CodecError(f"malformed segment list entry {row!r}")
        digest, nbytes = row
        if not _HASH.match(digest) or type(nbytes) is not int or not 0 < nbytes <= MAX_SEGMENT:
            raise CodecError(f"malformed segment list entry {row!r}")
        if digest in sizes:
            raise CodecError(f"segment {digest} is listed twice")
        sizes[digest] = nbytes
    return sizes


def _entry(index: int, row: Any, sizes: dict[str, int]) -> Entry:
    if not isinstance(row, dict) or not isinstance(row.get("segments"), list):
        raise CodecError(f"tensor table entry #{index} is malformed")
    path = row.get("path") if isinstance(row.get("path"), str) else f"#{index}"
    where = f"tensor table entry {path}"
    spec = _spec(row, where)
    refs, end = [], 0
    for ref in row["segments"]:
        if not (isinstance(ref, list) and len(ref) == 2 and ref[0] in sizes and ref[1] == end):
            raise CodecError(f"{where}: segment reference {ref!r} is unknown or out of place")
        refs.append(Ref(ref[0], end, sizes[ref[0]]))
        end += sizes[ref[0]]
    if end != spec.nbytes or row.get("nbytes") != end:
        raise CodecError(
            f"{where}: its segments hold {end} bytes, its dtype and shape need {spec.nbytes}"
        )
    return Entry(path, spec, tuple(refs))


def _spec(row: dict[str, Any], where: str) -> ArraySpec:
    try:
        return spec_from(row.get("kind"), row.get("dtype"), row.get("shape"))
    except CodecError as exc:
        raise CodecError(f"{where}: {exc}") from None


def _check_order(entries: list[Entry], segments: list[Any]) -> None:
    """Segments must be listed in the order arrays first use them (so a stream reads
    them front to back), and every listed segment must be used."""
    first_use: dict[str, None] = {}
    for entry in entries:
        for ref in entry.refs:
            first_use.setdefault(ref.hash)
    if list(first_use) != [h for h, _ in segments]:
        raise CodecError("the segment list does not match the tensor table")


def segment_hashes(manifest: bytes) -> list[tuple[str, int]]:
    """(hash, nbytes) of every segment the manifest references, each once, in order."""
    with guard("cannot read the manifest"):
        return parse_manifest(manifest).segments


Fill = Callable[[str, int, memoryview], None]


def materialize(plan: Plan, fill: Fill) -> list[Any]:
    """Allocate every array of `plan` and fill it; `fill(hash, nbytes, target)` is called
    once per distinct segment, in segment-list order; repeats are copied from the first."""
    check_room(plan.nbytes)
    filled: dict[str, memoryview] = {}
    arrays = []
    for entry in plan.entries:
        value, dest = allocate(entry.spec)
        for ref in entry.refs:
            target = dest[ref.offset : ref.offset + ref.nbytes]
            if ref.hash in filled:
                target[:] = filled[ref.hash]
            else:
                fill(ref.hash, ref.nbytes, target)
                filled[ref.hash] = target
        arrays.append(value)
    return arrays


def read_into(stream: Any, target: memoryview) -> int:
    """Read from `stream` until `target` is full or the stream ends; bytes read."""
    readinto = getattr(stream, "readinto", None)
    done = 0
    while done < len(target):
        if readinto is not None:
            got = readinto(target[done:]) or 0
        else:
            data = stream.read(len(target) - done) or b""
            got = len(data)
            target[done : done + got] = data
        if got == 0:
            break
        done += got
    return done


def read_segment(stream: Any, digest: str, target: memoryview, *, verify: bool) -> None:
    """Fill `target` from `stream`, hashing chunk by chunk while the bytes are in cache."""
    hasher = Hasher()
    for start in range(0, len(target), READ_CHUNK):
        piece = target[start : start + READ_CHUNK]
        got = read_into(stream, piece)
        if got < len(piece):
            raise CodecError(f"segment {digest} is truncated: {start + got} of {len(target)} bytes")
        if verify:
            hasher.update(piece)
    if verify and hasher.hexdigest() != digest:
        raise CodecError(
            f"segment {digest} fails its checksum (got {hasher.hexdigest()}): corrupt data"
        )


def decode(manifest: bytes, open_segment: Callable[[str], BinaryIO], *, verify: bool = True) -> Any:
    """Rebuild a State from its manifest, reading each segment from `open_segment(hash)`.

    Each stream is read straight into the destination array (`readinto` when it has
    one) and closed afterwards. A segment that is short, long or fails its checksum
    raises CodecError naming its hash; errors `open_segment` raises that are ptutils
    errors (e.g. StoreUnavailable) pass through unchanged.
    """
    with guard("cannot decode the state"):
        plan = parse_manifest(manifest)
        arrays = materialize(plan, lambda h, n, target: _fill_from(open_segment, h, target, verify))
        return decode_tree(plan.tree, arrays)


def _fill_from(
    open_segment: Callable[[str], BinaryIO], digest: str, target: memoryview, verify: bool
) -> None:
    stream = open_segment(digest)
    try:
        read_segment(stream, digest, target, verify=verify)
        if read_into(stream, memoryview(bytearray(1))):
            raise CodecError(
                f"segment {digest} is longer than the {len(target)} bytes the manifest says"
            )
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
