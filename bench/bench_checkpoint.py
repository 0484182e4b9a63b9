"""Checkpoints off the training path, side by side in one run (issue 12).

- Stall per checkpoint: how long training waits at a chunk boundary with the background
  writer (the Engine's path: a host snapshot in shared memory, then statistics, encode,
  hash, dedup, upload and commit in the writer process, ptutils.ckpt_process), against the host-copy time of the same State (the limit), a synchronous
  `put_checkpoint`, and `torch.distributed.checkpoint.async_save` to a local folder. A
  "chunk" between checkpoints is modelled as an accelerator busy for a while (the CPU
  is free: `time.sleep`) and every tensor changed in place (so nothing deduplicates).
- Local put vs `torch.save` + fsync of the same State; MongoDB put vs raw `GridFSBucket`
  uploads of the same segment bytes on the same nx-27017 (started here, file-backed).
- An Engine Train task of several chunks with the local store and background
  checkpoints vs the plain PyTorch loop of bench_trainer.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.bench_store import nx_server
from bench.bench_trainer import PlainLoop, _config, _plain_loop, session_data
from bench.harness import Goal, compare, report
from ptutils.ckpt_process import SharedSnapshot, writer_process
from ptutils.ckpt_writer import CheckpointWriter, HostSnapshot
from ptutils.engine import Engine
from ptutils.protocol import TRAIN, Task
from ptutils.store.base import Store, new_session_doc
from ptutils.store.local import LocalStore
from ptutils.store.mongo import MongoStore


def _state(mb: int) -> dict[str, Any]:
    """A State of about `mb` MB: an MLP and its SGD momentum (half and half)."""
    torch.manual_seed(0)
    width = 2048
    layers = max(1, round(mb * 2**20 / 2 / (4 * width * width)))
    net = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, width)).sum().backward()
    opt.step()
    return {"model": net.state_dict(), "optimizer": opt.state_dict(), "step": 0}


def _nbytes(state: Any) -> int:
    if isinstance(state, torch.Tensor):
        return state.nbytes
    if isinstance(state, dict):
        return sum(_nbytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(_nbytes(v) for v in state)
    return 0


def _tensors(state: Any) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    if isinstance(state, list | tuple):
        return [t for v in state for t in _tensors(v)]
    return []


def _train_chunk(state: dict[str, Any], seconds: float) -> None:
    """Every tensor changes (in place, as an optimizer step does); then the device is busy."""
    with torch.no_grad():
        for t in _tensors(state):
            if t.is_floating_point():
                t.add_(1e-3)
    time.sleep(seconds)


def _session(store: Store, name: str) -> str:
    return store.create_session(new_session_doc(name, {"session": {}}, "h", 10**6))["_id"]


def _ready_writer_process() -> None:
    proc = writer_process()
    deadline = time.monotonic() + 60
    while proc is not None and not proc.ready() and time.monotonic() < deadline:
        time.sleep(0.05)


def _async_stalls(store: Store, state: dict[str, Any], chunks: int, chunk_s: float) -> list[float]:
    """The Engine's boundary: wait for the previous write, snapshot into shared memory,
    hand it to the writer process (started beforehand, as a worker's is)."""
    sid, snap, writer, stalls = _session(store, f"async-{time.time_ns()}"), SharedSnapshot(), \
        CheckpointWriter(store.url), []
    _ready_writer_process()
    snap.take(state)  # the arena is laid out once per session, at its first checkpoint
    for n in range(1, chunks + 1):
        _train_chunk(state, chunk_s)
        start = time.perf_counter()
        writer.wait()
        copy = snap.take(state)
        writer.submit_write(store, {"session": sid, "step": n, "kind": "chunk", "points": [],
                                    "metrics": {}, "expect": {}, "update": {"meta.n": n}},
                            copy, snap)
        stalls.append(time.perf_counter() - start)
    writer.close()
    assert writer.process_writes == chunks, "the writes ran in a thread, not the process"
    return stalls


def _dcp_stalls(folder: Path, state: dict[str, Any], chunks: int, chunk_s: float) -> list[float]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    folder.mkdir(parents=True, exist_ok=True)
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=0, world_size=1)
    stalls, pending = [], None
    for n in range(1, chunks + 1):
        _train_chunk(state, chunk_s)
        start = time.perf_counter()
        if pending is not None:
            pending.result()
        pending = dcp.async_save(state, checkpoint_id=str(folder / f"dcp-{n}"))
        stalls.append(time.perf_counter() - start)
    if pending is not None:
        pending.result()
    return stalls


def _torch_save_fsync(path: Path, state: dict[str, Any]) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def _raw_gridfs(uri: str, segments: list[Any]) -> None:
    import pymongo
    from gridfs import GridFSBucket

    client = pymongo.MongoClient(uri)
    try:
        bucket = GridFSBucket(client.get_default_database(), bucket_name=f"raw{time.time_ns()}")
        for seg in segments:
            with bucket.open_upload_stream(seg.hash, chunk_size_bytes=255 * 1024) as up:
                for piece in seg.chunks():
                    up.write(piece.tobytes())  # GridIn takes bytes only
    finally:
        client.close()


BLOCK = 50
"""Steps of each lock-step block of bench_checkpoint's Engine row (a multiple of 10)."""


def _engine_task(steps: int, chunk: int, sessions: list[Any], plain: Any = None
                 ) -> tuple[float, float]:
    """A Train task of steps // chunk chunks, on a session built beforehand (as the
    Trainer.run row of bench_trainer: building is not part of the step loop), the
    store's creation not counted: (seconds per step of the task, seconds per step of the
    `plain` loop run in lock step with it, or 0.0).

    Lock step: every `BLOCK` steps (at a log point) the Engine's progress callback runs
    `BLOCK` steps of the plain loop, timed apart, so the two see the same moments of a
    shared machine; skipped while a background write is running, so that the write's
    cost lands on the Engine's side only. The plain loop steps the session's own network,
    optimizer and data tensors, so both time the same tensors in memory."""
    from ptutils.rng import get_rng_state

    inside, plain_steps = [0.0], [0]
    engine: Engine | None = None

    def progress(_sid: str, step: int, _loss: float) -> None:
        if plain is None or engine is None or engine.writer.busy or step % BLOCK:
            return
        t = time.perf_counter()
        plain.run(BLOCK)
        inside[0] += time.perf_counter() - t
        plain_steps[0] += BLOCK

    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(tmp)
        doc = store.create_session(new_session_doc("bench", _chunked(steps, chunk), "h", steps))
        engine = Engine(store, chunks_per_task=steps // chunk, progress=progress)
        engine.adopt(doc, sessions.pop(), get_rng_state())
        start = time.perf_counter()
        out = engine.train(Task(TRAIN, doc["_id"], doc["token"], 0, chunk))
        elapsed = time.perf_counter() - start - inside[0]
        assert out.ran and out.step == steps, out.reason
        if plain is not None:  # every chunk but the last written by the writer process
            assert engine.writer.process_writes == steps // chunk - 1, "a write ran in a thread"
        store.close()
    return elapsed / steps, inside[0] / plain_steps[0] if plain_steps[0] else 0.0


def _chunked(steps: int, chunk: int) -> dict[str, Any]:
    cfg = _config(steps)
    cfg["session"]["chunk_steps"] = chunk
    return cfg


ENGINE_PROCESSES = 4
"""Fresh processes the Engine row's rounds run in. Within one process the ratio carries
an offset of its own (up to a few percent on this VM: where the allocator put the two
loops' batches and temporaries), which more rounds in the same process do not average
out; the row is the median over rounds from several processes."""

ROUNDS_PER_PROCESS = 4


def _engine_rounds(rounds: int, steps: int) -> list[float]:
    """`rounds` Engine tasks of 5 chunks vs the plain loop in lock step, in this process:
    the ratio of each."""
    from ptutils.session import Session

    torch.set_num_threads(1)
    os.sync()  # whatever ran before flushes its dirty pages now, not during the rounds
    warm = Session.create(_chunked(steps, steps // 5))
    _plain_loop(steps, *session_data(warm))  # warm-up: first calls, lazy imports
    _engine_task(steps, steps // 5, [warm])  # ... and the store's schema
    _ready_writer_process()  # a worker's is started with its Engine, long before
    ratios = []
    for _ in range(rounds):
        sessions = [Session.create(_chunked(steps, steps // 5))]
        # steps the Engine's own network, optimizer and data tensors (the same memory)
        plain = PlainLoop(*session_data(sessions[0]), sessions[0].trainer.model)
        gc.collect()
        engine_step, plain_step = _engine_task(steps, steps // 5, sessions, plain)
        ratios.append(round(engine_step / plain_step, 4))
    return ratios


def _engine_ratio(quick: bool) -> tuple[dict[str, Any], Goal]:
    """Engine task vs the plain loop in lock step. Measured first, on a quiet machine:
    after the 200 MB writes the kernel flushes dirty pages for a while, which takes a
    core from whichever loop runs then. The full run takes its rounds from
    `ENGINE_PROCESSES` fresh processes, one after the other."""
    steps = 300 if quick else 1500
    if quick:
        per_process = [_engine_rounds(2, steps)]
    else:
        code = ("import json; from bench.bench_checkpoint import _engine_rounds; "
                f"print(json.dumps(_engine_rounds({ROUNDS_PER_PROCESS}, {steps})))")
        root = Path(__file__).resolve().parent.parent
        per_process = []
        for _ in range(ENGINE_PROCESSES):
            out = subprocess.run([sys.executable, "-c", code], cwd=root, check=True,
                                 capture_output=True, text=True).stdout
            per_process.append(json.loads(out.strip().splitlines()[-1]))
    ratios = [r for rounds in per_process for r in rounds]
    ratio = round(statistics.median(ratios), 3)
    row = {"what": f"Engine task of 5 chunks, {steps} steps, background checkpoints vs "
           f"plain loop in lock step (median of {len(ratios)} rounds in "
           f"{len(per_process)} processes)", "store": "local", "ratio": ratio,
           "rounds by process": per_process,
           "process medians": [round(statistics.median(r), 3) for r in per_process]}
    return row, Goal("Engine chunks with store + async checkpoint / plain loop", ratio, 1.05,
                     "<=")


def run(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    engine_row, engine_goal = _engine_ratio(quick)
    mb = 50 if quick else 200
    chunks = 4 if quick else 8  # stalls per store: a median of 8 (4 swung with the machine)
    repeat = 2 if quick else 3
    state = _state(mb)
    size = _nbytes(state)
    rows: list[dict[str, Any]] = []

    def row(what: str, where: str, seconds: list[float]) -> float:
        med = statistics.median(seconds)
        rows.append({"what": what, "store": where, "State MB": round(size / 1e6),
                     "median s": round(med, 4), "best s": round(min(seconds), 4),
                     "MB/s": round(size / 1e6 / med) if med else None})
        return med

    snap = HostSnapshot()
    copy = row("host copy of the State (the limit)", "-",
               [compare({"c": lambda: snap.take(state)}, repeat=5)["c"].median])
    goals: list[Goal] = []
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        root = Path(tmp)
        local = LocalStore(root / "local")
        sid = _session(local, "sync")
        counter = iter(range(10**6))

        def local_put() -> None:
            _train_chunk(state, 0)  # new bytes: every segment is written
            local.put_checkpoint(sid, next(counter), "chunk", state)

        def save_fsync() -> None:
            _train_chunk(state, 0)
            _torch_save_fsync(root / "state.pt", state)

        t = compare({"put": local_put, "save": save_fsync}, repeat=repeat)
        put_s = row("synchronous put_checkpoint (new segments)", "local", [t["put"].median])
        save_s = row("torch.save + fsync", "local file", [t["save"].median])
        chunk_s = 2.0 * put_s  # a chunk longer than a write: the regime the overlap is for
        stall_local = row("stall per checkpoint, background writer", "local",
                          _async_stalls(local, state, chunks, chunk_s))
        row("stall per checkpoint, synchronous put", "local", [put_s])
        try:
            dcp = _dcp_stalls(root / "dcp", state, chunks, chunk_s)
            row("stall per checkpoint, torch DCP async_save", "local dir", dcp)
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            rows.append({"what": f"torch DCP async_save failed: {exc}"[:120], "store": "-"})
        local.close()
        goals += [Goal("stall / host copy, local store", round(stall_local / copy, 2), 1.5, "<="),
                  Goal("local put / (torch.save + fsync)", round(put_s / save_s, 2), 1.3, "<=")]

        (root / "nx").mkdir()
        with nx_server(root / "nx") as base:
            uri = f"{base}/bench_ckpt"
            mongo = MongoStore(uri)
            msid = _session(mongo, "sync")
            from ptutils import codec

            def mongo_put() -> None:
                _train_chunk(state, 0)
                mongo.put_checkpoint(msid, next(counter), "chunk", state)

            def raw() -> None:
                _train_chunk(state, 0)
                _raw_gridfs(uri, codec.encode(state).segments)

            t = compare({"put": mongo_put, "raw": raw}, repeat=repeat, warmup=0)
            mput = row("synchronous put_checkpoint (new segments)", "mongo (nx-27017)",
                       [t["put"].median])
            mraw = row("raw GridFSBucket uploads, same bytes", "mongo (nx-27017)",
                       [t["raw"].median])
            stall_mongo = row("stall per checkpoint, background writer", "mongo (nx-27017)",
                              _async_stalls(mongo, state, chunks, 2.0 * mput))
            mongo.close()
        goals += [Goal("stall / host copy, MongoDB stand-in", round(stall_mongo / copy, 2),
                       1.5, "<="),
                  Goal("MongoDB put speed / raw GridFS", round(mraw / mput, 2), 0.8, ">=")]

    rows.append(engine_row)
    goals.append(engine_goal)
    return report("checkpoint", rows, goals)
