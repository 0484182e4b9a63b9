"""Reconcile's decisions on a real MongoDB store and a real redis-server broker.

No worker runs here: the sessions are put in the states a lost worker or a restarted
broker leaves behind, and the test reads what reconcile sent from the broker's queues.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from orchestrator.reconcile import Reconciler, reconcile_once
from ptutils.protocol import TRAIN, Task
from ptutils.store.base import StatPoint, new_session_doc
from ptutils.store.mongo import MongoStore
from workers.app import make_app
from workers.dispatch import Route, queue_depth, send

PLAN = {"total_steps": 60, "chunk_steps": 20, "eval_every": 20}


def session(store: MongoStore, name: str, *, status: str = "running", step: int = 0,
            lease: dict[str, Any] | None = None, queue: str = "train") -> dict[str, Any]:
    """A session document in the state a worker (or a lost one) left it in."""
    doc = new_session_doc(name, {"session": PLAN}, "h", 60, meta={"queue": queue})
    doc = store.create_session(doc)
    update: dict[str, Any] = {"status": status, "step": step, "lease": lease}
    if step:
        store.put_checkpoint(doc["_id"], step, "chunk", {"w": torch.zeros(2)})
        update["checkpoint"] = {"step": step, "kind": "chunk"}
    return store.cas_session(doc["_id"], {"token": doc["token"]}, update)


def messages(app: Any, queue: str) -> list[dict[str, Any]]:
    """Take every message out of `queue`: their task kwargs."""
    out = []
    with app.connection_for_write() as conn:
        q = conn.SimpleQueue(queue, no_ack=True, accept=["msgpack"])
        while True:
            try:
                msg = q.get(timeout=0.2)
            except q.Empty:
                break
            args, kwargs, _ = msg.decode()  # Celery's message body: (args, kwargs, embed)
            out.append(kwargs)
        q.close()
    return out


@pytest.fixture
def app(redis_url: str) -> Any:
    return make_app(redis_url)


def test_each_lost_session_is_requeued_once_by_concurrent_reconcilers(
        mongo_store, mongo_uri, app):
    now = time.time()
    dead = {"worker": "gone@host:1", "expires": now - 10}
    lost = [session(mongo_store, f"lost{i}", step=20, lease=dead) for i in range(6)]
    errors: list[BaseException] = []

    def reconcile() -> None:
        try:
            with MongoStore(mongo_uri) as store:
                reconcile_once(store, app)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reconcile) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    sent = messages(app, "train")
    assert sorted((m["session"], m["start"], m["stop"]) for m in sent) == sorted(
        (d["_id"], 20, 40) for d in lost)
    for d in lost:
        doc = mongo_store.get_session(d["_id"])
        assert doc["lease"] is None and doc["status"] == "queued" and doc["requeued_at"]
        assert doc["token"] == d["token"], "the token stays: the requeued task is valid"


def test_reconcile_rules(mongo_store, app):
    now = time.time()
    later = now + 120  # everything below has been idle for two minutes by then
    live = session(mongo_store, "live", lease={"worker": "w@h:1", "expires": later + 60})
    expired = session(mongo_store, "expired", step=20,
                      lease={"worker": "w@h:2", "expires": later - 5})
    idle = session(mongo_store, "idle", status="queued")
    waiting_in_q = session(mongo_store, "waiting", queue="big")
    send(app, Task(TRAIN, waiting_in_q["_id"], waiting_in_q["token"], 0, 20),
         Route.of(waiting_in_q))  # its message is in its queue
    # Train[40, 60) waits for Eval(20), whose message was lost
    gated = session(mongo_store, "gated", step=40)
    mongo_store.put_checkpoint(gated["_id"], 20, "chunk", {"w": torch.zeros(2)})
    # Eval(40) of this one is there: its Train[40, 60) message was lost
    evaluated = session(mongo_store, "evaluated", step=40)
    mongo_store.put_checkpoint(evaluated["_id"], 20, "chunk", {"w": torch.zeros(2)})
    mongo_store.write_statistics(evaluated["_id"], [StatPoint("eval", 20, "acc", 0.5)])
    finished = session(mongo_store, "finished", status="completed", step=60)

    def requeue(doc: dict[str, Any], task: Task) -> None:
        send(app, task, Route.of(doc))

    rec = Reconciler(mongo_store, send=requeue, depth=lambda q: queue_depth(app, q),
                     stall_after=60, eval_stall_after=0)
    done = {r.name: r for r in rec.run(now=later)}
    assert set(done) == {"expired", "idle", "gated", "evaluated", "finished"}
    assert "expired" in done["expired"].reason and "queue is empty" in done["idle"].reason
    train = {m["session"]: (m["start"], m["stop"]) for m in messages(app, "train")}
    assert train == {expired["_id"]: (20, 40), idle["_id"]: (0, 20),
                     evaluated["_id"]: (40, 60)}
    evals = {(m["session"], m["step"]) for m in messages(app, "eval")}
    assert evals == {(gated["_id"], 20), (finished["_id"], 60)}
    assert len(messages(app, "big")) == 1, "nothing added to a queue that holds the message"
    assert mongo_store.get_session(live["_id"])["lease"]["worker"] == "w@h:1"
    # A second pass a second later: the requeues made above are not repeated (each is
    # claimed with its time); "waiting" is, now that its queue is empty.
    again = Reconciler(mongo_store, send=requeue, depth=lambda q: queue_depth(app, q),
                       stall_after=60, eval_stall_after=60).run(now=later + 1)
    assert [r.name for r in again] == ["waiting"]
