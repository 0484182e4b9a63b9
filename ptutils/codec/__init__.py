"""The State codec: msgpack for structure, raw buffers for tensors, no pickle.

Two ways to store a State (nested dict/list/tuple of scalars, strings, bytes, torch
tensors and numpy arrays):

- one blob: `dumps`/`loads` in memory, `dump`/`load` streaming to and from a file;
- content-addressed segments for the stores: `encode` gives a manifest plus segments
  named by their xxh3_128 digest (aligned to arrays, at most `MAX_SEGMENT` bytes), and
  `decode` reads them back through `open_segment(hash)`.

Everything read is verified (lengths, checksums, structure); a truncated, corrupt or
foreign input raises `CodecError` and never runs code or crashes the process. Tensors
of any layout (strided views, expanded, channels_last, conjugate/negative views) are
stored by value, in C order, and load on CPU as plain contiguous tensors. Containers
nest at most `MAX_DEPTH` levels, in both directions.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ptutils.errors import CodecError

if TYPE_CHECKING:
    from ptutils.codec.blob import ALIGN, MAGIC, dump, dumps, load, loads
    from ptutils.codec.buffers import TORCH_DTYPES
    from ptutils.codec.segments import (
        FORMAT_VERSION,
        MAX_SEGMENT,
        Encoded,
        Hasher,
        Segment,
        checksum,
        decode,
        encode,
        segment_hashes,
    )
    from ptutils.codec.structure import MAX_DEPTH

_LAZY = {
    **dict.fromkeys(("ALIGN", "MAGIC", "dump", "dumps", "load", "loads"), "blob"),
    "TORCH_DTYPES": "buffers",
    **dict.fromkeys(("FORMAT_VERSION", "MAX_SEGMENT", "Encoded", "Hasher", "Segment",
                     "checksum", "decode", "encode", "segment_hashes"), "segments"),
    "MAX_DEPTH": "structure",
}
"""Where each public name lives. They load on first use (PEP 562): the codec needs torch,
and `import ptutils.codec` (the MongoDB store does it) must not cost 1.5 s of torch in
commands that never touch a tensor (`ptutils status`)."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "ALIGN",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_DEPTH",
    "MAX_SEGMENT",
    "TORCH_DTYPES",
    "CodecError",
    "Encoded",
    "Hasher",
    "Segment",
    "checksum",
    "decode",
    "dump",
    "dumps",
    "encode",
    "load",
    "loads",
    "segment_hashes",
]
