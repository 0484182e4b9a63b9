"""The chunks of one Train task, each chunk's checkpoint written while the next trains.

How this fits the fencing of DESIGN §4 and the Celery task boundaries:

- A Train message is fenced on (step, token). The continuation of a chunk can only be
  enqueued once its checkpoint is verified and committed (the commit issues the new
  token), so overlapping a write with training must happen inside one Train task. A
  task may therefore run up to `Engine.chunks_per_task` chunks: after chunk [s, n) the
  State is copied to host memory, a background job (ptutils.ckpt_writer) writes the
  statistics, stores and verifies the checkpoint at n and only then commits s -> n
  (compare-and-set on step, token and lease; the lease stays with this worker); the
  next chunk [n, m) trains meanwhile. Its own write starts once that commit is in.
- The Eval/Save tasks of an intermediate commit are handed to `Engine.on_commit` (the
  worker enqueues them at once) or returned with the task's successors. The task's last
  chunk (a preemption, the end of the session, `chunks_per_task` reached, or an Eval
  result the next chunk needs that is not in the store yet) is written synchronously,
  and the continuation message is the one issued by its commit: an uninterrupted run
  and one cut anywhere run the same chunks from the same States.
- A failed write discards the chunk trained after it: the session is still at the last
  committed step, and the task ends with the continuation from there (a store error
  before any commit of this task is raised instead, so the message is redelivered as
  before). A SIGKILL at any instant leaves the session at its last committed step.
- SIGTERM: the chunk stops at the next step, waits for the write in flight (and its
  commit), then writes the preempt checkpoint: the grace period covers both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ptutils.ckpt_writer import write_checkpoint
from ptutils.errors import StoreError
from ptutils.plan import next_tasks, plan_of
from ptutils.protocol import TRAIN, Task
from ptutils.store.base import CheckpointKind

if TYPE_CHECKING:
    from ptutils.engine import Engine, Outcome
    from ptutils.session import Session
    from ptutils.state import Statistic

__all__ = ["Live", "run_chunks", "settle"]


@dataclass
class Live:
    """Where a Train task stands: the session document of its last commit and the task
    that continues from it (the task itself until a chunk commits)."""

    doc: dict[str, Any]
    task: Task
    origin: Task = field(init=False)
    committed: bool = False
    fenced: bool = False
    successors: list[Task] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.origin = self.task


def run_chunks(
    engine: Engine, session: Session, live: Live, hb: Any, stop_flag: Any, progress: Any
) -> Outcome:
    """Train from `live.task.start` chunk after chunk (see the module's docstring)."""
    from ptutils.engine import Outcome

    plan = plan_of(live.doc)
    start, stop, chunks = live.task.start, live.task.stop, 0
    while True:
        began = time.monotonic()
        reached, stats = session.trainer.run(
            start, stop, callbacks=session.callbacks, history=session.history,
            stop_flag=stop_flag, progress=progress,
        )  # fmt: skip
        trained = time.monotonic() - began
        chunks += 1
        if hb.lost:
            engine.writer.drain()
            engine._warm = None
            return Outcome(live.origin, False, "lease lost during the chunk; work discarded")
        session.step = reached
        failed = settle(engine, live)
        if failed is not None or live.fenced:
            return _discarded(engine, live, failed, start, reached)
        if reached == start:
            engine._release(live.task)
            engine._remember(live.doc, session)
            return Outcome(live.origin, live.committed, "stopped before the first step",
                           step=reached, successors=[*live.successors, live.task])
        session.callbacks.fire("on_chunk_end", reached)
        kind = plan.checkpoint_kind(reached, stop)
        state = session.state_dict()
        more = chunks < engine.chunks_per_task and kind == CheckpointKind.CHUNK
        more = more and not stop_flag.is_set()
        if more:
            state = engine.snapshot.take(state)  # the host copy: training may go on
            more = _evals_delivered(engine, session, live, reached)
        request = _request(engine, live.doc, Task(TRAIN, live.task.session, live.task.token,
                           start, stop), reached, kind, stats,
                           session.history.last("loss"), more)  # fmt: skip
        if more:
            engine.writer.submit_write(engine.store, request, state, engine.snapshot, trained)
            start, stop = reached, plan.boundary_after(reached)
            continue
        new = write_checkpoint(engine.store, request, state)
        if new is None:
            engine._warm = None
            return Outcome(live.origin, live.committed,
                           "fenced out at commit (another worker took over)")
        engine._remember(new, session)
        return Outcome(live.origin, True, "ok", step=reached,
                       successors=[*live.successors, *next_tasks(new)])


def _evals_delivered(engine: Engine, session: Session, live: Live, reached: int) -> bool:
    """Deliver the Eval results the chunk from `reached` needs (as a Train task starting
    there would); False if one is missing or early stopping fired: the task ends here."""
    from ptutils.engine import deliver_evals

    if session.callbacks.stop_reason:
        return False
    missing = deliver_evals(engine.store, live.doc, session, reached)
    return missing is None and not session.callbacks.stop_reason


def _request(
    engine: Engine, doc: dict[str, Any], task: Task, reached: int, kind: CheckpointKind,
    stats: list[Statistic], loss: float | None, keep_lease: bool,
) -> dict[str, Any]:
    """What `write_checkpoint` does for the chunk [task.start, reached), in plain values:
    statistics, checkpoint, then the commit. It runs in the writer process or thread, or
    inline for a task's last chunk."""
    expect, update = engine.commit_change(doc, task, reached, keep_lease)
    return {"session": task.session, "step": reached, "kind": str(kind),
            "points": [[_text(s.phase), int(s.step), _text(s.name), float(s.value),
                        float(s.time)] for s in stats],
            "metrics": {"loss": loss}, "expect": expect, "update": update}


def _text(value: Any) -> str:
    return value if type(value) is str else str(getattr(value, "value", value))


def settle(engine: Engine, live: Live) -> BaseException | None:
    """Wait for the write in flight and take in its commit; the error of a failed write
    (None if it succeeded or there was none). A fenced-out commit sets `live.fenced`."""
    if not engine.writer.pending:
        return None
    try:
        new = engine.writer.wait()
    except Exception as exc:  # noqa: BLE001 - the caller discards what followed it
        return exc
    if new is None:
        live.fenced = True
        return None
    plan = plan_of(new)
    step = int(new["step"])
    live.doc, live.committed = new, True
    live.task = Task(TRAIN, new["_id"], new["token"], start=step, stop=plan.boundary_after(step))
    due = [t for t in next_tasks(new) if t.kind != TRAIN]
    if engine.on_commit is not None:
        engine.on_commit(due)
    else:
        live.successors.extend(due)
    return None


def _discarded(
    engine: Engine, live: Live, exc: BaseException | None, start: int, reached: int
) -> Outcome:
    """The write at `start` failed (or was fenced out): the chunk [start, reached)
    trained after it is dropped, and the session continues from its last commit."""
    from ptutils.engine import Outcome, log

    engine._warm = None
    if live.fenced:
        return Outcome(live.origin, live.committed,
                       "fenced out at commit (another worker took over)")
    if not isinstance(exc, StoreError):
        assert exc is not None
        raise exc  # not the store's fault (e.g. a State the codec refuses): fails the session
    engine._release(live.task)
    if not live.committed:
        raise exc  # the task's own message continues from here: redelivered as before
    reason = (f"checkpoint at step {start} failed ({exc}); the chunk [{start}, {reached}) "
              f"trained after it is discarded; resuming from step {live.task.start}")
    log.warning("%s: %s", live.origin, reason)
    return Outcome(live.origin, True, reason, step=live.task.start,
                   successors=[*live.successors, live.task])
