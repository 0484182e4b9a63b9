"""Engine task bodies in-process on a real LocalStore: fencing, idempotence, retention."""

from __future__ import annotations

import pytest

from ptutils.engine import Engine, retained_steps
from ptutils.errors import ConfigError
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


# --- storage stays bounded ----------------------------------------------------------------
@pytest.fixture(params=["local", "mongo"])
def any_store(request, tmp_path):
    if request.param == "local":
        with LocalStore(tmp_path / "runs") as s:
            yield s
    else:
        yield request.getfixturevalue("mongo_store")


def test_save_marks_and_keeps_the_best_checkpoint_of_the_callbacks_metric(any_store):
    """BestCheckpoint names the metric (retention.best_metric unset): Save keeps that
    checkpoint past keep_last and flags it `best`, and only it."""
    from ptutils.runner import run_session

    cfg = digits_config(imports=[], total_steps=100, retention={"keep_last": 1}, callbacks=[
        {"type": "ptutils.callbacks.BestCheckpoint", "metric": "test/accuracy", "mode": "max"}])
    doc = any_store.create_session(new_session_doc("best", cfg, "h", 100))
    assert run_session(any_store, doc).status == "completed"
    evals = any_store.query_statistics(doc["_id"], name="test/accuracy", phase="eval")
    top = max(p["value"] for p in evals)
    best_steps = {p["step"] for p in evals if p["value"] == top}
    ckpts = any_store.list_checkpoints(doc["_id"])
    flagged = [c for c in ckpts if c.get("best")]
    assert len(flagged) == 1 and flagged[0]["step"] in best_steps
    assert flagged[0]["metrics"]["test/accuracy"] == top
    assert {c["step"] for c in ckpts} == {flagged[0]["step"], 100}


def test_save_collects_garbage_on_its_own_at_most_once_per_period(any_store):
    """A chunk whose session is cancelled while it runs leaves a checkpoint beyond the
    session's step; a Save of any session sweeps it (once the grace is over), and only
    as often as `gc_every` allows."""
    from ptutils.store.base import new_id

    store = any_store
    doomed, other = _session(store), store.create_session(
        new_session_doc("other", digits_config(imports=[], callbacks=[]), "h", 60))

    def cancel_midway(sid, step, loss):
        if step == 10:
            store.cas_session(sid, {}, {"status": "cancelled", "token": new_id()})

    out = Engine(store, progress=cancel_midway).train(train_task(doomed))
    assert not out.ran and "fenced out" in out.reason
    assert [c["step"] for c in store.list_checkpoints(doomed["_id"])] == [20]
    save_other = Task(SAVE, other["_id"], other["token"], step=0)

    assert Engine(store).save(save_other).ran  # runs GC, whose grace (an hour) spares it
    assert [c["step"] for c in store.list_checkpoints(doomed["_id"])] == [20]
    assert Engine(store, gc_every=0.0, gc_grace=0.0).save(save_other).ran
    assert store.list_checkpoints(doomed["_id"]) == []

    store.put_checkpoint(doomed["_id"], 40, "chunk", {"stray": 1})
    assert Engine(store, gc_every=3600.0, gc_grace=0.0).save(save_other).ran
    assert [c["step"] for c in store.list_checkpoints(doomed["_id"])] == [40], "throttled"


def test_retention_keeps_young_checkpoints_beyond_the_step_and_never_corrupt_ones():
    plan = Plan.from_config({"total_steps": 100, "chunk_steps": 10,
                             "retention": {"keep_last": 2}})
    doc = {"step": 30, "config": {"callbacks": [
        {"type": "ptutils.callbacks.BestCheckpoint", "metric": "test/loss"}]}}
    ckpts = [_ckpt(10, **{"test/loss": 0.2}), _ckpt(20, **{"test/loss": 0.5}),
             {**_ckpt(30), "corrupt": {"reason": "rot"}}, {**_ckpt(40), "created": 995.0},
             {**_ckpt(50), "created": 10.0}]
    keep = retained_steps(doc, ckpts, plan, now=1000.0, grace=60.0)
    # 10: the best (mode defaults to min); 20: last intact; 30 corrupt; 40 a chunk that
    # may be about to commit; 50 fenced out long ago
    assert keep == {(10, "chunk"), (20, "chunk"), (40, "chunk")}


def test_one_default_mode_everywhere():
    import inspect
    from pathlib import Path

    from ptutils.callbacks import DEFAULT_MODE, BestCheckpoint, EarlyStopping
    from ptutils.session import Retention

    assert Retention().best_mode == DEFAULT_MODE == "min"
    for cls in (BestCheckpoint, EarlyStopping):
        assert inspect.signature(cls.__init__).parameters["mode"].default == DEFAULT_MODE
    docs = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    assert f"| `retention.best_mode` | `{DEFAULT_MODE}` |" in docs
    assert docs.count(f"`mode={DEFAULT_MODE}`") == 2
    with pytest.raises(ConfigError, match="best_mode"):
        Plan.from_config({"retention": {"best_mode": "maximum"}})


def test_history_keeps_a_recent_window_and_resumes_exactly():
    """A resumed History holds what an uninterrupted one holds: the last `window` points."""
    from ptutils.state import History

    whole = History(window=5)
    for s in range(1, 13):
        whole.add("loss", 1.0 / s, s)
    first = History(window=5)
    for s in range(1, 8):
        first.add("loss", 1.0 / s, s)
    resumed = History(window=5)
    resumed.load_state_dict(first.state_dict())
    for s in range(8, 13):
        resumed.add("loss", 1.0 / s, s)
    assert resumed.state_dict() == whole.state_dict()
    assert whole.series("loss")[0] == [8, 9, 10, 11, 12] and whole.last("loss") == 1 / 12
    whole.truncate(10)
    assert whole.series("loss")[0] == [8, 9, 10]
