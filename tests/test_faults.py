"""Faults that must not kill a run: corrupt checkpoints, store outages, skewed clocks.

Real parts only: a LocalStore folder, a MongoStore on a real nx-27017 (or
$PTUTILS_TEST_MONGO_URI), bytes flipped in segment files and in GridFS, servers killed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from ptutils.engine import Engine
from ptutils.errors import StoreUnavailable
from ptutils.plan import train_task
from ptutils.protocol import EVAL, TRAIN
from ptutils.runner import run_session
from ptutils.store.base import Store, new_session_doc
from ptutils.store.local import LocalStore
from ptutils.store.mongo import MongoStore
from tests.helpers import assert_bit_identical, corrupt_segment, digits_config, series
from tests.servers import uri_with_db

ROOT = Path(__file__).resolve().parents[1]
TOTAL = 60


def new_session(store: Store, name: str) -> dict[str, Any]:
    cfg = digits_config(imports=[], callbacks=[])
    return store.create_session(new_session_doc(name, cfg, "h", TOTAL))


def drive(engine: Engine, doc: dict[str, Any], until: int) -> None:
    """Run the session's plan (every task in order, as `ptutils run` does) up to `until`."""
    queue = deque([train_task(doc)])
    while queue:
        out = engine.run(queue.popleft())
        assert not out.failed, out.reason
        queue.extend(t for t in out.successors if t.kind != TRAIN or t.start < until)


def final_state_and_series(store: Store, sid: str) -> tuple[Any, list[Any]]:
    ckpt = store.get_checkpoint(sid, TOTAL)
    return store.load_state(ckpt), series(store.query_statistics(sid))


def own_segments(store: Store, sid: str, step: int, other: int) -> list[str]:
    """Segments of the checkpoint at `step` that the one at `other` does not share."""
    mine = store.get_checkpoint(sid, step)["segments"]
    theirs = set(store.get_checkpoint(sid, other)["segments"])
    return [h for h in mine if h not in theirs]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, list[Any]]:
    """Final State and statistics of an uninterrupted run of the shared digits config."""
    with LocalStore(tmp_path_factory.mktemp("reference")) as store:
        doc = new_session(store, "reference")
        assert run_session(store, doc).status == "completed"
        return final_state_and_series(store, doc["_id"])


@pytest.fixture(params=["local", "mongo"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "local":
        with LocalStore(tmp_path / "store") as local:
            yield local
    else:
        yield request.getfixturevalue("mongo_store")


def rollbacks(store: Store, sid: str) -> list[str]:
    return [e["message"] for e in store.get_session(sid)["events"] if e["kind"] == "rollback"]


# --- a bad checkpoint never kills a run ------------------------------------------------
def test_corrupt_newest_checkpoint_resumes_from_the_previous_one_bit_identical(
    store: Store, reference: tuple[Any, list[Any]]
) -> None:
    """Bytes flipped in the newest checkpoint (a segment file / a GridFS file): the run
    goes back to step 20, completes, and ends bit-identical to an uninterrupted run."""
    doc = new_session(store, "rot")
    sid = doc["_id"]
    drive(Engine(store, worker="first"), doc, until=40)
    assert store.get_session(sid)["step"] == 40
    bad = own_segments(store, sid, 40, 20)[0]
    corrupt_segment(store, bad)

    summary = run_session(store, store.get_session(sid))  # a new process: loads step 40

    assert summary.status == "completed" and summary.step == TOTAL
    (message,) = rollbacks(store, sid)
    assert "step 40 is corrupt" in message and bad in message and "step 20 (chunk)" in message
    state, points = final_state_and_series(store, sid)
    assert_bit_identical(reference[0], state)
    assert points == reference[1], "statistics replayed without duplicates or gaps"
    assert all(not c.get("corrupt") for c in store.list_checkpoints(sid))


def test_missing_segment_and_no_intact_checkpoint_restart_from_step_0(
    tmp_path: Path, reference: tuple[Any, list[Any]]
) -> None:
    """Every checkpoint is bad (one file deleted, one flipped): the config and seed
    rebuild step 0 exactly, and the run still ends bit-identical."""
    with LocalStore(tmp_path / "store") as store:
        doc = new_session(store, "gone")
        sid = doc["_id"]
        drive(Engine(store), doc, until=40)
        (store.segments_dir / (h := own_segments(store, sid, 40, 20)[0])[:2] / h).unlink()
        corrupt_segment(store, own_segments(store, sid, 20, 40)[0])

        assert run_session(store, store.get_session(sid)).status == "completed"

        (message,) = rollbacks(store, sid)
        assert "step 40" in message and "missing" in message and "step 0" in message
        state, points = final_state_and_series(store, sid)
        assert_bit_identical(reference[0], state)
        assert points == reference[1]


def test_an_eval_that_finds_its_checkpoint_corrupt_rolls_the_session_back(
    tmp_path: Path, reference: tuple[Any, list[Any]]
) -> None:
    """Eval(40) on another worker finds checkpoint 40 rotten: it does not fail the
    session, it sends it back to step 20 (fencing out the chunk that runs beside it)."""
    with LocalStore(tmp_path / "store") as store:
        doc = new_session(store, "eval-rot")
        sid = doc["_id"]
        trainer = Engine(store, worker="trainer")
        out = trainer.train(train_task(doc))  # Train[0, 20)
        assert trainer.eval(next(t for t in out.successors if t.kind == EVAL)).ran
        out = trainer.train(next(t for t in out.successors if t.kind == TRAIN))  # [20, 40)
        ev = next(t for t in out.successors if t.kind == EVAL)
        corrupt_segment(store, own_segments(store, sid, 40, 20)[0])

        back = Engine(store, worker="evaluator").eval(ev)

        assert not back.failed and back.step == 20
        assert [(t.kind, t.start, t.stop) for t in back.successors] == [(TRAIN, 20, 40)]
        after = store.get_session(sid)
        assert (after["step"], after["status"], after["error"]) == (20, "running", None)
        stale = trainer.train(next(t for t in out.successors if t.kind == TRAIN))
        assert not stale.ran and "stale" in stale.reason, "the chunk beside it is fenced out"
        assert run_session(store, after).status == "completed"
        state, points = final_state_and_series(store, sid)
        assert_bit_identical(reference[0], state)
        assert points == reference[1]


def test_export_of_a_corrupt_checkpoint_names_it_and_the_intact_ones(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with LocalStore(runs) as store:
        doc = new_session(store, "exp")
        drive(Engine(store), doc, until=40)
        bad = own_segments(store, doc["_id"], 40, 20)[0]
        corrupt_segment(store, bad)
    out = tmp_path / "w.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "export", "exp", "-o", str(out),
         "--store", str(runs)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "step 40 (chunk) is corrupt" in proc.stderr and bad in proc.stderr
    assert "Intact checkpoints: step 20 (chunk)" in proc.stderr and "--step" in proc.stderr
    assert not out.exists()


# --- transient is not fatal ------------------------------------------------------------
class StopsDuringEval(MongoStore):
    """A MongoStore whose server is killed the moment an Eval starts loading its State."""

    server: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.killed = threading.Event()

    def load_state(self, checkpoint: dict[str, Any]) -> Any:
        if self.server is not None:
            self.server.kill()
            self.server = None
            self.killed.set()
        return super().load_state(checkpoint)


def test_eval_retries_a_store_outage_and_never_fails_the_session(mongo_process: Any) -> None:
    server = mongo_process()
    uri = uri_with_db(server.uri, "evalfault")
    with MongoStore(uri, retry_seconds=30.0) as store:
        doc = new_session(store, "ev")
        out = Engine(store).train(train_task(doc))
        ev = next(t for t in out.successors if t.kind == EVAL)

    # Down for longer than the retry budget: the Eval raises for redelivery.
    short = StopsDuringEval(uri, retry_seconds=1.5)
    short.server = server
    with pytest.raises(StoreUnavailable):
        Engine(short).eval(ev)
    short.close()
    server.start()
    with MongoStore(uri) as store:
        doc = store.get_session(doc["_id"])
        assert (doc["status"], doc["error"]) == ("running", None), "not a failed session"
        assert store.query_statistics(doc["_id"], phase="eval") == []

    # The redelivered Eval: the server goes down again and comes back within the budget.
    patient = StopsDuringEval(uri, retry_seconds=60.0)
    patient.server = server
    outcome: list[Any] = []
    evaluator = threading.Thread(target=lambda: outcome.append(Engine(patient).eval(ev)))
    evaluator.start()
    try:
        assert patient.killed.wait(60)
        time.sleep(2.0)  # down for a while, within the retry budget
        server.start()  # from this thread: the server dies with the thread that started it
    finally:
        evaluator.join(120)
        patient.close()
    assert outcome and outcome[0].ran
    with MongoStore(uri) as store:
        names = sorted(p["name"] for p in store.query_statistics(doc["_id"], phase="eval"))
        assert names == ["test/accuracy", "test/loss"]
        assert store.get_session(doc["_id"])["status"] == "running"


def test_a_worker_with_a_skewed_clock_cannot_steal_a_live_lease(mongo_process: Any) -> None:
    """Leases are judged by the server's clock: an hour-fast worker still sees the lease
    as live; an hour-slow one renews it to the server's time, not its own."""
    server = mongo_process()
    uri = uri_with_db(server.uri, "clock")
    honest = MongoStore(uri, retry_seconds=5.0)
    fast = MongoStore(uri, retry_seconds=5.0, clock_skew=3600.0)
    slow = MongoStore(uri, retry_seconds=5.0, clock_skew=-3600.0)
    try:
        assert abs(fast.now() - honest.now()) < 1.0 and abs(slow.now() - time.time()) < 1.0
        doc = new_session(honest, "lease")
        sid, token = doc["_id"], doc["token"]
        assert honest.acquire_lease(sid, token, "honest", ttl=60.0) is not None
        assert fast.acquire_lease(sid, token, "fast", ttl=60.0) is None
        out = Engine(fast, worker="fast").train(train_task(doc))
        assert not out.ran and "lease held" in out.reason
        # What the fast worker's own clock would have decided: the lease looks expired.
        assert fast.acquire_lease(sid, token, "fast", ttl=60.0, now=time.time() + 3600) is not None

        honest.release_lease(sid, "fast")
        assert slow.acquire_lease(sid, token, "slow", ttl=60.0) is not None
        assert slow.renew_lease(sid, "slow", ttl=60.0)
        expires = honest.get_session(sid)["lease"]["expires"]
        assert abs(expires - (honest.now() + 60.0)) < 2.0
        assert honest.acquire_lease(sid, token, "honest", ttl=60.0) is None

        server.kill()  # the offset is cached: telling the time needs no round trip
        started = time.monotonic()
        fast.now()
        assert time.monotonic() - started < 0.1
    finally:
        for store in (honest, fast, slow):
            store.close()
