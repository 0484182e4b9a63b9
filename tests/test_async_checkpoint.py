"""Checkpoints written in the background while the next chunk trains (ptutils.chunks).

Real parts only: `ptutils run` processes SIGKILLed at a step, a real nx-27017 frozen
(SIGSTOP) or killed under a write in flight, LocalStore folders. Each run is compared
bit for bit with an uninterrupted one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any

import torch
import yaml

from ptutils.engine import Engine
from ptutils.plan import train_task
from ptutils.protocol import TRAIN
from ptutils.store.base import Store, new_session_doc
from ptutils.store.local import LocalStore
from ptutils.store.mongo import MongoStore
from tests.helpers import assert_bit_identical, digits_config, series
from tests.servers import uri_with_db

ROOT = Path(__file__).resolve().parents[1]
KILLER = str(ROOT / "tests" / "killer.py")
TOTAL = 60


def sync_reference(tmp_path: Path, cfg: dict[str, Any]) -> tuple[Any, list[Any]]:
    """Final State and statistics of the session run with synchronous checkpoints."""
    with LocalStore(tmp_path / "reference") as store:
        doc = store.create_session(new_session_doc("ref", cfg, "h", TOTAL))
        drive(Engine(store), doc)
        return final(store, doc["_id"])


def drive(engine: Engine, doc: dict[str, Any], queue: deque[Any] | None = None) -> None:
    queue = queue if queue is not None else deque([train_task(doc)])
    while queue:
        out = engine.run(queue.popleft())
        assert not out.failed, out.reason
        queue.extend(out.successors)


def final(store: Store, sid: str) -> tuple[Any, list[Any]]:
    return store.load_state(store.get_checkpoint(sid, TOTAL)), series(store.query_statistics(sid))


def ptutils(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_sigkill_while_a_background_write_is_in_flight_resumes_bit_identical(
    tmp_path: Path, mongo_process: Any
) -> None:
    """The store's server is frozen at step 15, so the write of step 20 hangs in the
    background while chunk [20, 40) trains; the run is SIGKILLed at step 25."""
    server = mongo_process()
    cfg = digits_config(imports=[KILLER], callbacks=[
        {"type": "killer.SignalAt", "step": 15, "pid": server.proc.pid, "signal": "SIGSTOP",
         "marker": str(tmp_path / "frozen")},
        {"type": "killer.KillAt", "step": 25, "marker": str(tmp_path / "killed")}])
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    uri = uri_with_db(server.uri, "killed")
    try:
        killed = ptutils("run", str(path), "--store", uri, "-q")
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert killed.returncode == -9, killed.stderr
    with MongoStore(uri) as store:
        doc = store.get_session("small")
        # The frozen server answers the requests sent before the kill once it runs again
        # (statistics, segments); the commit never came: the step is still 0.
        assert (doc["step"], doc["checkpoint"]) == (0, None)
    resumed = ptutils("run", str(path), "--store", uri, "-q", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    ref = ptutils("run", str(path), "--store", str(tmp_path / "ref"), "-q")  # no kill now
    assert ref.returncode == 0, ref.stderr
    with LocalStore(tmp_path / "ref") as store:
        ref_state, ref_series = final(store, store.get_session("small")["_id"])
    with MongoStore(uri) as store:
        state, got = final(store, store.get_session("small")["_id"])
    assert_bit_identical(state, ref_state)
    assert got == ref_series


class DiesAtPut(MongoStore):
    """A MongoStore whose server is killed when the checkpoint of `step` starts uploading."""

    server: Any = None
    step = -1

    def put_checkpoint(self, session_id: str, step: int, kind: str, state: Any,
                       **kw: Any) -> dict[str, Any]:
        if step == self.step and self.server is not None:
            self.server.kill()
            self.server = None
        return super().put_checkpoint(session_id, step, kind, state, **kw)


def test_a_store_that_dies_mid_upload_discards_the_next_chunk_and_resumes_bit_identical(
    tmp_path: Path, mongo_process: Any
) -> None:
    server = mongo_process()
    uri = uri_with_db(server.uri, "dies")
    cfg = digits_config(imports=[], callbacks=[], eval_every=0)
    steps: list[int] = []
    store = DiesAtPut(uri, retry_seconds=1.5)
    store.server, store.step = server, 40
    doc = store.create_session(new_session_doc("dies", cfg, "h", TOTAL))
    engine = Engine(store, chunks_per_task=10,
                    progress=lambda sid, step, loss: steps.append(step))
    out = engine.run(train_task(doc))
    store.close()
    # The write of step 40 failed in the background while [40, 60) trained: that chunk
    # is dropped, and the task hands back the continuation from the verified step 20.
    assert "checkpoint at step 40 failed" in out.reason and "[40, 60)" in out.reason
    assert out.ran and out.step == 20
    trains = [t for t in out.successors if t.kind == TRAIN]
    assert [(t.start, t.stop) for t in trains] == [(20, 40)]
    assert steps[-1] == 60, "chunk [40, 60) had trained when the failure was seen"

    server.start()
    with MongoStore(uri) as store:
        doc = store.get_session(doc["_id"])
        assert doc["step"] == 20  # (its lease could not be released: the same worker retakes it)
        assert [c["step"] for c in store.list_checkpoints(doc["_id"])] == [20]
        engine = Engine(store, chunks_per_task=10)
        drive(engine, doc, deque(out.successors))
        state, got = final(store, doc["_id"])
    ref_state, ref_series = sync_reference(tmp_path, cfg)
    assert_bit_identical(state, ref_state)
    assert got == ref_series


def test_chunks_overlap_their_writes_and_end_as_the_synchronous_run(tmp_path: Path) -> None:
    """One Train task runs every chunk (no Eval due before the end) and commits each
    step once its checkpoint is stored; same State and statistics as one chunk a task."""
    cfg = digits_config(imports=[], callbacks=[], eval_every=0)
    with LocalStore(tmp_path / "async") as store:
        doc = store.create_session(new_session_doc("a", cfg, "h", TOTAL))
        engine = Engine(store, chunks_per_task=10)
        out = engine.run(train_task(doc))
        assert out.ran and out.step == TOTAL
        assert [t.kind for t in out.successors] == ["save", "save", "eval", "save"]
        assert store.get_session(doc["_id"])["status"] == "completed"
        assert engine.snapshot.nbytes > 0 and not engine.writer.pending
        drive(engine, doc, deque(out.successors))
        state, got = final(store, doc["_id"])
    ref_state, ref_series = sync_reference(tmp_path, cfg)
    assert_bit_identical(state, ref_state)
    assert got == ref_series


def test_the_host_snapshot_is_a_private_copy_reused_from_one_checkpoint_to_the_next() -> None:
    from ptutils.ckpt_writer import HostSnapshot

    net = torch.nn.Linear(4, 3)
    snap = HostSnapshot()
    first = snap.take({"net": net.state_dict(), "step": 3, "rng": [1, (2, 3)]})
    with torch.no_grad():
        net.weight.add_(1.0)
    assert not torch.equal(first["net"]["weight"], net.weight)
    second = snap.take({"net": net.state_dict(), "step": 4, "rng": [1, (2, 3)]})
    assert second["net"]["weight"].data_ptr() == first["net"]["weight"].data_ptr()
    assert torch.equal(second["net"]["weight"], net.weight) and second["rng"] == [1, (2, 3)]
    assert snap.nbytes == (4 * 3 + 3) * 4


def test_a_local_put_makes_its_segments_durable_with_a_bounded_number_of_syncs(
    tmp_path: Path,
) -> None:
    """200 segments, 2 syncs (syncfs on Linux): not one per file and folder."""
    with LocalStore(tmp_path / "store") as store:
        doc = store.create_session(new_session_doc("s", {"session": {}}, "h", 10))
        state = {f"t{i}": torch.full((4096,), float(i)) for i in range(200)}
        before = store.segment_syncs
        ckpt = store.put_checkpoint(doc["_id"], 1, "chunk", state)
        used = store.segment_syncs - before
        assert len(ckpt["segments"]) == 200
        if sys.platform == "linux":
            assert used == 2, used
        else:
            assert used <= 200 + 256 + 1
        again = store.put_checkpoint(doc["_id"], 2, "chunk", state)  # all segments known
        assert again["bytes_written"] == 0 and store.segment_syncs - before == used
        assert_bit_identical(store.load_state(store.get_checkpoint(doc["_id"], 1)), state)
        leftovers = [p for p in (store.segments_dir).rglob("*.tmp")]
        assert leftovers == []


def test_sigterm_waits_for_the_write_in_flight_before_the_preempt_checkpoint(
    tmp_path: Path,
) -> None:
    """A stop after step 30 (SIGTERM sets this flag): the write of step 20, in flight
    while [20, 40) trained, is committed first; then the preempt checkpoint at 30."""
    cfg = digits_config(imports=[], callbacks=[], eval_every=0)
    stop = threading.Event()
    with LocalStore(tmp_path / "store") as store:
        doc = store.create_session(new_session_doc("p", cfg, "h", TOTAL))
        engine = Engine(store, chunks_per_task=10, stop_flag=stop,
                        progress=lambda sid, step, loss: step == 30 and stop.set())
        out = engine.run(train_task(doc))
        assert out.ran and out.step == 30
        kinds = [(c["step"], c["kind"]) for c in store.list_checkpoints(doc["_id"])]
        assert kinds == [(20, "chunk"), (30, "preempt")]
        now = store.get_session(doc["_id"])
        assert now["step"] == 30 and now["lease"] is None
        assert [(t.start, t.stop) for t in out.successors if t.kind == TRAIN] == [(30, 40)]
        engine = Engine(store)  # a new process: nothing warm
        drive(engine, doc, deque(out.successors))
        state, got = final(store, doc["_id"])
    ref_state, ref_series = sync_reference(tmp_path, cfg)
    assert_bit_identical(state, ref_state)
    assert got == ref_series
