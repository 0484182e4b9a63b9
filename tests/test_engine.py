"""Engine task bodies in-process on a real LocalStore: fencing, idempotence, retention."""

from __future__ import annotations

import pytest

from ptutils.engine import Engine, retained_steps
from ptutils.plan import train_task
from ptutils.protocol import EVAL, SAVE, TRAIN, Task
from ptutils.session import Plan
from ptutils.store.base import new_session_doc
from ptutils.store.local import LocalStore
from tests.helpers import digits_config


@pytest.fixture
def store(tmp_path):
    with LocalStore(tmp_path / "runs") as s:
        yield s


def _session(store, **session):
    cfg = digits_config(imports=[], callbacks=[], **session)
    return store.create_session(new_session_doc("s", cfg, "h", cfg["session"]["total_steps"]))


def test_train_is_fenced_a_stale_or_duplicate_delivery_does_nothing(store):
    doc = _session(store)
    first = train_task(doc)
    out = Engine(store, worker="a").train(first)
    assert out.ran and out.step == 20
    assert [t.kind for t in out.successors] == [EVAL, SAVE, TRAIN]
    again = Engine(store, worker="b").train(first)  # the same message delivered twice
    assert not again.ran and "stale" in again.reason
    points = store.query_statistics(doc["_id"], name="loss")
    assert [p["step"] for p in points] == list(range(1, 21))
    forged = Task(TRAIN, doc["_id"], "not-the-token", start=20, stop=40)
    assert not Engine(store, worker="c").train(forged).ran


def test_a_lease_held_by_a_live_worker_blocks_a_second_one(store):
    doc = _session(store)
    assert store.acquire_lease(doc["_id"], doc["token"], "other", ttl=60)
    out = Engine(store, worker="me").train(train_task(doc))
    assert not out.ran and "lease" in out.reason
    assert store.get_session(doc["_id"])["step"] == 0


def test_eval_and_save_are_idempotent(store):
    doc = _session(store)
    engine = Engine(store)
    out = engine.train(train_task(doc))
    ev = next(t for t in out.successors if t.kind == EVAL)
    assert engine.eval(ev).ran
    assert not Engine(store).eval(ev).ran, "a second Eval(n) is a no-op"
    evals = store.query_statistics(doc["_id"], phase="eval")
    assert sorted(p["name"] for p in evals) == ["test/accuracy", "test/loss"]
    sv = next(t for t in out.successors if t.kind == SAVE)
    assert engine.save(sv).ran and engine.save(sv).ran
    assert [c["step"] for c in store.list_checkpoints(doc["_id"])] == [20]


def test_preemption_checkpoints_the_current_step_and_continues_to_the_boundary(store):
    doc = _session(store)
    engine = Engine(store)
    engine.stop_flag.set()
    out = engine.train(train_task(doc))
    assert not out.ran and out.successors == [train_task(doc)], "nothing done: same task back"
    engine.stop_flag.clear()

    class StopAfter:
        def __init__(self, n):
            self.n = n

        def is_set(self):
            self.n -= 1
            return self.n < 0

    engine.stop_flag = StopAfter(7)  # the chunk sees "stop" before its 8th step
    out = engine.train(train_task(store.get_session(doc["_id"])))
    assert out.ran and out.step == 7
    ckpt = store.get_checkpoint(doc["_id"])
    assert (ckpt["step"], ckpt["kind"]) == (7, "preempt")
    (nxt,) = out.successors
    assert (nxt.kind, nxt.start, nxt.stop) == (TRAIN, 7, 20), "continues to the aligned boundary"


def _ckpt(step, kind="chunk", **metrics):
    return {"step": step, "kind": kind, "metrics": {"loss": 1.0, **metrics}}


def test_retention_keeps_last_every_best_final_current_and_unevaluated():
    plan = Plan.from_config({"total_steps": 100, "chunk_steps": 10, "eval_every": 20,
                             "retention": {"keep_last": 2, "keep_every": 50,
                                           "best_metric": "acc", "best_mode": "max"}})
    ckpts = [_ckpt(10), _ckpt(20, acc=0.9), _ckpt(30), _ckpt(40, acc=0.5), _ckpt(50),
             _ckpt(60), _ckpt(60, "preempt"), _ckpt(55, "preempt"), _ckpt(70), _ckpt(80),
             _ckpt(90)]
    doc = {"step": 70}
    keep = retained_steps(doc, ckpts, plan)
    # last two (60, 70), every 50th (50), best acc (20), and 60 which is due an eval but
    # has none yet; 80 and 90 lie past the session's step (a fenced-out worker's) and go
    assert keep == {(20, "chunk"), (50, "chunk"), (60, "chunk"), (70, "chunk")}
    assert (55, "preempt") not in keep and (60, "preempt") not in keep
    final = retained_steps({"step": 100}, [_ckpt(90), _ckpt(100, "final", acc=0.1)], plan)
    assert (100, "final") in final


def test_early_stopping_acts_at_the_fixed_point_of_the_plan(store):
    """Eval(n) reaches the callbacks at the start of Train[n+K, ...): the decision point
    does not depend on when the Eval finished. Loss falls, so mode=max never improves."""
    from ptutils.runner import run_session

    cfg = digits_config(imports=[], total_steps=200, callbacks=[
        {"type": "ptutils.callbacks.EarlyStopping", "metric": "test/loss", "mode": "max",
         "patience": 1}])
    doc = store.create_session(new_session_doc("es", cfg, "h", 200))
    summary = run_session(store, doc)
    doc = store.get_session(doc["_id"])
    # evals at 20 (best) and 40 (no better: patience 1 runs out); Eval(40) is delivered
    # when Train[60, 80) starts, so the session ends at step 60
    assert summary.status == "completed" and doc["step"] == 60
    assert "early stopping" in doc["meta"]["stopped"] and "test/loss" in doc["meta"]["stopped"]


def test_loss_threshold_fails_the_session_with_hi_loss_error(store):
    from ptutils.errors import TrainingError
    from ptutils.runner import run_session

    cfg = digits_config(imports=[], callbacks=[
        {"type": "ptutils.callbacks.LossThreshold", "threshold": 0.5}])
    doc = store.create_session(new_session_doc("hi", cfg, "h", 60))
    with pytest.raises(TrainingError, match="HiLossError.*threshold 0.5"):
        run_session(store, doc)
    assert store.get_session(doc["_id"])["status"] == "failed"
