"""MongoStore on a real MongoDB wire server (an nx-27017 it starts, file-backed).

(a) A ~200 MB State saved to GridFS and loaded back bit-exact: throughput, and the peak
    memory a save adds on top of the process that already holds the State
    (goal: State + extra <= 1.25x the State).
(b) Dedup: a 10-layer network with 9 layers frozen, trained between checkpoints: bytes
    written per checkpoint (goal: <= 20% of a full checkpoint after the first).
(c) Statistics: points/s written in batches into bucket documents (one per session,
    phase, name and 512 steps) vs the naive one insert per point, side by side, with
    replays, one call per point, reads, and the server's own ceiling (insert_many of
    tiny documents) for reference (goal: >= 20k points/s batched).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymongo
import torch

from bench.harness import Goal, compare, peak_extra_memory, report
from ptutils.store.base import StatPoint, new_id, new_session_doc
from ptutils.store.mongo import MongoStore

MB = 1e6
FULL = {"big": 4, "big_numel": 10_000_000, "small": 4, "small_numel": 2_500_000,
        "width": 1024, "points": 20_000, "single": 500, "repeat": 3}  # fmt: skip
QUICK = {"big": 2, "big_numel": 10_000_000, "small": 2, "small_numel": 2_500_000,
         "width": 256, "points": 5_000, "single": 200, "repeat": 2}  # fmt: skip


@contextlib.contextmanager
def nx_server(folder: Path) -> Iterator[str]:
    """An nx-27017 on a free loopback port, databases as SQLite files in `folder`."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    binary = Path(sys.executable).parent / "nx-27017"
    with open(folder / "nx.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [str(binary), "--host", "127.0.0.1", "-p", str(port), "--data-dir",
             str(folder / "data"), "--log-file", str(folder / "nx-internal.log"),
             "--pid-file", str(folder / "nx.pid")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    uri = f"mongodb://127.0.0.1:{port}"
    try:
        client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=30_000)
        client.admin.command("ping")
        client.close()
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def row(case: str, value: float, unit: str) -> dict[str, Any]:
    return {"case": case, "value": value, "unit": unit}


def big_state(p: dict[str, Any]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    state = {f"big{i}": torch.randn(p["big_numel"], generator=gen) for i in range(p["big"])}
    for i in range(p["small"]):
        state[f"small{i}"] = torch.randn(p["small_numel"], generator=gen)
    return state


def bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a
    )


def round_trip(store: MongoStore, p: dict[str, Any]) -> tuple[list[dict[str, Any]], dict]:
    """(a): save and load a big State; rows and figures."""
    sid = store.create_session(new_session_doc("roundtrip", {}, "h", 1))["_id"]
    state = big_state(p)
    size = sum(t.numel() * t.element_size() for t in state.values())
    start = time.perf_counter()
    extra_save = peak_extra_memory(lambda: store.put_checkpoint(sid, 1, "chunk", state))
    save_s = time.perf_counter() - start
    ckpt = store.get_checkpoint(sid, 1)
    loaded: dict[str, Any] = {}
    start = time.perf_counter()
    extra_load = peak_extra_memory(lambda: loaded.update(state=store.load_state(ckpt)))
    load_s = time.perf_counter() - start
    exact = bit_exact(state, loaded["state"])
    save, load = f"save {size / MB:.0f} MB", f"load {size / MB:.0f} MB"
    rows = [
        row(f"{save}: throughput", size / MB / save_s, "MB/s"),
        row(f"{save}: peak extra memory", extra_save / MB, "MB"),
        row(f"{save}: (state + peak extra) / state", (size + extra_save) / size, "x"),
        row(f"{load}: throughput", size / MB / load_s, "MB/s"),
        row(f"{load}: peak extra memory (the loaded state included)", extra_load / MB, "MB"),
        row(f"{load}: bit-exact", float(exact), "bool"),
    ]
    figures = {"state_mb": size / MB, "save_ratio": (size + extra_save) / size, "exact": exact,
               "segments": len(ckpt["segments"])}  # fmt: skip
    return rows, figures


def frozen_network(width: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(10)))
    for layer in list(net)[:9]:
        layer.requires_grad_(False)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    return net, opt


def dedup(store: MongoStore, p: dict[str, Any]) -> tuple[list[dict[str, Any]], list[float]]:
    """(b): bytes written per checkpoint of a 90%-frozen network trained between them."""
    sid = store.create_session(new_session_doc("dedup", {}, "h", 1))["_id"]
    net, opt = frozen_network(p["width"])
    rows, fractions = [], []
    for chunk in range(5):
        for _ in range(3):
            loss = net(torch.randn(32, p["width"])).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "chunk": chunk}
        ckpt = store.put_checkpoint(sid, chunk, "chunk", state)
        fraction = ckpt["bytes_written"] / ckpt["size"]
        fractions.append(fraction)
        rows.append(row(f"dedup checkpoint {chunk}: written of {ckpt['size'] / MB:.1f} MB",
                        ckpt["bytes_written"] / MB, "MB"))  # fmt: skip
        rows.append(row(f"dedup checkpoint {chunk}: written / size", fraction, "x"))
    return rows, fractions


def statistics(store: MongoStore, p: dict[str, Any]) -> tuple[list[dict[str, Any]], float]:
    """(c): points/s of the bucketed batch write vs one insert per point, side by side.

    Also a replayed batch (every point overwritten), one `write_statistics` call per
    point, reading the batch back, and the server's own ceiling for tiny inserts.
    """
    n, single = p["points"], p["single"]
    replay_sid, read_sid = new_id(), new_id()

    def points(count: int) -> list[StatPoint]:
        return [StatPoint("train", s // 4, ("loss", "acc", "lr", "gnorm")[s % 4], s * 0.5)
                for s in range(count)]  # fmt: skip

    batch, one_by_one = points(n), points(single)
    store.write_statistics(replay_sid, batch)
    store.write_statistics(read_sid, batch)
    per_point, tiny = store.db["bench_per_point"], store.db["bench_tiny"]
    per_point.create_index([("session", 1), ("phase", 1), ("step", 1), ("name", 1)], unique=True)

    def naive() -> None:
        """The layout before buckets: one document per point, one insert per point."""
        sid = new_id()
        for pt in one_by_one:
            per_point.insert_one({"session": sid, "phase": pt.phase, "step": pt.step,
                                  "name": pt.name, "value": pt.value, "time": pt.time})  # fmt: skip

    def ceiling() -> None:
        tiny.drop()
        tiny.insert_many([{"i": i} for i in range(n)], ordered=False)

    def per_call() -> None:
        sid = new_id()
        for point in one_by_one:
            store.write_statistics(sid, [point])

    cases = {
        "batched, bucketed (new session)": (n, lambda: store.write_statistics(new_id(), batch)),
        "batched, bucketed, replayed (overwrite)": (
            n, lambda: store.write_statistics(replay_sid, batch)
        ),
        "naive: one insert_one per point": (single, naive),
        "one write_statistics call per point": (single, per_call),
        "query_statistics of the batch (read)": (n, lambda: store.query_statistics(read_sid)),
        "server ceiling: insert_many of {i: n}": (n, ceiling),
    }  # fmt: skip
    timings = compare({k: fn for k, (_, fn) in cases.items()}, repeat=p["repeat"], warmup=0)
    per_point.drop()
    tiny.drop()
    rates = {name: cases[name][0] / t.median for name, t in timings.items()}
    rows = [
        row(f"statistics, {name} ({cases[name][0]} points), median", rate, "points/s")
        for name, rate in rates.items()
    ]
    batched = rates["batched, bucketed (new session)"]
    rows.append(
        row("statistics, batched / naive", batched / rates["naive: one insert_one per point"], "x")
    )
    return rows, batched


def run(quick: bool = False) -> dict[str, Any]:
    p = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp, nx_server(Path(tmp)) as uri:
        store = MongoStore(f"{uri}/bench")
        try:
            rt_rows, rt = round_trip(store, p)
            dd_rows, fractions = dedup(store, p)
            st_rows, batched_rate = statistics(store, p)
        finally:
            store.close()
    goals = [
        Goal("round trip bit-exact", float(rt["exact"]), 1.0),
        Goal("save: (state + peak extra) / state", rt["save_ratio"], 1.25, "<="),
        Goal("dedup: written/size after the first", max(fractions[1:]), 0.20, "<="),
        Goal("statistics batched points/s", batched_rate, 20_000.0),
    ]
    return report("store", rt_rows + dd_rows + st_rows, goals, params=p, **rt,
                  server="nx-27017 (file-backed, started by the benchmark)")  # fmt: skip


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
