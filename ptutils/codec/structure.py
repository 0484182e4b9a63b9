"""The structure of a State as msgpack: containers and scalars inline, arrays by index.

Plain msgpack types carry None, bool, int (64-bit), float, str, bytes, list and dict.
The codec's own extension types carry what msgpack cannot tell apart (tuple, torch.Size,
bytearray), what it cannot hold (ints beyond 64 bits, numpy scalars, torch dtypes and
devices) and references into the tensor table. Decoding knows these types only: there
is no way to name a class or a function in a blob, so loading one cannot run code.

A tuple is an extension whose payload is its own msgpack document. Decoding never
nests msgpack's C unpacker (each level would take ~40 KB of C stack: a few hundred
nested tuples, or a few dozen on a 1 MB thread stack, crash the process): the first
pass leaves tuples as `_Deferred` payloads and an explicit stack then unpacks and
builds them, innermost first. Both directions refuse nesting deeper than `MAX_DEPTH`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import numpy as np
import torch

from ptutils.codec.buffers import NUMPY_DTYPE, is_array
from ptutils.errors import CodecError

EXT_TUPLE = 1
EXT_ARRAY = 2
EXT_SIZE = 3
EXT_BIGINT = 4
EXT_BYTEARRAY = 5
EXT_NPSCALAR = 6
EXT_DTYPE = 7
EXT_DEVICE = 8

MAX_DEPTH = 100
"""Deepest container nesting (dict, list, tuple, tuple keys) that `dumps` writes and
`loads` reads: a State of MAX_DEPTH nested tuples round-trips, one more level is a
CodecError either way. Real states (state dicts, optimizer states) are under 10 deep."""

_TOO_DEEP = (
    f"the structure is nested deeper than {MAX_DEPTH} levels (ptutils.codec.MAX_DEPTH): "
    "corrupt, or not written by ptutils"
)
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
_ALL_DTYPES = {
    name: value for name in dir(torch) if isinstance(value := getattr(torch, name), torch.dtype)
}
_DTYPE_NAMES = {value: name for name, value in _ALL_DTYPES.items()}
_KEY_TYPES = "str, int, float, bool, None, bytes or tuples of those"


def pack(obj: Any) -> bytes:
    """msgpack bytes of an already converted tree."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes | memoryview, ext_hook: Callable[[int, bytes], Any] | None = None) -> Any:
    """Strict msgpack decoding: str as str, any hashable map key, only the given ext types."""
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,  # dict keys may be ints, floats, None, tuples: on purpose
            use_list=True,
            ext_hook=ext_hook or _refuse_ext,
        )
    except msgpack.StackError:  # msgpack's own limit on nested lists and maps (1024)
        raise CodecError(_TOO_DEEP) from None


def _refuse_ext(code: int, data: bytes) -> Any:
    raise CodecError(f"unexpected msgpack extension type {code}")


class TreeEncoder:
    """Converts a State into msgpack bytes, handing every array to `on_array`.

    `on_array(value, path)` stores the array and returns its index in the tensor table.
    Errors name the path inside the state, e.g. `state['model']['x']`.
    """

    def __init__(self, on_array: Callable[[Any, str], int]) -> None:
        self._on_array = on_array
        self._open: set[int] = set()  # ids of the containers being walked: finds cycles

    def encode(self, state: Any) -> bytes:
        return pack(self._value(state, "state", 0))

    def _value(self, obj: Any, path: str, depth: int) -> Any:
        kind = type(obj)
        if obj is None or kind is bool or kind is float or kind is bytes:
            return obj
        if kind is int:
            return _int(obj)
        if kind is str:
            return _str(obj, path)
        if is_array(obj):
            return msgpack.ExtType(EXT_ARRAY, self._on_array(obj, path).to_bytes(4, "little"))
        if isinstance(obj, dict | list | tuple):
            if depth >= MAX_DEPTH:
                raise CodecError(_too_deep(path))
            return self._container(obj, path, depth + 1)
        return _scalar(obj, path)

    def _container(self, obj: dict | list | tuple, path: str, depth: int) -> Any:
        if id(obj) in self._open:
            raise CodecError(f"cannot encode {path}: it contains itself (a reference cycle)")
        kind = type(obj)
        if (kind is list or kind is tuple) and obj:  # a History column: thousands of numbers
            types = set(map(type, obj))
            if types <= _PLAIN_LEAVES or (types == _INT and _INT_MIN <= min(obj)
                                          and max(obj) <= _INT_MAX):
                return list(obj) if kind is list else msgpack.ExtType(EXT_TUPLE, pack(obj))
        self._open.add(id(obj))
        try:
            if isinstance(obj, dict):
                return {
                    _key(k, path, depth): self._value(v, f"{path}[{k!r}]", depth)
                    for k, v in obj.items()
                }
            items = [self._value(v, f"{path}[{i}]", depth) for i, v in enumerate(obj)]
        finally:
            self._open.discard(id(obj))
        if isinstance(obj, torch.Size):
            return msgpack.ExtType(EXT_SIZE, pack(items))
        if isinstance(obj, tuple):
            return msgpack.ExtType(EXT_TUPLE, pack(items))
        return items


_PLAIN_LEAVES = frozenset({float, bool, type(None)})
"""Leaves msgpack packs as they are: a list of only these needs no walk."""
_INT = {int}


def _int(value: int) -> Any:
    if _INT_MIN <= value <= _INT_MAX:
        return value
    size = (value.bit_length() + 8) // 8  # room for the sign bit
    return msgpack.ExtType(EXT_BIGINT, value.to_bytes(size, "big", signed=True))


def _str(value: str, path: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CodecError(f"cannot encode {path}: the string is not valid UTF-8 ({exc})") from None
    return value


def _scalar(obj: Any, path: str) -> Any:
    """Leaf values other than the plain ones; subclasses of str/int/float (str and int
    Enums) are stored as their plain value, the way json stores them."""
    if isinstance(obj, np.generic) and np.dtype(obj.dtype).kind in "biufc":
        return msgpack.ExtType(EXT_NPSCALAR, pack([obj.dtype.str, obj.tobytes()]))
    if isinstance(obj, str):
        return _str(str.__str__(obj), path)
    if isinstance(obj, int):
        return _int(int(obj))
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, bytearray):
        return msgpack.ExtType(EXT_BYTEARRAY, bytes(obj))
    if isinstance(obj, bytes):
        return bytes(obj)
    if isinstance(obj, torch.dtype):
        return msgpack.ExtType(EXT_DTYPE, _DTYPE_NAMES[obj].encode())
    if isinstance(obj, torch.device):
        return msgpack.ExtType(EXT_DEVICE, str(obj).encode())
    raise CodecError(
        f"cannot encode {path}: values of type {type(obj).__module__}.{type(obj).__qualname__} "
        "are not supported (a State holds dict, list, tuple, str, bytes, int, float, bool, "
        "None, torch tensors and numpy arrays)"
    )


def _too_deep(path: str) -> str:
    shown = path if len(path) <= 120 else f"{path[:60]}...{path[-40:]}"
    return (
        f"cannot encode {shown}: containers nested deeper than {MAX_DEPTH} levels "
        "(ptutils.codec.MAX_DEPTH); flatten that part of the state"
    )


def _key(key: Any, path: str, depth: int) -> Any:
    """A dict key at container depth `depth` (a tuple key is one level deeper)."""
    if key is None or type(key) in (bool, float, bytes):
        return key
    if isinstance(key, str):
        return _str(str.__str__(key), f"{path} (key {key!r})")
    if isinstance(key, int):
        return _int(int(key))
    if isinstance(key, float):
        return float(key)
    if isinstance(key, tuple) and not isinstance(key, torch.Size):
        if depth >= MAX_DEPTH:
            raise CodecError(_too_deep(f"{path} (a tuple key)"))
        return msgpack.ExtType(EXT_TUPLE, pack([_key(k, path, depth + 1) for k in key]))
    raise CodecError(
        f"cannot encode {path}: it has a key of type {type(key).__qualname__} ({key!r}); "
        f"keys must be {_KEY_TYPES}"
    )


class _Deferred:
    """A tuple (or torch.Size) not built yet: its extension code and msgpack payload."""

    __slots__ = ("code", "payload")

    def __init__(self, code: int, payload: bytes) -> None:
        self.code, self.payload = code, payload


_NESTED = {list, dict, _Deferred, msgpack.Timestamp}
"""What `_build` looks into: containers, and the one extension msgpack decodes by itself
(type -1, timestamps: it never reaches the ext hook) so that it is refused."""
_Hook = Callable[[int, bytes], Any]


def decode_tree(data: bytes, arrays: Sequence[Any]) -> Any:
    """The State encoded in `data`, with array references resolved from `arrays`."""

    def hook(code: int, payload: bytes) -> Any:
        if code == EXT_ARRAY and len(payload) == 4:
            index = int.from_bytes(payload, "little")
            if index < len(arrays):
                return arrays[index]
            raise CodecError(
                f"the structure refers to tensor #{index}, the table has {len(arrays)}"
            )
        if code in (EXT_TUPLE, EXT_SIZE):
            return _Deferred(code, payload)
        return _decode_ext(code, payload)

    root = [unpack(data, hook)]
    _build(root, hook)
    return root[0]


_VISIT, _TUPLE, _REKEY = range(3)  # the tasks of `_build`
_Stack = list[tuple[Any, ...]]


def _build(root: list[Any], hook: _Hook) -> None:
    """Build every `_Deferred` under `root` in place, innermost first, with an explicit
    stack (no recursion in Python or C); refuse nesting deeper than MAX_DEPTH."""
    stack: _Stack = [(_VISIT, root, 0)]
    while stack:
        task, *args = stack.pop()
        if task == _VISIT:  # schedule the nested children of a container
            _visit(*args, stack, hook)
        elif task == _TUPLE:  # every item of a deferred tuple is built: make the tuple
            items, parent, slot, code = args
            parent[slot] = tuple(items) if code == EXT_TUPLE else torch.Size(items)
        else:  # every key of a dict is built: put them in place of the deferred ones
            mapping, keys = args
            values = list(mapping.values())
            mapping.clear()
            mapping.update(zip(keys, values))


def _visit(node: list | dict, depth: int, stack: _Stack, hook: _Hook) -> None:
    """Schedule the children of a container at `depth` (root: 0) that need work."""
    if isinstance(node, dict):
        if not _NESTED.isdisjoint(map(type, node)):  # tuple keys
            keys = list(node)
            stack.append((_REKEY, node, keys))  # runs once the keys below are built
            _schedule(keys, range(len(keys)), keys, depth, stack, hook)
        if not _NESTED.isdisjoint(map(type, node.values())):
            _schedule(node, list(node), node.values(), depth, stack, hook)
    elif not _NESTED.isdisjoint(map(type, node)):
        _schedule(node, range(len(node)), node, depth, stack, hook)


def _schedule(
    parent: Any, slots: Any, children: Any, depth: int, stack: _Stack, hook: _Hook
) -> None:
    for slot, child in zip(slots, list(children)):
        kind = type(child)
        if kind not in _NESTED:
            continue
        if kind is msgpack.Timestamp:
            raise CodecError("unexpected msgpack extension type -1 (timestamp) in the structure")
        if depth >= MAX_DEPTH:
            raise CodecError(_TOO_DEEP)
        if kind is _Deferred:
            items = unpack(child.payload, hook)  # one level: its tuples come back deferred
            if not isinstance(items, list):
                raise CodecError("a tuple in the structure is malformed")
            parent[slot] = None  # the payload is no longer needed
            stack.append((_TUPLE, items, parent, slot, child.code))  # runs after the items
            child = items
        stack.append((_VISIT, child, depth + 1))


def _decode_ext(code: int, payload: bytes) -> Any:
    if code == EXT_BIGINT and payload:
        return int.from_bytes(payload, "big", signed=True)
    if code == EXT_BYTEARRAY:
        return bytearray(payload)
    if code == EXT_NPSCALAR:
        return _np_scalar(unpack(payload))
    if code == EXT_DTYPE and payload.decode() in _ALL_DTYPES:
        return _ALL_DTYPES[payload.decode()]
    if code == EXT_DEVICE:
        return torch.device(payload.decode())
    raise CodecError(f"unknown or malformed msgpack extension type {code} in the structure")


def _np_scalar(fields: Any) -> np.generic:
    dtype, raw = fields if isinstance(fields, list) and len(fields) == 2 else (None, None)
    if not isinstance(dtype, str) or not isinstance(raw, bytes) or not NUMPY_DTYPE.match(dtype):
        raise CodecError("a numpy scalar in the structure is malformed")
    parsed = np.dtype(dtype)
    if parsed.itemsize != len(raw):
        raise CodecError(f"a numpy scalar in the structure is malformed (dtype {dtype!r})")
    return np.frombuffer(raw, dtype=parsed)[0]
