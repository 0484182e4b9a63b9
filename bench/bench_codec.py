"""The State codec against torch.save / torch.load on a ResNet-like state dict.

Side by side in one process, on the same ~256 MB of float32 (ResNet-152 layout with a
3000-way classifier): encode (`dumps` vs `torch.save` to BytesIO), decode (`loads`
zero-copy and copying vs `torch.load(weights_only=True)`), a plain `bytes()` copy of
the same amount of data as the floor, and the peak extra memory of `dump` streaming to
a file. Goals: encode >= 1.4x torch.save; decode >= 2x torch.load zero-copy and
>= 0.8x when copying; streaming peak extra memory <= 0.25x the state size.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.harness import Goal, Timing, compare, peak_extra_memory, report
from ptutils import codec

FULL = {"blocks": (3, 8, 36, 3), "width": 64, "classes": 3000, "repeat": 5}
QUICK = {"blocks": (3, 4, 6, 3), "width": 32, "classes": 1000, "repeat": 3}


def resnet_state(blocks: tuple[int, ...], width: int, classes: int) -> dict[str, torch.Tensor]:
    """A bottleneck-ResNet state dict with realistic shapes and batchnorm buffers."""
    gen = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        state[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=gen)

    def bn(name: str, c: int) -> None:
        state[f"{name}.weight"] = torch.rand(c, generator=gen)
        state[f"{name}.bias"] = torch.randn(c, generator=gen)
        state[f"{name}.running_mean"] = torch.randn(c, generator=gen)
        state[f"{name}.running_var"] = torch.rand(c, generator=gen)
        state[f"{name}.num_batches_tracked"] = torch.tensor(1000)

    conv("conv1", width, 3, 7)
    bn("bn1", width)
    cin = width
    for stage, count in enumerate(blocks):
        mid = width * 2**stage
        for b in range(count):
            p = f"layer{stage + 1}.{b}"
            conv(f"{p}.conv1", mid, cin, 1), bn(f"{p}.bn1", mid)
            conv(f"{p}.conv2", mid, mid, 3), bn(f"{p}.bn2", mid)
            conv(f"{p}.conv3", mid * 4, mid, 1), bn(f"{p}.bn3", mid * 4)
            if b == 0:
                conv(f"{p}.downsample.0", mid * 4, cin, 1), bn(f"{p}.downsample.1", mid * 4)
            cin = mid * 4
    state["fc.weight"] = torch.randn(classes, cin, generator=gen)
    state["fc.bias"] = torch.randn(classes, generator=gen)
    return state


def _torch_save(state: Any) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer


def _check_round_trip(state: dict[str, torch.Tensor], blob: bytes) -> None:
    for zero_copy in (False, True):
        back = codec.loads(blob, zero_copy=zero_copy)
        assert list(back) == list(state), "keys differ after a round trip"
        assert all(torch.equal(back[k], v) for k, v in state.items()), "values differ"


def _row(name: str, t: Timing, nbytes: int, baseline: Timing | None) -> dict[str, Any]:
    return {
        "operation": name,
        "best_s": t.best,
        "median_s": t.median,
        "GB/s": nbytes / t.best / 1e9,
        "speedup_vs_torch": baseline.best / t.best if baseline else None,
    }


def _stream_peak(state: Any, nbytes: int) -> tuple[float, float]:
    """Peak extra memory of `dump` and of `torch.save` writing a file, as fractions."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.bin"

        def ours() -> None:
            with path.open("wb") as f:
                codec.dump(state, f)

        def theirs() -> None:
            torch.save(state, Path(tmp) / "state.pt")

        ours_peak = peak_extra_memory(ours) / nbytes
        theirs_peak = peak_extra_memory(theirs) / nbytes
        with path.open("rb") as f:  # what dump wrote loads back
            back = codec.load(f)
        assert all(torch.equal(back[k], v) for k, v in state.items())
    return ours_peak, theirs_peak


def run(quick: bool = False) -> dict[str, Any]:
    """Measure, check the goals, print and save the report."""
    size = QUICK if quick else FULL
    state = resnet_state(size["blocks"], size["width"], size["classes"])
    nbytes = sum(t.nbytes for t in state.values())
    floor_src = memoryview(torch.empty(nbytes, dtype=torch.uint8).fill_(7).numpy())
    repeat = size["repeat"]

    stream_ours, stream_torch = _stream_peak(state, nbytes)
    enc = compare(
        {
            "ptutils dumps": lambda: codec.dumps(state),
            "torch.save (BytesIO)": lambda: _torch_save(state),
            "bytes() copy (floor)": lambda: bytes(floor_src),
        },
        repeat=repeat,
    )
    blob, tblob = codec.dumps(state), _torch_save(state).getvalue()
    _check_round_trip(state, blob)
    dec = compare(
        {
            "ptutils loads zero_copy": lambda: codec.loads(blob, zero_copy=True),
            "ptutils loads copy": lambda: codec.loads(blob),
            "torch.load weights_only": lambda: torch.load(io.BytesIO(tblob), weights_only=True),
            "bytes() copy (floor)": lambda: bytes(floor_src),
        },
        repeat=repeat,
    )
    tsave, tload = enc["torch.save (BytesIO)"], dec["torch.load weights_only"]
    rows = [_row(f"encode: {k}", v, nbytes, tsave) for k, v in enc.items()]
    rows += [_row(f"decode: {k}", v, nbytes, tload) for k, v in dec.items()]
    goals = [
        Goal("encode speed vs torch.save", tsave.best / enc["ptutils dumps"].best, 1.4),
        Goal(
            "decode zero-copy vs torch.load", tload.best / dec["ptutils loads zero_copy"].best, 2.0
        ),
        Goal("decode copy vs torch.load", tload.best / dec["ptutils loads copy"].best, 0.8),
        Goal("dump peak extra memory / state", stream_ours, 0.25, "<="),
    ]
    return report(
        "codec",
        rows,
        goals,
        state={"tensors": len(state), "bytes": nbytes, "blob_bytes": len(blob),
               "torch_save_bytes": len(tblob), "quick": quick},
        stream_peak_extra={"ptutils dump": stream_ours, "torch.save": stream_torch},
    )  # fmt: skip
