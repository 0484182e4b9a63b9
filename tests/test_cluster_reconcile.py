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
from ptutils.protocol import EVAL, TRAIN, Task
from ptutils.reconcile import EVAL_CLAIM, EvalClaim
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


def reconciler(store: MongoStore, app: Any, **options: Any) -> Reconciler:
    def requeue(doc: dict[str, Any], task: Task) -> None:
        send(app, task, Route.of(doc))

    return Reconciler(store, send=requeue, depth=lambda q: queue_depth(app, q), **options)


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
    # Train[40, 60) waits for Eval(20), whose message was lost (and Eval(40)'s too)
    gated = session(mongo_store, "gated", step=40)
    mongo_store.put_checkpoint(gated["_id"], 20, "chunk", {"w": torch.zeros(2)})
    # Eval(20) of this one is there: its Train[40, 60) message was lost
    evaluated = session(mongo_store, "evaluated", step=40)
    mongo_store.put_checkpoint(evaluated["_id"], 20, "chunk", {"w": torch.zeros(2)})
    mongo_store.write_statistics(evaluated["_id"], [StatPoint("eval", 20, "acc", 0.5)])
    # Eval(20) came in 5 s ago: its Train (waiting, re-checking every second) is alive
    just_evaluated = session(mongo_store, "just-evaluated", step=40)
    mongo_store.put_checkpoint(just_evaluated["_id"], 20, "chunk", {"w": torch.zeros(2)})
    mongo_store.write_statistics(just_evaluated["_id"],
                                 [StatPoint("eval", 20, "acc", 0.5, time=later - 5),
                                  StatPoint("eval", 40, "acc", 0.6)])
    # Eval(40) runs (claimed) beside a live Train[40, 60): nothing to do
    claimed = session(mongo_store, "claimed", step=40,
                      lease={"worker": "w@h:3", "expires": later + 60})
    mongo_store.write_statistics(claimed["_id"], [StatPoint("eval", 20, "acc", 0.5)])
    mongo_store.update_checkpoint(claimed["_id"], 40, "chunk",
                                  {EVAL_CLAIM: {"worker": "e@h:1", "expires": later + 30}})
    # ... and here its claim expired (the eval worker died): Eval(40) is sent again
    dead_eval = session(mongo_store, "dead-eval", step=40,
                        lease={"worker": "w@h:4", "expires": later + 60})
    mongo_store.write_statistics(dead_eval["_id"], [StatPoint("eval", 20, "acc", 0.5)])
    mongo_store.update_checkpoint(dead_eval["_id"], 40, "chunk",
                                  {EVAL_CLAIM: {"worker": "e@h:2", "expires": later - 5}})
    finished = session(mongo_store, "finished", status="completed", step=60)

    done = {r.name: r for r in reconciler(mongo_store, app).run(now=later)}
    assert set(done) == {"expired", "idle", "gated", "evaluated", "dead-eval", "finished"}
    assert "expired" in done["expired"].reason and "queue is empty" in done["idle"].reason
    assert "Eval(20, 40) has no result" in done["gated"].reason
    train = {m["session"]: (m["start"], m["stop"]) for m in messages(app, "train")}
    assert train == {expired["_id"]: (20, 40), idle["_id"]: (0, 20),
                     evaluated["_id"]: (40, 60)}
    evals = sorted((m["session"], m["step"]) for m in messages(app, "eval"))
    assert evals == sorted([(expired["_id"], 20), (gated["_id"], 20), (gated["_id"], 40),
                            (evaluated["_id"], 40), (dead_eval["_id"], 40),
                            (finished["_id"], 60)])
    assert len(messages(app, "big")) == 1, "nothing added to a queue that holds the message"
    assert mongo_store.get_session(live["_id"])["lease"]["worker"] == "w@h:1"
    assert mongo_store.get_session(dead_eval["_id"])["lease"]["worker"] == "w@h:4"
    # A second pass a second later: the requeues made above are not repeated (each is
    # claimed with its time); "waiting" is, now that its queue is empty.
    again = reconciler(mongo_store, app).run(now=later + 1)
    assert [r.name for r in again] == ["waiting"]


def test_nothing_is_requeued_while_its_message_waits_in_the_queue(mongo_store, app):
    now = time.time()
    doc = session(mongo_store, "queued-eval", step=20, lease={"worker": "w@h:1",
                                                              "expires": now + 300})
    send(app, Task(EVAL, doc["_id"], doc["token"], step=20), Route.of(doc))
    assert reconciler(mongo_store, app).run(now=now + 120) == []
    assert len(messages(app, "eval")) == 1


def test_leases_are_judged_by_the_store_clock(mongo_uri, app):
    class StoreAhead(MongoStore):
        """The store's clock runs 90 s ahead of this machine's."""

        def now(self) -> float:
            return super().now() + 90

    with StoreAhead(mongo_uri) as store:
        doc = session(store, "s", step=20, lease={"worker": "w@h:1",
                                                  "expires": time.time() + 60})
        (requeue,) = reconciler(store, app).run()
        assert requeue.session == doc["_id"] and "expired" in requeue.reason
        assert [(m["start"], m["stop"]) for m in messages(app, "train")] == [(20, 40)]


def test_an_eval_claim_is_held_while_the_eval_runs_and_renewed(mongo_store, app):
    doc = session(mongo_store, "s", step=20, lease={"worker": "w@h:1",
                                                    "expires": time.time() + 600})

    def claim() -> dict[str, Any] | None:
        (ckpt,) = mongo_store.list_checkpoints(doc["_id"])
        return ckpt.get(EVAL_CLAIM)

    rec = reconciler(mongo_store, app, eval_stall_after=0)
    with EvalClaim(mongo_store, doc["_id"], 20, "e@h:1", ttl=0.6):
        first = claim()
        assert first["worker"] == "e@h:1"
        assert rec.run() == [], "a claimed Eval is not sent again"
        deadline = time.monotonic() + 5
        while claim()["expires"] == first["expires"]:
            assert time.monotonic() < deadline, "the claim was not renewed"
            time.sleep(0.05)
        time.sleep(0.7)  # longer than the TTL: only renewals keep it alive
        assert rec.run() == []
    assert claim() is None
    (requeue,) = rec.run()
    assert requeue.tasks == [Task(EVAL, doc["_id"], doc["token"], step=20)]


def test_a_loop_follows_the_sessions_it_saw_finish_between_full_passes(mongo_store, app):
    now = time.time()
    doc = session(mongo_store, "s", step=40, lease={"worker": "w@h:1", "expires": now + 60})
    mongo_store.write_statistics(doc["_id"], [StatPoint("eval", 20, "acc", 0.5),
                                              StatPoint("eval", 40, "acc", 0.6)])
    rec = reconciler(mongo_store, app, completed_within=3600)
    assert rec.run(now=now, completed=True) == []  # sees it running
    # Train[40, 60) commits; the message of its final Eval(60) is lost
    mongo_store.put_checkpoint(doc["_id"], 60, "final", {"w": torch.zeros(2)})
    mongo_store.cas_session(doc["_id"], {"token": doc["token"]},
                            {"step": 60, "status": "completed", "lease": None})
    # a light pass (completed sessions not listed) still finds it, from what it saw
    (requeue,) = rec.run(now=now + 60, completed=False)
    assert requeue.name == "s" and [t.step for t in requeue.tasks] == [60]
    assert [(m["session"], m["step"]) for m in messages(app, "eval")] == [(doc["_id"], 60)]
    # a fresh reconciler saw nothing: only a full pass finds the session
    assert reconciler(mongo_store, app).run(now=now + 120, completed=False) == []
