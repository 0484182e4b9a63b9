"""Tensors and numpy arrays as flat byte views, and back again: the codec's raw buffers.

Reading a value gives a `memoryview` on its own memory (no copy unless the tensor is
non-contiguous, lives on a GPU, or is a lazy conj/neg view). Writing allocates the
destination once and hands out a writable view of its bytes, so loading costs exactly
one copy; `view_of` shares an existing buffer instead (zero-copy).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch

from ptutils.errors import CodecError

TORCH = "torch"
NUMPY = "numpy"

_TORCH_DTYPE_NAMES = (
    "float64", "float32", "float16", "bfloat16",
    "complex128", "complex64", "complex32",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64", "bool",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2", "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2",
)  # fmt: skip

TORCH_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in _TORCH_DTYPE_NAMES
    if isinstance(getattr(torch, name, None), torch.dtype)
}
"""Tensor dtypes the codec stores, by name (those this torch build has)."""

_TORCH_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in TORCH_DTYPES.items()}
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_SIGNED_TWIN = {
    getattr(torch, f"uint{bits}"): getattr(torch, f"int{bits}")
    for bits in (16, 32, 64)
    if isinstance(getattr(torch, f"uint{bits}", None), torch.dtype)
}  # same width, two's complement: negating the signed twin gives the wrapped unsigned value
NUMPY_DTYPE = re.compile(r"[<>|][biufc][0-9]{1,2}\Z")
"""The numpy dtype strings (`dtype.str`) the codec stores: bool, int, uint, float, complex."""
_NOT_WRITABLE = "The given buffer is not writable"


class ArraySpec(NamedTuple):
    """What to rebuild: a torch tensor or numpy array of this dtype (by name) and shape."""

    kind: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        if self.kind == TORCH:
            return TORCH_DTYPES[self.dtype].itemsize
        return np.dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def is_array(obj: Any) -> bool:
    """True for the values stored as raw buffers: tensors and plain numpy arrays."""
    return isinstance(obj, torch.Tensor) or type(obj) is np.ndarray


def array_bytes(obj: Any, path: str) -> tuple[ArraySpec, memoryview]:
    """The spec of `obj` and a flat uint8 view of its bytes (C order)."""
    if isinstance(obj, torch.Tensor):
        return _tensor_bytes(obj, path)
    return _ndarray_bytes(obj, path)


def _tensor_bytes(t: torch.Tensor, path: str) -> tuple[ArraySpec, memoryview]:
    name = _check_tensor(t, path)
    t = _dense(_resolved(t, path))
    spec = ArraySpec(TORCH, name, tuple(t.shape))
    if t.numel() == 0:
        return spec, memoryview(b"")
    # `is_contiguous()` ignores the strides of size-1 dims (they can be anything), so
    # address the elements directly: one flat run of numel items from the first one.
    flat = t.as_strided((t.numel(),), (1,))
    return spec, memoryview(flat.view(torch.uint8).numpy())


def _check_tensor(t: torch.Tensor, path: str) -> str:
    """The dtype's name, or CodecError if the codec cannot store this kind of tensor."""
    if type(t) not in _PLAIN_TENSORS:
        raise CodecError(
            f"cannot encode {path}: tensor subclass {type(t).__qualname__} is not supported"
        )
    name = _TORCH_NAMES.get(t.dtype)
    if name is None or t.layout is not torch.strided or t.is_quantized or t.is_nested:
        raise CodecError(
            f"cannot encode {path}: tensor of dtype {t.dtype}, layout {t.layout} is not supported "
            "(dense tensors of plain dtypes only)"
        )
    if t.is_meta:
        raise CodecError(f"cannot encode {path}: a meta tensor has no data")
    return name


def _resolved(t: torch.Tensor, path: str) -> torch.Tensor:
    """`t` as plain CPU data: detached, lazy zero/conjugate/negative views materialized."""
    if t.requires_grad:
        t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t._is_zerotensor():
        return torch.zeros(t.shape, dtype=t.dtype)
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = _resolve_neg(t, path)
    return t


def _resolve_neg(t: torch.Tensor, path: str) -> torch.Tensor:
    """Materialize a negative view (`torch._neg_view`, `z.conj().imag`)."""
    signed = _SIGNED_TWIN.get(t.dtype)
    if signed is not None:  # torch has no neg for these: negate the same bits as signed
        return torch._neg_view(t).contiguous().view(signed).neg().view(t.dtype)
    try:
        return t.resolve_neg()
    except (RuntimeError, NotImplementedError) as exc:
        raise CodecError(
            f"cannot encode {path}: it is a negative view (is_neg()) of dtype {t.dtype}, and "
            f"torch cannot negate that dtype ({exc}); store the tensor it was made from"
        ) from None


_BITS_TWIN: dict[int, torch.dtype] = {
    1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64,
}
"""An integer dtype per element size: copies move bits through it, not through the
dtype's own kernels (float4/float8 lack some, e.g. deterministic mode's empty fill)."""


def _dense(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its elements lie in C order one after another, else a C-order copy
    (transposed, sliced with steps, expanded, channels_last, overlapping). The copy is
    of the bits, whatever the dtype and torch's global modes (deterministic algorithms)."""
    if t.is_contiguous():
        return t
    if t.element_size() == 16:  # complex128: as pairs of float64
        return torch.view_as_complex(_dense(torch.view_as_real(t)))
    twin = _BITS_TWIN[t.element_size()]
    return t.view(twin).contiguous().view(t.dtype)


def _ndarray_bytes(a: np.ndarray, path: str) -> tuple[ArraySpec, memoryview]:
    dtype = a.dtype
    if not NUMPY_DTYPE.match(dtype.str) or dtype.fields is not None:
        raise CodecError(
            f"cannot encode {path}: numpy dtype {dtype} is not supported "
            "(bool, integer, float and complex only)"
        )
    spec = ArraySpec(NUMPY, dtype.str, tuple(a.shape))
    if a.size == 0:
        return spec, memoryview(b"")
    if not a.flags.c_contiguous:  # numpy, like torch, ignores the strides of size-1 dims
        a = a.copy(order="C")
    flat = np.lib.stride_tricks.as_strided(a, (a.size,), (dtype.itemsize,), writeable=False)
    return spec, memoryview(flat.view(np.uint8))


def spec_from(kind: Any, dtype: Any, shape: Any) -> ArraySpec:
    """Validate a tensor table entry read from a manifest; CodecError if it is malformed."""
    if kind == TORCH and dtype not in TORCH_DTYPES:
        raise CodecError(f"unknown tensor dtype {dtype!r}")
    if kind == NUMPY and not (isinstance(dtype, str) and NUMPY_DTYPE.match(dtype)):
        raise CodecError(f"unsupported numpy dtype {dtype!r}")
    if kind not in (TORCH, NUMPY):
        raise CodecError(f"unknown array kind {kind!r}")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise CodecError(f"malformed shape {shape!r}")
    return ArraySpec(kind, dtype, tuple(shape))


def allocate(spec: ArraySpec) -> tuple[Any, memoryview]:
    """A fresh tensor/array for `spec` and a writable flat view of its bytes."""
    if spec.kind == TORCH:
        dtype = TORCH_DTYPES[spec.dtype]
        raw = torch.empty(math.prod(spec.shape) * dtype.itemsize, dtype=torch.uint8)
        return raw.view(dtype).reshape(spec.shape), memoryview(raw.numpy())
    a = np.empty(spec.shape, dtype=np.dtype(spec.dtype))
    return a, memoryview(a.reshape(-1).view(np.uint8))


def physical_memory() -> int | None:
    """Bytes of RAM on this machine, or None where the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def check_room(nbytes: int) -> None:
    """Refuse to allocate arrays that cannot fit in this machine's memory at all.

    A blob stores a repeated segment once, so a small (corrupt or hostile) blob can
    describe a huge state; refusing it up front beats being killed for memory.
    """
    total = physical_memory()
    if total is not None and nbytes > total:
        raise CodecError(
            f"the state's arrays need {nbytes / 2**30:.1f} GiB of memory, more than this "
            f"machine has ({total / 2**30:.1f} GiB): a corrupt blob, or load it on a bigger one"
        )


@contextmanager
def readonly_views() -> Iterator[None]:
    """Silence torch's warning about views on a read-only buffer while making them.

    `loads(bytes, zero_copy=True)` makes exactly such views on purpose (documented as
    read-only); one context for all of them keeps the per-tensor cost at a few µs.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NOT_WRITABLE, category=UserWarning)
        yield


def view_of(spec: ArraySpec, buffer: memoryview, offset: int) -> Any:
    """A tensor/array for `spec` sharing `buffer` at `offset` (no copy); its own storage
    covers exactly its bytes. Call inside `readonly_views()` for a read-only buffer."""
    if spec.numel == 0:
        return allocate(spec)[0]
    if spec.kind == NUMPY:
        flat = np.frombuffer(buffer, dtype=np.dtype(spec.dtype), count=spec.numel, offset=offset)
        return flat.reshape(spec.shape)
    flat = torch.frombuffer(buffer, dtype=TORCH_DTYPES[spec.dtype], count=spec.numel, offset=offset)
    return flat.reshape(spec.shape)
