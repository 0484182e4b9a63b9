"""The State codec: bit-exact round trips, zero-copy sharing, content-addressed segments,
and refusal (CodecError, no code run) of anything truncated, corrupt or foreign."""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle  # only to build attack payloads: the codec itself never imports it
import re
import struct
import subprocess
import sys
import warnings
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptutils import codec
from ptutils.codec import MAX_DEPTH, MAX_SEGMENT, TORCH_DTYPES, CodecError
from ptutils.errors import StoreUnavailable

NUMPY_DTYPES = ["|b1", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8",
                "<f2", "<f4", "<f8", "<c8", "<c16", ">f4", ">i8"]  # fmt: skip
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- comparison ---------------------------------------------------------------------------
UNSIGNED_NEG = {torch.uint16, torch.uint32, torch.uint64}  # neg views torch cannot resolve
NEGATABLE = {
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex128,
    torch.complex64, torch.complex32, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint8, *UNSIGNED_NEG,
}  # fmt: skip


def raw(t: torch.Tensor) -> bytes:
    """The bytes of `t`'s value in C order, by a route other than the codec's: a copy into
    a fresh tensor (copy_ materializes conjugate and negative views)."""
    t = t.detach().cpu()
    if t.is_neg() and t.dtype in UNSIGNED_NEG:  # -x wraps around, as numpy computes it
        plain = np.frombuffer(raw(torch._neg_view(t)), dtype=f"u{t.dtype.itemsize}")
        return np.negative(plain).tobytes()
    dense = torch.empty(t.shape, dtype=t.dtype).copy_(t)
    return dense.view(-1).view(torch.uint8).numpy().tobytes()


def assert_same(a: Any, b: Any, path: str = "state") -> None:
    """Equal types and values; tensors and arrays by dtype, shape and bytes; floats by bits."""
    assert type(a) is type(b) or (type(a), type(b)) == (torch.nn.Parameter, torch.Tensor), (
        f"{path}: {type(a)} != {type(b)}"
    )
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert raw(a) == raw(b), path
        assert not (b.is_conj() or b.is_neg() or b.requires_grad), path
    elif isinstance(a, np.ndarray):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert a.tobytes() == b.tobytes(), path
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, dict):
        assert len(a) == len(b), path
        for (ka, va), (kb, vb) in zip(a.items(), b.items()):
            assert_same(ka, kb, f"{path} key")
            assert_same(va, vb, f"{path}[{ka!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), path
    else:
        assert a == b, path


def round_trips(state: Any) -> dict[str, Any]:
    """The state after each way through the codec."""
    blob = codec.dumps(state)
    stream = io.BytesIO()
    written = codec.dump(state, stream)
    assert written == len(blob) and stream.getvalue() == blob  # one format, two writers
    stream.seek(0)
    encoded = codec.encode(state)
    store = {s.hash: b"".join(bytes(c) for c in s.chunks()) for s in encoded.segments}
    return {
        "loads": codec.loads(blob),
        "loads zero_copy": codec.loads(blob, zero_copy=True),
        "load": codec.load(stream),
        "decode": codec.decode(encoded.manifest, lambda h: io.BytesIO(store[h])),
    }


def assert_round_trips(state: Any) -> None:
    for way, back in round_trips(state).items():
        try:
            assert_same(state, back)
        except AssertionError as exc:
            raise AssertionError(f"{way}: {exc}") from exc


# --- strategies ---------------------------------------------------------------------------
LAYOUTS = ["permute", "step", "narrow", "odd stride", "unsqueeze", "expand", "channels_last",
           "conj", "neg", "0-d", "empty", "parameter"]  # fmt: skip


COMPLEX = [torch.complex128, torch.complex64, torch.complex32]
FLOATING = [d for d in TORCH_DTYPES.values() if d.is_floating_point or d.is_complex]
DTYPES_FOR = {"conj": COMPLEX, "neg": sorted(NEGATABLE, key=str), "parameter": FLOATING}


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """Any dtype, random bits (NaNs included), in a layout torch makes (then up to two
    more on top): permuted, sliced with steps, size-1 dims with any stride, expanded
    (stride 0), channels_last(_3d), conjugate and negative views, 0-d, empty, Parameter."""
    first = draw(st.sampled_from(LAYOUTS))
    dtype = draw(st.sampled_from(DTYPES_FOR.get(first, list(TORCH_DTYPES.values()))))
    cl = first == "channels_last"
    dims = draw(st.integers(4, 5) if cl else st.integers(0, 4))
    shape = draw(st.lists(st.integers(2 if cl else 1, 3), min_size=dims, max_size=dims))
    shape = shape if math.prod(shape) <= 128 else [2] * dims
    nbytes = math.prod(shape) * dtype.itemsize
    data = draw(st.binary(min_size=nbytes, max_size=nbytes))
    t = torch.tensor(list(data), dtype=torch.uint8).view(dtype).reshape(shape)
    for layout in [first, *draw(st.lists(st.sampled_from(LAYOUTS), max_size=2))]:
        t = _apply(draw, layout, t)
    return t


def _apply(draw: st.DrawFn, layout: str, t: torch.Tensor) -> torch.Tensor:
    if layout in ("odd stride", "expand") and 1 not in t.shape:
        t = t.unsqueeze(draw(st.integers(0, t.dim())))
    dims = t.dim()
    if layout == "permute" and dims:
        return t.permute(draw(st.permutations(range(dims))))
    if layout in ("step", "narrow") and dims:
        dim = draw(st.integers(0, dims - 1))
        start = draw(st.integers(0, t.shape[dim] - 1)) if t.shape[dim] else 0
        if layout == "narrow":  # a size-1 dim that keeps the stride of a bigger one
            return t.narrow(dim, start, min(1, t.shape[dim]))
        return t[(slice(None),) * dim + (slice(start, None, draw(st.integers(2, 3))),)]
    if layout == "odd stride":  # size-1 dims may have any stride (torch ignores it)
        odd = [draw(st.integers(0, 9)) if n == 1 else s for n, s in zip(t.shape, t.stride())]
        return t.as_strided(t.shape, odd)
    if layout == "unsqueeze":
        return t.unsqueeze(draw(st.integers(0, dims)))
    if layout == "expand":
        return t.expand([draw(st.integers(0, 3)) if n == 1 else -1 for n in t.shape])
    if layout == "channels_last" and dims in (4, 5):
        fmt = torch.channels_last if dims == 4 else torch.channels_last_3d
        return t.contiguous(memory_format=fmt)
    if layout == "conj" and t.is_complex():
        return t.conj()
    if layout == "neg" and t.dtype in NEGATABLE:
        return torch._neg_view(t)
    if layout == "0-d" and t.numel():
        return t.reshape(-1)[draw(st.integers(0, t.numel() - 1))]
    if layout == "empty" and dims:
        return t.narrow(draw(st.integers(0, dims - 1)), 0, 0)
    if layout == "parameter" and (t.is_floating_point() or t.is_complex()):
        return torch.nn.Parameter(t.detach())
    return t


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    """Any supported dtype and byte order; transposed, reversed, stepped, broadcast
    (stride 0), size-1 dims with odd strides, Fortran order, unaligned, read-only."""
    dtype = np.dtype(draw(st.sampled_from(NUMPY_DTYPES)))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    data = draw(st.binary(min_size=math.prod(shape) * dtype.itemsize + 1,
                          max_size=math.prod(shape) * dtype.itemsize + 1))  # fmt: skip
    a = np.frombuffer(data, dtype=dtype, offset=1, count=math.prod(shape)).reshape(shape)
    form = draw(st.sampled_from(["plain", "T", "reversed", "step", "broadcast", "odd stride",
                                 "fortran", "0-d", "copy"]))  # fmt: skip
    if form == "T":
        return a.T
    if form == "reversed" and a.ndim:
        return a[::-1]
    if form == "step" and a.ndim:
        return a[..., ::2]
    if form == "broadcast":
        return np.broadcast_to(a, (2, *a.shape))
    if form == "odd stride":
        strides = [draw(st.integers(0, 40)) if n == 1 else s for n, s in zip(a.shape, a.strides)]
        return np.lib.stride_tricks.as_strided(a, a.shape, strides, writeable=False)
    if form == "fortran":
        return np.asfortranarray(a)
    if form == "0-d" and a.size:
        return a.reshape(-1)[-1:].reshape(())
    if form == "copy":
        return a.copy()
    return a


floats = st.floats(allow_nan=True, allow_infinity=True) | st.integers(0, 2**64 - 1).map(
    lambda bits: struct.unpack("<d", struct.pack("<Q", bits))[0]  # NaN payloads too
)
scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | floats | st.text(max_size=8)
    | st.binary(max_size=8)
)  # fmt: skip
keys = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**66), 2**66) | floats | st.text(max_size=6)
    | st.binary(max_size=4),
    lambda inner: st.tuples(inner, inner),
    max_leaves=3,
)  # fmt: skip
states = st.recursive(
    scalars | tensors() | arrays(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(keys, inner, max_size=4)
    ),
    max_leaves=10,
)


# --- round trips --------------------------------------------------------------------------
@settings(FAST, max_examples=150)
@given(states)
def test_random_states_round_trip_bit_exact_every_way(state: Any) -> None:
    assert_round_trips(state)


@settings(FAST, max_examples=300)
@given(st.lists(tensors(), min_size=1, max_size=3), st.lists(arrays(), max_size=2))
def test_tensors_and_arrays_of_any_layout_round_trip_bit_exact(
    values: list[torch.Tensor], more: list[np.ndarray]
) -> None:
    assert_round_trips({"tensors": values, "arrays": more})


@pytest.mark.parametrize("name", sorted(TORCH_DTYPES))
def test_every_torch_dtype_round_trips(name: str) -> None:
    dtype = TORCH_DTYPES[name]
    base = torch.randint(0, 256, (6 * 4 * dtype.itemsize,), dtype=torch.uint8).view(dtype)
    base = base.reshape(6, 4)
    state = {"plain": base, "t": base.t(), "step": base[::2, 1:], "0d": base[2, 3],
             "empty": base[:, :0], "nested": [(base[1],)]}  # fmt: skip
    for back in round_trips(state).values():
        assert_same(state, back)
        assert all(v.dtype is dtype for v in (back["plain"], back["0d"], back["empty"]))


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_arrays_come_back_as_numpy_arrays(dtype: str) -> None:
    a = np.frombuffer(os.urandom(12 * np.dtype(dtype).itemsize), dtype=dtype).reshape(3, 4)
    state = {"a": a, "T": a.T, "0d": a.reshape(-1)[:1].reshape(()), "scalar": a.reshape(-1)[0]}
    for back in round_trips(state).values():
        assert_same(state, back)
        assert back["T"].shape == (4, 3) and back["0d"].shape == ()


def test_real_file_round_trip_with_an_optimizer_state(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
             "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
             "step": 7, "size": torch.Size([3, 4])}  # fmt: skip
    path = tmp_path / "state.ptu"
    with path.open("wb") as f:
        written = codec.dump(state, f)
    assert path.stat().st_size == written
    with path.open("rb") as f:
        back = codec.load(f)
    assert type(back["model"]) is dict  # OrderedDict comes back as a plain dict, in order
    assert list(back["model"]) == list(state["model"])
    assert_same(dict(state["model"]), back["model"])
    assert_same(
        {k: v for k, v in state.items() if k != "model"}, {k: back[k] for k in back if k != "model"}
    )
    model.load_state_dict(back["model"])
    opt.load_state_dict(back["optimizer"])


def test_scalar_edge_cases_round_trip() -> None:
    class Color(StrEnum):
        RED = "red"

    class Pair(NamedTuple):
        a: int
        b: int

    state = {
        "ints": [0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**63) - 1, 3**200, -(7**99)],
        "floats": [math.nan, -math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308],
        "types": (torch.float8_e4m3fn, torch.bfloat16, torch.device("cpu"), bytearray(b"ab")),
        "np": [np.float32(1.5), np.int64(-3), np.bool_(True), np.complex64(1 + 2j)],
        (1, ("a", None)): {b"k": True, 2.5: None, None: "none", -(2**70): "big key"},
        "text": "ünïcødé ☃",
        # long runs of plain numbers (History columns) take a fast path: same bytes back
        "columns": {"loss": [i / 3 for i in range(5000)] + [math.nan, None, True],
                    "step": list(range(5000)), "steps": tuple(range(-5, 5)),
                    "big last": [*range(100), 2**64], "np in it": [1.0, np.float32(2.0)]},
    }
    for back in round_trips(state).values():
        assert_same(state, back)
    back = codec.loads(
        codec.dumps({"enum": Color.RED, "pair": Pair(1, 2), "od": collections.OrderedDict(x=1)})
    )
    assert_same(
        back, {"enum": "red", "pair": (1, 2), "od": {"x": 1}}
    )  # stored like json stores them


def _complex_at_offset() -> torch.Tensor:
    return torch.randn(3, dtype=torch.complex64).as_strided((1,), (9,), 1)


LAYOUT_REGRESSIONS = {
    # Failing examples of the property tests (issue #8), each failed before the fix:
    # `is_contiguous()` ignores the strides of size-1 dims, and so must the byte view.
    "size-1 dims with odd strides": lambda: torch.zeros(2, 2, dtype=torch.float64)[:1, ::2],
    "size-1 dim expanded from 0-d (stride 0)": lambda: torch.tensor(1.5).bfloat16().expand(1),
    "size-1 dim, stride past the end, storage offset": _complex_at_offset,
    "size-1 dims, strides 3 and 0": lambda: torch.arange(4, dtype=torch.int32).as_strided(
        (1, 1), (3, 0)
    ),
    "empty, stride 0": lambda: torch.tensor(7, dtype=torch.int16).expand(0),
    "empty conjugate view, stride 0": lambda: (
        torch.ones((), dtype=torch.complex64).expand(0).conj()
    ),
    "negative view, size-1 dim with stride 6": lambda: torch._neg_view(
        torch.randn(8).half().as_strided((1,), (6,), 1)
    ),
    "ZeroTensor": lambda: torch._efficientzerotensor((2, 3)),
    # Layouts that always worked, kept next to them:
    "channels_last with one channel": lambda: torch.randn(2, 1, 3, 3).contiguous(
        memory_format=torch.channels_last
    ),
    "channels_last_3d": lambda: torch.randn(2, 3, 2, 2, 2).contiguous(
        memory_format=torch.channels_last_3d
    ),
    "conjugate of a transposed complex32": lambda: (
        torch.randn(3, 2, dtype=torch.complex64).to(torch.complex32).t().conj()
    ),
    "conjugate and negative at once": lambda: torch._neg_view(
        torch.randn(4, dtype=torch.complex128).conj()
    ),
    "expanded then stepped": lambda: torch.randn(3, 1).expand(3, 4)[::2, 1:],
}


@pytest.mark.parametrize("name", sorted(LAYOUT_REGRESSIONS))
def test_tensor_layouts_round_trip_by_value(name: str) -> None:
    tensor = LAYOUT_REGRESSIONS[name]()
    assert_round_trips({"x": tensor, "in a tuple": (tensor, [tensor])})
    stream = io.BytesIO()  # the streaming writer the issue reported
    codec.dump({"x": tensor}, stream)
    assert raw(codec.loads(stream.getvalue())["x"]) == raw(tensor)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_negative_views_of_unsigned_tensors_wrap_around(dtype: torch.dtype) -> None:
    top = 2 ** (8 * dtype.itemsize)
    values = torch.tensor([0, 1, top // 2, top - 1], dtype=dtype)
    for back in round_trips({"neg": torch._neg_view(values)}).values():
        assert back["neg"].tolist() == [0, top - 1, top // 2, 1]  # what numpy's -x gives


def test_negative_views_torch_cannot_negate_are_refused_by_path() -> None:
    for dtype in (torch.bool, torch.float8_e4m3fn, torch.bits8):
        view = torch._neg_view(torch.zeros(3, dtype=dtype))
        with pytest.raises(CodecError, match=r"state\['m'\]\['w'\].*negative view.*" + str(dtype)):
            codec.dumps({"m": {"w": view}})


def test_numpy_layouts_round_trip() -> None:
    a = np.arange(24, dtype="<f8").reshape(2, 3, 4)
    odd = np.lib.stride_tricks.as_strided(a[:1, :, :1], (1, 3, 1), (7, 32, 3))
    state = {"odd": odd, "broadcast": np.broadcast_to(a[0, 0], (5, 4)), "reversed": a[::-1],
             "fortran": np.asfortranarray(a), "unaligned": np.frombuffer(b"\0" + a.tobytes(),
             dtype="<f8", offset=1, count=24), "swapped": a.astype(">i4")[:, ::2]}  # fmt: skip
    assert_round_trips(state)


def test_tensors_needing_preparation_are_saved_by_value() -> None:
    param = torch.nn.Parameter(torch.randn(3, 2))
    z = torch.randn(4, dtype=torch.complex64)
    state = {"param": param, "conj": z.conj(), "neg": torch._neg_view(z), "transposed": param.t()}
    back = codec.loads(codec.dumps(state))
    assert type(back["param"]) is torch.Tensor and not back["param"].requires_grad
    assert torch.equal(back["param"], param.detach())
    assert torch.equal(back["conj"], z.conj().resolve_conj()) and not back["conj"].is_conj()
    assert torch.equal(back["neg"], -z)
    assert back["transposed"].is_contiguous() and torch.equal(
        back["transposed"], param.detach().t()
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_saved_from_cpu_copies_and_load_on_cpu() -> None:
    t = torch.randn(5, 3, device="cuda")
    back = codec.loads(codec.dumps({"t": t, "nc": t.t()}))
    assert back["t"].device.type == "cpu" and torch.equal(back["t"], t.cpu())
    assert torch.equal(back["nc"], t.t().cpu())
    z = torch.randn(4, 1, 3, dtype=torch.complex64, device="cuda")
    layouts = {"odd size-1 stride": t[:1, ::2], "expanded": t[:1].expand(4, 3),
               "conj": z.conj(), "neg": torch._neg_view(z), "channels_last": torch.randn(
                   2, 3, 2, 2, device="cuda").contiguous(memory_format=torch.channels_last)}  # fmt: skip
    for way, back in round_trips(layouts).items():
        for name, value in layouts.items():
            assert back[name].device.type == "cpu", (way, name)
            assert raw(back[name]) == raw(value), (way, name)


def test_large_blobs_are_the_same_bytes_whichever_way_they_are_built() -> None:
    state = {"w": torch.randn(3 * 2**20), "n": np.arange(2**19)}  # 16 MiB: dumps fills in place
    blob, stream = codec.dumps(state), io.BytesIO()
    codec.dump(state, stream)
    assert (
        type(blob) is bytes and blob == stream.getvalue() and hash(blob) == hash(stream.getvalue())
    )
    assert_same(codec.loads(blob), state)


# --- zero-copy and ownership --------------------------------------------------------------
def _inside(t: torch.Tensor | np.ndarray, buffer: Any) -> bool:
    start = np.frombuffer(buffer, dtype=np.uint8).ctypes.data
    ptr = t.data_ptr() if isinstance(t, torch.Tensor) else t.ctypes.data
    return start <= ptr < start + len(buffer)


def test_zero_copy_tensors_share_the_input_buffer() -> None:
    state = {
        "w": torch.randn(64, 32),
        "a": np.arange(10.0),
        "b": torch.arange(5).to(torch.bfloat16),
    }
    blob = bytearray(codec.dumps(state))
    back = codec.loads(blob, zero_copy=True)
    assert all(_inside(v, blob) for v in back.values())
    assert all(
        v.data_ptr() % 64 == np.frombuffer(blob, np.uint8).ctypes.data % 64
        for v in (back["w"], back["b"])
    )  # fmt: skip  (segments are 64-byte aligned)
    back["w"][0, 0] = 123.0  # a writable buffer gives writable views on it
    assert codec.loads(blob, verify=False)["w"][0, 0] == 123.0


def test_zero_copy_on_bytes_gives_read_only_views_without_warnings() -> None:
    blob = codec.dumps({"w": torch.randn(8), "i": torch.arange(4)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        back = codec.loads(blob, zero_copy=True)
    assert _inside(back["w"], blob) and _inside(back["i"], blob)


def test_zero_copy_never_aliases_two_arrays_with_equal_bytes() -> None:
    blob = bytearray(codec.dumps({"a": torch.zeros(16), "b": torch.zeros(16)}))
    back = codec.loads(blob, zero_copy=True)
    back["a"] += 1
    assert torch.equal(back["b"], torch.zeros(16))


def test_copying_loads_own_their_memory() -> None:
    blob = bytearray(codec.dumps({"w": torch.ones(100), "a": np.ones(7)}))
    back = codec.loads(blob)
    assert not _inside(back["w"], blob) and not _inside(back["a"], blob)
    blob[:] = bytes(len(blob))
    assert torch.equal(back["w"], torch.ones(100)) and back["a"].sum() == 7


# --- segments ----------------------------------------------------------------------------
def test_segments_are_named_by_content_and_follow_tensors() -> None:
    state = {"frozen": [torch.randn(1000) for _ in range(9)], "head": torch.randn(300)}
    first, again = codec.encode(state), codec.encode(state)
    assert [s.hash for s in first.segments] == [s.hash for s in again.segments]
    assert all(s.hash == codec.checksum(b"".join(s.chunks())) for s in first.segments)
    state["head"] = state["head"] + 1
    changed = codec.encode(state)
    before, after = {s.hash for s in first.segments}, {s.hash for s in changed.segments}
    assert len(before - after) == 1 and len(after - before) == 1  # only the head's segment
    assert codec.segment_hashes(changed.manifest) == [(s.hash, s.nbytes) for s in changed.segments]


def test_equal_tensors_share_one_segment_and_load_as_separate_tensors() -> None:
    w = torch.randn(50)
    encoded = codec.encode({"a": w, "tied": w, "copy": w.clone()})
    assert len(encoded.segments) == 1
    back = codec.loads(codec.dumps({"a": w, "tied": w}))
    assert torch.equal(back["a"], w) and back["a"].data_ptr() != back["tied"].data_ptr()


def test_a_70_mib_tensor_is_split_into_three_segments_viewing_its_memory() -> None:
    big = torch.randint(0, 256, (70 * 2**20,), dtype=torch.uint8)
    encoded = codec.encode({"big": big})
    sizes = [s.nbytes for s in encoded.segments]
    assert sizes == [MAX_SEGMENT, MAX_SEGMENT, 6 * 2**20]
    chunk = next(encoded.segments[1].chunks())
    assert np.frombuffer(chunk, np.uint8).ctypes.data == big.data_ptr() + MAX_SEGMENT  # no copy
    store = {s.hash: bytes(s.view) for s in encoded.segments}
    assert torch.equal(codec.decode(encoded.manifest, lambda h: io.BytesIO(store[h]))["big"], big)


class _ReadOnly:
    """A file object with read() only (as some store streams are)."""

    def __init__(self, data: bytes) -> None:
        self._stream = io.BytesIO(data)
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        return self._stream.read(min(n, 7) if n > 0 else n)  # short reads on purpose

    def close(self) -> None:
        self.closed = True


def test_decode_reads_through_read_only_streams_and_closes_them() -> None:
    state = {"w": torch.randn(33), "n": np.arange(5)}
    encoded = codec.encode(state)
    opened: list[_ReadOnly] = []

    def open_segment(digest: str) -> _ReadOnly:
        opened.append(_ReadOnly(bytes(next(s for s in encoded.segments if s.hash == digest).view)))
        return opened[-1]

    assert_same(codec.decode(encoded.manifest, open_segment), state)
    assert len(opened) == 2 and all(s.closed for s in opened)


def test_decode_names_the_segment_that_is_corrupt_short_long_or_missing() -> None:
    encoded = codec.encode({"w": torch.randn(100)})
    (segment,) = encoded.segments
    good = bytes(segment.view)
    bad = {"flipped": good[:10] + bytes([good[10] ^ 1]) + good[11:], "short": good[:-1],
           "long": good + b"\0"}  # fmt: skip
    for what, data in bad.items():
        with pytest.raises(CodecError, match=segment.hash):
            codec.decode(encoded.manifest, lambda h, data=data: io.BytesIO(data))
        assert what
    with pytest.raises(CodecError, match="KeyError"):
        codec.decode(encoded.manifest, lambda h: io.BytesIO({}[h]))
    with pytest.raises(StoreUnavailable):  # a store's own errors pass through unchanged
        codec.decode(encoded.manifest, lambda h: (_ for _ in ()).throw(StoreUnavailable("down")))
    assert codec.decode(encoded.manifest, lambda h: io.BytesIO(bad["flipped"]), verify=False)


# --- refusing bad input -------------------------------------------------------------------
def test_unsupported_values_name_their_path_and_type() -> None:
    cases = [
        ({"model": {"x": lambda: 1}}, r"state\['model'\]\['x'\].*function"),
        ({"a": [1, object()]}, r"state\['a'\]\[1\].*object"),
        ({"s": {1, 2}}, r"state\['s'\].*set"),
        ({(1, frozenset()): 0}, r"key of type frozenset"),
        ({"t": torch.zeros(2).to_sparse()}, r"state\['t'\].*layout"),
        ({"q": torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.qint8)}, r"state\['q'\]"),
        ({"o": np.array([None], dtype=object)}, r"state\['o'\].*numpy dtype object"),
    ]
    for state, message in cases:
        with pytest.raises(CodecError, match=message):
            codec.dumps(state)
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(CodecError, match="cycle"):
        codec.encode({"loop": loop})


@pytest.fixture(scope="module")
def blob() -> bytes:
    return codec.dumps({"w": torch.randn(40, 3), "n": np.arange(6), "k": ("x", 1, 2.5),
                        "dup": torch.zeros(5), "dup2": torch.zeros(5), "e": torch.empty(0)})  # fmt: skip


@FAST
@given(data=st.data())
def test_any_flipped_byte_is_detected(blob: bytes, data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(blob) - 1))
    flip = data.draw(st.integers(1, 255))
    mutated = bytearray(blob)
    mutated[position] ^= flip
    for load in (
        codec.loads,
        lambda b: codec.loads(b, zero_copy=True),
        lambda b: codec.load(io.BytesIO(b)),
    ):
        with pytest.raises(CodecError):
            load(bytes(mutated))


@FAST
@given(data=st.data())
def test_truncated_or_extended_blobs_are_refused(blob: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(blob) - 1))
    for bad in (blob[:cut], blob + data.draw(st.binary(min_size=1, max_size=8))):
        with pytest.raises(CodecError):
            codec.loads(bad)
        with pytest.raises(CodecError):
            codec.load(io.BytesIO(bad))


@FAST
@given(st.binary(max_size=200) | st.binary(max_size=60).map(lambda b: codec.MAGIC + b))
def test_random_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(CodecError):
        codec.loads(data)
    with pytest.raises(CodecError):
        codec.decode(data, lambda h: io.BytesIO(b""))


def test_empty_input_says_so() -> None:
    with pytest.raises(CodecError, match="empty"):
        codec.loads(b"")
    with pytest.raises(CodecError, match="empty"):
        codec.load(io.BytesIO())


def test_torch_save_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(3)}, path)
    with pytest.raises(CodecError, match="torch.save"):
        codec.loads(path.read_bytes())
    with path.open("rb") as f, pytest.raises(CodecError, match="torch.save"):
        codec.load(f)


class _Touch:
    """Unpickling this runs a shell command that creates a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


def test_pickle_payloads_are_refused_and_never_run(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    for payload in (pickle.dumps(_Touch(target)), pickle.dumps(_Touch(target), protocol=0),
                    pickle.dumps({"harmless": [1, 2]})):  # fmt: skip
        with pytest.raises(CodecError):
            codec.loads(payload)
        with pytest.raises(CodecError):
            codec.load(io.BytesIO(payload))
        with pytest.raises(CodecError):
            codec.decode(payload, lambda h, p=payload: io.BytesIO(p))
    with pytest.raises(CodecError, match="pickle"):
        codec.loads(pickle.dumps(_Touch(target)))
    assert not target.exists()


def test_blobs_from_a_newer_format_ask_for_an_upgrade(blob: bytes) -> None:
    newer = bytearray(blob)
    newer[12] += 1  # the version field follows the 12 magic bytes
    with pytest.raises(CodecError, match="upgrade"):
        codec.loads(bytes(newer))
    manifest = codec.encode({"x": 1}).manifest.replace(b"\xa7version\x01", b"\xa7version\x02")
    with pytest.raises(CodecError, match="upgrade"):
        codec.decode(manifest, lambda h: io.BytesIO())


# --- nesting depth and hostile structures -------------------------------------------------
def _nested(depth: int, kind: str) -> Any:
    """`depth` containers, each holding the next; "mixed" cycles through every kind."""
    value: Any = "leaf"
    for level in range(depth):
        form = kind if kind != "mixed" else ("tuple", "list", "dict", "key")[level % 4]
        if form == "tuple":
            value = (value, level)
        elif form == "list":
            value = [value]
        elif form == "dict":
            value = {"k": value}
        else:  # a tuple key: the dict holding it is one level, the key another
            value = {(level, value) if type(value) is str else (level,): value}
    return value


@pytest.mark.parametrize("kind", ["tuple", "list", "dict", "mixed"])
def test_states_nested_max_depth_round_trip_and_one_more_is_refused(kind: str) -> None:
    deepest = _nested(MAX_DEPTH, kind)
    assert_round_trips(deepest)
    too_deep = _nested(MAX_DEPTH + 1, kind)
    message = rf"cannot encode state\[.*nested deeper than {MAX_DEPTH} levels.*MAX_DEPTH"
    for write in (codec.dumps, lambda s: codec.dump(s, io.BytesIO()), codec.encode):
        with pytest.raises(CodecError, match=message):
            write(too_deep)
        with pytest.raises(CodecError, match=message):
            write({"inside": [too_deep]})


def test_tuple_keys_count_towards_the_depth() -> None:
    key: Any = "k"
    for _ in range(MAX_DEPTH - 1):
        key = (key,)
    assert_round_trips({key: 1})  # the dict is level 1, the key's tuples levels 2..MAX_DEPTH
    with pytest.raises(CodecError, match=r"tuple key.*nested deeper"):
        codec.dumps({(key,): 1})


def _ext(code: int, payload: bytes) -> bytes:
    """A msgpack extension, packed by hand (msgpack's own packer would copy every level)."""
    return _ext_header(code, len(payload)) + payload


def _ext_header(code: int, n: int) -> bytes:
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if n in fixed:
        return bytes([fixed[n], code & 0xFF])
    for limit, marker, size in ((2**8, 0xC7, "B"), (2**16, 0xC8, "H"), (2**32, 0xC9, "I")):
        if n < limit:
            return struct.pack(f">B{size}b", marker, n, code)
    raise ValueError(f"an extension payload of {n} bytes does not fit msgpack")


def _nested_tuples(depth: int, codes: tuple[int, ...] = (1,)) -> bytes:
    """The structure of `depth` 1-tuples, each holding the next, None innermost, the way
    the codec writes it; built in linear time (a 100,000-deep one is ~700 KB)."""
    heads, length = [], 2  # the innermost payload: [None]
    for level in range(depth):
        head = _ext_header(codes[level % len(codes)], length)
        heads.append(head if level == depth - 1 else b"\x91" + head)
        length += len(heads[-1])
    return b"".join(reversed(heads)) + b"\x91\xc0"


def _blob(tree: bytes, tensors: list[Any] = (), segments: list[bytes] = ()) -> bytes:
    """A blob that passes every checksum around a hand-made structure and tensor table."""
    manifest = msgpack.packb(
        {"format": "ptutils.state", "version": codec.FORMAT_VERSION, "tree": tree,
         "tensors": list(tensors), "segments": [[codec.checksum(s), len(s)] for s in segments]}
    )  # fmt: skip
    digest = xxhash.xxh3_128(manifest).digest()
    out = struct.pack("<12sHHQ16s", codec.MAGIC, codec.FORMAT_VERSION, 0, len(manifest), digest)
    out += manifest
    for segment in segments:
        out += bytes(-len(out) % codec.ALIGN) + segment
    return out


def test_hand_made_blobs_are_the_codecs_own_bytes() -> None:
    for n in (1, 2, 3, 16, 255, 256, 70_000):
        assert _ext(5, b"x" * n) == msgpack.packb(msgpack.ExtType(5, b"x" * n))
    deepest: Any = None
    for _ in range(MAX_DEPTH):
        deepest = (deepest,)
    assert _blob(_nested_tuples(MAX_DEPTH)) == codec.dumps(deepest)
    w = torch.arange(4.0)
    row = {"path": "state['w']", "kind": "torch", "dtype": "float32", "shape": [4],
           "nbytes": 16, "segments": [[codec.checksum(raw(w)), 0]]}  # fmt: skip
    tree = msgpack.packb({"w": msgpack.ExtType(2, bytes(4))})
    assert _blob(tree, [row], [raw(w)]) == codec.dumps({"w": w})


_TIB = 2**40
_DECODE_IN_A_SMALL_THREAD = """
import io, json, resource, sys, threading
from ptutils import codec

def decode_all(blob):
    manifest = blob[40:40 + int.from_bytes(blob[16:24], "little")]
    ways = {"loads": lambda: codec.loads(blob), "zero_copy": lambda: codec.loads(blob, zero_copy=True),
            "load": lambda: codec.load(io.BytesIO(blob)),
            "decode": lambda: codec.decode(manifest, lambda h: io.BytesIO(blob[-codec.MAX_SEGMENT:]))}
    results = {}
    for way, run in ways.items():
        try:
            results[way] = "ok " + type(run()).__name__
        except codec.CodecError as exc:
            results[way] = "CodecError: " + str(exc)
    return results

out = {}
def main():
    for path in sys.argv[1:]:
        with open(path, "rb") as f:
            out[path] = decode_all(f.read())
threading.stack_size(512 * 1024)  # a 16th of a main thread's C stack: no recursion hides
thread = threading.Thread(target=main)
thread.start()
thread.join()
print(json.dumps({"results": out, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _hostile_blobs() -> dict[str, tuple[bytes, str]]:
    """Blobs with valid checksums and a malicious or corrupt structure: name -> (blob,
    what every decoder must say: "ok <type>" or a regex on the CodecError)."""
    deep = f"nested deeper than {MAX_DEPTH} levels"
    claimed = "exceeds max_.*_len|incomplete input"  # msgpack: more than the input holds
    zeros = bytes(MAX_SEGMENT)
    digest = codec.checksum(zeros)
    huge_row = {"path": "x", "kind": "torch", "dtype": "float32", "shape": [_TIB],
                "nbytes": 4 * _TIB,
                "segments": [[digest, MAX_SEGMENT * i] for i in range(4 * _TIB // MAX_SEGMENT)]}  # fmt: skip
    trees = {
        "tuples 100,000 deep (~700 KB)": (_nested_tuples(100_000), deep),
        "tuples and sizes 100,000 deep": (_nested_tuples(100_000, (1, 3)), deep),
        f"tuples {MAX_DEPTH} deep": (_nested_tuples(MAX_DEPTH), "ok tuple"),
        f"tuples {MAX_DEPTH + 1} deep": (_nested_tuples(MAX_DEPTH + 1), deep),
        "a tuple key 100,000 deep": (b"\x81" + _nested_tuples(100_000) + b"\xc0", deep),
        f"lists {MAX_DEPTH} deep": (b"\x91" * MAX_DEPTH + b"\xc0", "ok list"),
        f"lists {MAX_DEPTH + 1} deep": (b"\x91" * (MAX_DEPTH + 1) + b"\xc0", deep),
        f"dicts {MAX_DEPTH + 1} deep": (b"\x81\xa1k" * (MAX_DEPTH + 1) + b"\xc0", deep),
        "lists 100,000 deep": (b"\x91" * 100_000 + b"\xc0", deep),
        "a list claiming 2**32-1 items": (b"\xdd\xff\xff\xff\xff", claimed),
        "a dict claiming 2**32-1 pairs": (b"\xdf\xff\xff\xff\xff", claimed),
        "bytes claiming 4 GiB": (b"\xc6\xff\xff\xff\xff", claimed),
        "a str claiming 4 GiB": (b"\xdb\xff\xff\xff\xff", claimed),
        "a tuple claiming 4 GiB": (b"\xc9\xff\xff\xff\xff\x01", claimed),
        "a tuple whose list claims 2**32-1 items": (
            _ext(1, b"\xdd\xff\xff\xff\xff"),
            claimed,
        ),
        "unknown extension type 99": (_ext(99, b""), "extension type 99"),
        "msgpack's timestamp extension (-1)": (
            msgpack.packb([msgpack.Timestamp(1, 2)]),
            "extension type -1",
        ),
    }
    blobs = {name: (_blob(tree), expect) for name, (tree, expect) in trees.items()}
    blobs["4 TiB of one repeated 32 MiB segment"] = (
        _blob(msgpack.packb(msgpack.ExtType(2, bytes(4))), [huge_row], [zeros]),
        "need 4096.0 GiB of memory",
    )
    return blobs


def test_hostile_structures_are_refused_without_crashing(tmp_path: Path) -> None:
    """Every decoder, in a thread with a 512 KiB stack, in a child process: a crash shows
    as a failed test, not a dead pytest; the child's memory stays small throughout."""
    blobs = _hostile_blobs()
    paths = {}
    for i, (name, (blob, _)) in enumerate(blobs.items()):
        paths[name] = tmp_path / f"{i}.ptu"
        paths[name].write_bytes(blob)
    child = subprocess.run(
        [sys.executable, "-c", _DECODE_IN_A_SMALL_THREAD, *map(str, paths.values())],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert child.returncode == 0, (
        f"the decoding process died (return code {child.returncode}):\n{child.stderr[-3000:]}"
    )
    report = json.loads(child.stdout)
    for name, (_, expect) in blobs.items():
        results = report["results"][str(paths[name])]
        for way, said in results.items():
            if expect.startswith("ok"):
                assert said == expect, f"{name}, {way}: {said}"
            else:
                assert re.search(f"CodecError: .*({expect})", said), f"{name}, {way}: {said}"
    assert report["maxrss_kib"] < 2 * 2**20, f"the child peaked at {report['maxrss_kib']} KiB"


def test_the_codec_never_imports_pickle() -> None:
    unpicklers = re.compile(
        r"^\s*(import|from)\s+(pickle|cPickle|dill|cloudpickle|joblib)\b|pickle\.load|torch\.load\(\w",
        re.M,
    )
    for path in Path(codec.__file__).parent.glob("*.py"):
        assert not unpicklers.search(path.read_text()), path


def test_dump_streams_without_building_the_blob(tmp_path: Path) -> None:
    from bench.harness import peak_extra_memory

    state = {f"w{i}": torch.randn(2**20) for i in range(32)}  # 128 MiB
    with (tmp_path / "s.ptu").open("wb") as f:
        peak = peak_extra_memory(lambda: codec.dump(state, f))
    assert peak < 0.25 * 128 * 2**20, f"dump used {peak / 2**20:.1f} MiB extra"


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES.values()), ids=str)
def test_non_contiguous_tensors_round_trip_in_deterministic_mode(dtype):
    """A session turns on deterministic algorithms in the worker's process, where empty
    tensors are filled first and some dtypes (float4) have no such fill: encoding and
    decoding copy bits, never through the dtype's own kernels (found by the property
    test once an earlier test had left the mode on)."""
    raw = torch.randint(0, 256, (4, 6, dtype.itemsize), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(7))
    x = raw.view(dtype).reshape(4, 6) if dtype.itemsize > 1 else raw.reshape(4, 6).view(dtype)
    state = {"t": x.t()[::2], "empty": x[:0].t(), "scalar": x[1, 2]}
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        backs = round_trips(state)
    finally:
        torch.use_deterministic_algorithms(before)
    for way, back in backs.items():  # compared outside the mode (the test's own copies)
        try:
            assert_same(state, back)
        except AssertionError as exc:
            raise AssertionError(f"{way}: {exc}") from exc
