"""A Train task of a world_size > 1 session, supervised by the Engine's worker.

The Engine holds the lease and heartbeat as for any Train task; here it takes the
node's device slots, starts the ranks (ptutils.group.supervisor), and commits the one
checkpoint rank 0 wrote. A rank's own error fails the session; a killed or hung rank
retries the chunk from its start checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ptutils.errors import CheckpointCorrupt, CheckpointNotFound, PtutilsError
from ptutils.plan import next_tasks, pending_eval_steps, plan_of
from ptutils.protocol import Task

if TYPE_CHECKING:
    from ptutils.engine import Engine, Outcome

__all__ = ["GroupError", "SLOTS_RETRY_S", "train_group"]

SLOTS_RETRY_S = 5.0
"""Seconds before a group chunk that found too few free device slots is tried again."""


def train_group(engine: Engine, doc: dict[str, Any], task: Task, hb: Any) -> Outcome:
    """Train[start, stop) of a world_size > 1 session on rank processes supervised
    here; rank 0 writes the statistics and the one checkpoint, this commits it."""
    from ptutils.engine import Outcome
    from ptutils.group.supervisor import run_group

    engine._warm = None
    plan = plan_of(doc)
    for n in pending_eval_steps(doc, task.start):  # the ranks deliver them
        if not engine.store.query_statistics(doc["_id"], phase="eval", step_min=n, step_max=n):
            engine._unlease_waiting(doc, task)
            return Outcome(task, False, f"waiting for Eval({n})", retry_after=1.0)
    owner = f"{task.session}:{engine.worker}"
    devices = engine.slots.acquire(plan.world_size, owner)
    if devices is None:
        engine._unlease_waiting(doc, task)
        return Outcome(task, False, f"waiting for {plan.world_size} free device slots",
                       retry_after=SLOTS_RETRY_S)
    try:
        engine.store.cas_session(
            task.session,
            {"token": task.token, "lease.worker": engine.worker},
            {"lease.devices": list(devices)},
        )
        engine.store.delete_statistics(task.session, after_step=task.start)
        result = run_group(
            engine.store_url or engine.store.url,
            doc,
            task,
            devices=devices,
            stop_flag=engine.stop_flag,
            lease_lost=lambda: hb.lost,
            progress=engine.progress_of(task.session),
            hang_timeout=engine.hang_timeout,
        )
    finally:
        engine.slots.release(owner)
    if hb.lost:
        return Outcome(task, False, "lease lost during the chunk; work discarded")
    if not result.ok:
        return _group_failed(engine, doc, task, result)
    if result.stop_reason:
        return engine._finish_early(doc, task, None, result.stop_reason)
    reached = int(result.reached or task.start)
    if reached == task.start:
        engine._release(task)
        return Outcome(
            task, False, "stopped before the first step", step=reached, successors=[task]
        )
    new = engine._commit(doc, task, reached)
    if new is None:
        return Outcome(task, False, "fenced out at commit (another worker took over)")
    return Outcome(task, True, "ok", step=reached, successors=next_tasks(new))


def _group_failed(engine: Engine, doc: dict[str, Any], task: Task, result: Any) -> Outcome:
    """A rank's own error fails the session (a corrupt checkpoint rolls it back); a
    failure of the group (a rank killed or hung) is retried from the checkpoint at
    the chunk's start: the attempt counts (session.max_attempts)."""
    from ptutils.engine import Outcome, log

    err = result.error
    if err is not None:
        kinds = {"CheckpointCorrupt": CheckpointCorrupt, "CheckpointNotFound": CheckpointNotFound}
        if err["type"] in kinds:
            return engine._roll_back(doc, task, task.start, kinds[err["type"]](err["message"]))
        exc = GroupError(f"{err['type']}: {err['message']}")
        exc.remote_traceback = err.get("traceback", "")
        return engine._fail(doc, task, exc)
    log.warning("%s: the group failed (%s); retrying from step %d", task, result.reason,
                task.start)
    engine._release(task)
    return Outcome(task, False, f"group failed: {result.reason}; retrying from step "
                   f"{task.start}", step=task.start, retry_after=1.0)


class GroupError(PtutilsError):
    """A rank of a group session failed with an error of the session's own."""

    remote_traceback = ""
