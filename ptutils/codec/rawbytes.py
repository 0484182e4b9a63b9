"""A large `bytes` result filled in place: one copy, on huge pages where the kernel has them.

`b"".join(parts)` is one copy too, but its result comes from malloc and the kernel then
faults it in 4 KiB at a time: for a 256 MB blob that costs three times the copy. Here
the result is `bytes(n)` (calloc: zero pages not yet touched), marked for transparent
huge pages (`madvise`, as numpy does for its large arrays), and filled through a
writable view before anyone else can see it. That is what C code does with
`PyBytes_FromStringAndSize(NULL, n)`. The one layout assumption (on CPython the data
of a bytes object starts `bytes.__basicsize__ - 1` bytes after its `id`) is checked on
a probe at import; where it does not hold, `new_bytes` returns None and callers join.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

MIN_SIZE = 4 * 2**20
"""Below this, `b"".join` is as fast and this module is not used."""

_PAGE = mmap.PAGESIZE
_OFFSET = bytes.__basicsize__ - 1


def _layout_holds() -> bool:
    if sys.implementation.name != "cpython":
        return False
    probe = b"ptutils.codec layout probe"
    return ctypes.string_at(id(probe) + _OFFSET, len(probe)) == probe


def _madvise() -> ctypes._CFuncPtr | None:
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn if advice is not None else None


_ENABLED = _layout_holds()
_MADVISE = _madvise() if _ENABLED else None


def new_bytes(size: int) -> tuple[bytes, memoryview] | None:
    """A fresh zeroed bytes object of `size` bytes and a writable view of its data.

    The caller fills the view, releases it, and only then hands the bytes out. None when
    `size` is small or the interpreter is not one this works on.
    """
    if not _ENABLED or size < MIN_SIZE:
        return None
    out = bytes(size)  # a new object: only bytes(0) and bytes(1) are shared singletons
    address = id(out) + _OFFSET
    if _MADVISE is not None:
        start = -(-address // _PAGE) * _PAGE
        length = (address + size - start) // _PAGE * _PAGE
        _MADVISE(start, length, mmap.MADV_HUGEPAGE)  # advice only: failure is harmless
    view = memoryview((ctypes.c_char * size).from_address(address)).cast("B")
    return out, view
