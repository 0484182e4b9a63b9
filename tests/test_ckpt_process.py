"""Checkpoint writes in the writer process (ptutils.ckpt_process): real child processes,
real LocalStore folders, shared memory; every run compared bit for bit with one whose
writes ran in the training process."""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ptutils.ckpt_process import SharedSnapshot, WriterProcess, _Arenas, _state, writer_process
from ptutils.engine import Engine
from ptutils.errors import SessionNotFound
from ptutils.plan import train_task
from ptutils.protocol import TRAIN
from ptutils.store.base import new_session_doc
from ptutils.store.local import LocalStore
from tests.helpers import assert_bit_identical, digits_config, series

TOTAL = 60


def ready_process() -> WriterProcess:
    proc = writer_process()
    assert proc is not None, "the writer process is Linux-only; this suite runs on Linux"
    deadline = time.monotonic() + 60
    while not proc.ready():
        assert proc.alive and time.monotonic() < deadline, "the writer process never started"
        time.sleep(0.05)
    return proc


def run_all(store: LocalStore, cfg: dict[str, Any], name: str) -> tuple[Any, list[Any], Engine]:
    doc = store.create_session(new_session_doc(name, cfg, "h", TOTAL))
    engine = Engine(store, chunks_per_task=10)
    queue = deque([train_task(doc)])
    while queue:
        out = engine.run(queue.popleft())
        assert not out.failed, out.reason
        queue.extend(out.successors)
    state = store.load_state(store.get_checkpoint(doc["_id"], TOTAL))
    return state, series(store.query_statistics(doc["_id"])), engine


def test_writes_in_the_writer_process_end_as_writes_in_the_training_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = digits_config(imports=[], callbacks=[], eval_every=0)
    ready_process()
    with LocalStore(tmp_path / "process") as store:
        state, got, engine = run_all(store, cfg, "p")
        assert engine.writer.process_writes == 2  # steps 20 and 40; 60 ends the task
    monkeypatch.setenv("PTUTILS_WRITER_PROCESS", "0")
    with LocalStore(tmp_path / "thread") as store:
        ref_state, ref_series, engine = run_all(store, cfg, "t")
        assert engine.writer.process_writes == 0
    assert_bit_identical(state, ref_state)
    assert got == ref_series


def test_a_writer_process_killed_under_a_write_discards_the_next_chunk_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 20 is written by the writer process; once it is answered, the process is
    stopped (SIGSTOP), so the write of step 40 is in flight in it while [40, 60) trains;
    it is SIGKILLed at step 50. The write fails as a store error: [40, 60) is discarded,
    the task hands back the continuation from step 20, and the run ends bit-identical to
    one whose writes ran in the training process."""
    cfg = digits_config(imports=[], callbacks=[], eval_every=0)
    proc = ready_process()
    pid, stopped = proc._proc.pid, []
    engine: Engine | None = None

    def progress(_sid: str, step: int, _loss: float) -> None:
        assert engine is not None
        if 20 < step < 40 and not stopped:
            while engine.writer.busy:  # the write of step 20 is answered first
                time.sleep(0.01)
            os.kill(pid, signal.SIGSTOP)
            stopped.append(step)
        elif step == 50:
            os.kill(pid, signal.SIGKILL)

    with LocalStore(tmp_path / "killed") as store:
        doc = store.create_session(new_session_doc("k", cfg, "h", TOTAL))
        engine = Engine(store, chunks_per_task=10, progress=progress)
        out = engine.run(train_task(doc))
        assert engine.writer.process_writes == 2 and stopped
        assert "writer process exited" in out.reason and "[40, 60)" in out.reason, out.reason
        assert out.ran and out.step == 20
        assert [(t.start, t.stop) for t in out.successors if t.kind == TRAIN] == [(20, 40)]
        assert store.get_session(doc["_id"])["step"] == 20
        assert [c["step"] for c in store.list_checkpoints(doc["_id"])] == [20]
        assert writer_process() is not proc  # the next write starts a new writer process
        queue = deque(out.successors)
        engine = Engine(store, chunks_per_task=10)
        while queue:
            done = engine.run(queue.popleft())
            assert not done.failed, done.reason
            queue.extend(done.successors)
        state = store.load_state(store.get_checkpoint(doc["_id"], TOTAL))
        got = series(store.query_statistics(doc["_id"]))
    monkeypatch.setenv("PTUTILS_WRITER_PROCESS", "0")
    with LocalStore(tmp_path / "reference") as store:
        ref_state, ref_series, _ = run_all(store, cfg, "r")
    assert_bit_identical(state, ref_state)
    assert got == ref_series


def test_the_shared_snapshot_is_read_back_whole_through_the_arena() -> None:
    """What the writer process rebuilds from the arena and the description is the State
    that was taken: tensors by offset in shared memory, numpy arrays and odd tensors by
    value; the arena is reused while the layout holds and replaced when it changes."""
    net = torch.nn.Linear(5, 3)
    state = {"net": net.state_dict(), "step": 7, "np": np.arange(4, dtype=np.int16),
             "view": torch.arange(12.0).reshape(3, 4).t(), "empty": torch.zeros(0),
             "rng": (1, [2.5, None])}
    snap = SharedSnapshot()
    taken = snap.take(state)
    arena = snap.arena
    assert arena is not None and snap.nbytes == (15 + 3 + 12) * 4
    tree, table = snap.describe(taken)
    kinds = [row[0] for row in table]
    assert kinds.count("a") == 3 and kinds.count("b") == 2  # the numpy array, the empty one
    rebuilt = _state({"tree": tree, "arrays": table, "arena": arena.describe()}, _Arenas())
    assert_bit_identical(rebuilt, {**state, "view": state["view"].contiguous()})
    with torch.no_grad():
        net.weight.add_(1.0)
    again = snap.take({**state, "net": net.state_dict()})
    assert snap.arena is arena and torch.equal(again["net"]["weight"], net.weight)
    snap.take({**state, "extra": torch.ones(2)})
    assert snap.arena is not arena and snap.nbytes == (15 + 3 + 12 + 2) * 4
    smaller = snap.take({"net": net.state_dict()})
    assert snap.nbytes == (15 + 3) * 4 and snap.arena.nbytes < arena.nbytes
    low = snap.arena.base
    for buf in snap._buffers.values():  # every host buffer is a view of the arena
        assert low <= buf.data_ptr() < low + snap.arena.nbytes
    assert torch.equal(smaller["net"]["bias"], net.bias)


def test_a_failed_write_in_the_writer_process_raises_its_own_error_here(tmp_path: Path) -> None:
    from ptutils.ckpt_writer import CheckpointWriter

    ready_process()
    with LocalStore(tmp_path / "s") as store:
        snap = SharedSnapshot()
        writer = CheckpointWriter(store.url)
        request = {"session": "nope", "step": 1, "kind": "chunk", "points": [],
                   "metrics": {}, "expect": {}, "update": {}}
        writer.submit_write(store, request, snap.take({"w": torch.ones(3)}), snap)
        assert writer.process_writes == 1
        with pytest.raises(SessionNotFound, match="nope"):
            writer.wait()


def test_a_run_of_short_chunks_never_starts_the_writer_process(tmp_path: Path) -> None:
    """Starting the process costs a second or two of CPU: chunks of a few milliseconds
    are written in the thread, and no process is started for them."""
    from ptutils import ckpt_process

    with ckpt_process._PROCESS_LOCK:
        for proc in ckpt_process._PROCESS:
            proc.close()
        ckpt_process._PROCESS.clear()
    cfg = digits_config(imports=[], callbacks=[], eval_every=0)
    with LocalStore(tmp_path / "short") as store:
        _, _, engine = run_all(store, cfg, "s")
    assert engine.writer.process_writes == 0
    assert writer_process(start=False) is None


def test_a_writer_process_that_cannot_map_the_snapshot_leaves_the_write_to_this_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where /proc/<pid>/fd cannot be opened, the write is not lost: it runs here when
    its result is asked for, and later writes stay in this process."""
    from ptutils import ckpt_process
    from ptutils.ckpt_writer import CheckpointWriter

    ready_process()
    real = ckpt_process.Arena.describe
    monkeypatch.setattr(ckpt_process.Arena, "describe",
                        lambda self: {**real(self), "fd": 10**6})  # no such descriptor
    try:
        with LocalStore(tmp_path / "s") as store:
            sid = store.create_session(new_session_doc("u", {"session": {}}, "h", 9))["_id"]
            snap, writer = SharedSnapshot(), CheckpointWriter(store.url)
            request = {"session": sid, "step": 3, "kind": "chunk",
                       "points": [["train", 3, "loss", 0.5, 1.0]], "metrics": {},
                       "expect": {"step": 0}, "update": {"step": 3}}
            writer.submit_write(store, request, snap.take({"w": torch.arange(4.0)}), snap)
            assert writer.process_writes == 1
            assert writer.wait()["step"] == 3
            assert torch.equal(store.load_state(store.get_checkpoint(sid, 3))["w"],
                               torch.arange(4.0))
            assert [p["value"] for p in store.query_statistics(sid)] == [0.5]
            assert not ckpt_process.enabled() and writer_process() is None
    finally:
        ckpt_process._DISABLED.clear()


def test_a_forked_child_starts_its_own_writer_process() -> None:
    """A WriterProcess inherited through fork is not used: its pipes are the parent's."""
    proc = ready_process()
    proc.owner = -1  # as a forked child sees it
    try:
        assert writer_process() is not proc
    finally:
        proc.close()
