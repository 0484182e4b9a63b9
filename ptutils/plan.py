"""The plan: given a session document, which tasks come next (a pure function, DESIGN §2).

The in-process runner, the workers and the orchestrator all ask `next_tasks`; none
keeps its own copy of the schedule.
"""

from __future__ import annotations

from typing import Any

from ptutils.protocol import EVAL, SAVE, TRAIN, Task
from ptutils.session import Plan
from ptutils.store.base import SessionStatus


def plan_of(doc: dict[str, Any]) -> Plan:
    """The Plan of a stored session (its config's `session:` section)."""
    return Plan.from_config(doc["config"].get("session"))


def train_task(doc: dict[str, Any], plan: Plan | None = None) -> Task | None:
    """The Train chunk that continues the session from its current step, if any."""
    plan = plan or plan_of(doc)
    if SessionStatus(doc["status"]).finished or doc["step"] >= plan.total_steps:
        return None
    step = int(doc["step"])
    return Task(TRAIN, doc["_id"], doc["token"], start=step, stop=plan.boundary_after(step))


def next_tasks(doc: dict[str, Any], *, after_train: bool = True) -> list[Task]:
    """Tasks that follow the session's current state.

    After a Train chunk reached step n (a chunk boundary): Eval(n) when due, Save(n),
    then Train[n, next boundary) unless the session is finished.
    """
    plan = plan_of(doc)
    step = int(doc["step"])
    tasks: list[Task] = []
    ckpt = doc.get("checkpoint") or {}
    at_boundary = (
        step > 0
        and ckpt.get("step") == step
        and (step % plan.chunk_steps == 0 or step == plan.total_steps)
    )
    if after_train and at_boundary and doc["status"] != str(SessionStatus.FAILED):
        if plan.eval_due(step):
            tasks.append(Task(EVAL, doc["_id"], doc["token"], step=step))
        tasks.append(Task(SAVE, doc["_id"], doc["token"], step=step))
    nxt = train_task(doc, plan)
    if nxt is not None:
        tasks.append(nxt)
    return tasks


def pending_eval_steps(doc: dict[str, Any], start: int) -> list[int]:
    """Eval steps whose results a Train chunk starting at `start` must deliver first.

    Evals at steps n <= start - chunk_steps are delivered (a fixed point of the plan:
    Eval(n) runs beside Train[n, n+K) and is needed by Train[n+K, ...)).
    """
    plan = plan_of(doc)
    limit = start - plan.chunk_steps
    if limit <= 0:
        return []
    return [n for n in range(plan.chunk_steps, limit + 1, plan.chunk_steps) if plan.eval_due(n)]
