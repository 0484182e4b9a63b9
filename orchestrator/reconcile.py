"""`ptutils reconcile`: rebuild lost work from the store (DESIGN §4.1, §4.6).

The store is the source of truth; a queue message is only a reminder. Reconcile looks
at every queued or running session and requeues its work from the latest checkpoint
when nobody is doing it:

- its lease expired (the worker died, was SIGKILLed, or lost its network): the lease
  is cleared and the Train continuation (`plan.train_task`) is sent;
- it holds no lease and made no progress for `stall_after` seconds while its train
  queue is empty (the broker restarted empty, a message was lost): the continuation is
  sent. A non-empty queue means its message is probably waiting there; a backlog only
  delays the requeue until the queue drains;
- the Train chunk waits for an Eval(n) that has no result `eval_stall_after` seconds
  after its checkpoint while the eval queue is empty: Eval(n) is sent. The final Eval
  of a recently completed session is checked the same way.

Each requeue is claimed by a compare-and-set on the session (`requeued_at`), so several
reconcilers (the beat task, every `ptutils worker`, a cron job) can run at once; a
duplicate message would be harmless anyway, since every task is fenced.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from ptutils.plan import pending_eval_steps, plan_of, train_task
from ptutils.protocol import EVAL, QUEUES, Task
from ptutils.store.base import SessionStatus, Store
from workers.dispatch import Route, queue_depth, send

log = logging.getLogger("ptutils.reconcile")

STALL_AFTER = 60.0
"""Seconds without a lease and without progress after which a session's Train is requeued."""

EVAL_STALL_AFTER = 600.0
"""Seconds a checkpoint may wait for its Eval before the Eval is requeued (keep it above
your longest evaluation, or evaluations run twice)."""

LEASE_SLACK = 1.0
"""Seconds a lease must be past its expiry before it counts as lost (clock skew)."""

COMPLETED_WITHIN = 3600.0
"""Completed sessions updated this recently are checked for a missing final Eval."""


@dataclass
class Requeue:
    """One requeue reconcile made: which session, why, and the tasks it sent."""

    session: str
    name: str
    reason: str
    tasks: list[Task] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"session": self.session, "name": self.name, "reason": self.reason,
                "tasks": [str(t) for t in self.tasks]}


Sender = Callable[[dict[str, Any], Task], None]
"""send(session_doc, task): enqueue a task on the session's route."""

Depth = Callable[[str], int | None]
"""depth(queue): messages waiting in a queue, None if unknown."""


@dataclass
class Reconciler:
    """One reconcile pass over a store; `send` and `depth` talk to the broker."""

    store: Store
    send: Sender
    depth: Depth
    stall_after: float = STALL_AFTER
    eval_stall_after: float = EVAL_STALL_AFTER
    lease_slack: float = LEASE_SLACK
    completed_within: float | None = COMPLETED_WITHIN

    def run(self, now: float | None = None) -> list[Requeue]:
        """Requeue what is lost; the requeues this pass made (and won)."""
        now = time.time() if now is None else now
        candidates = self._candidates(now)
        # Queue depths as they were before this pass sent anything.
        queues = {_train_queue(d) for d in candidates if not d.get("lease")} | {QUEUES[EVAL]}
        depths = {q: self.depth(q) for q in sorted(queues)} if candidates else {}

        def depth(queue: str) -> int | None:
            return depths.get(queue)

        done: list[Requeue] = []
        for doc in candidates:
            try:
                action = self._check(doc, now, depth)
            except Exception:  # noqa: BLE001 - one odd session must not stop the pass
                log.exception("reconcile: could not check session %s", doc.get("name"))
                continue
            if action is not None:
                done.append(action)
        return done

    def _candidates(self, now: float) -> list[dict[str, Any]]:
        active = self.store.find_sessions(
            status=[str(SessionStatus.QUEUED), str(SessionStatus.RUNNING)]
        )
        if self.completed_within is None:
            return active
        recent = [
            d for d in self.store.find_sessions(status=str(SessionStatus.COMPLETED))
            if float(d.get("updated") or 0) > now - self.completed_within
        ]
        return active + recent

    def _check(self, doc: dict[str, Any], now: float, depth: Depth) -> Requeue | None:
        if doc["status"] == str(SessionStatus.COMPLETED):
            return self._missing_eval(doc, now, depth, [int(doc["step"])])
        lease = doc.get("lease")
        if lease:
            expired = now - float(lease.get("expires", 0))
            if expired <= self.lease_slack:
                return None
            return self._requeue_train(
                doc, now, f"the lease of {lease.get('worker')} expired {expired:.1f}s ago"
            )
        gating = pending_eval_steps(doc, int(doc["step"]))
        if gating and not self._evaluated(doc["_id"], gating[-1]):
            return self._missing_eval(doc, now, depth, [gating[-1]])
        idle = now - _last_touch(doc)
        if idle < self.stall_after:
            return None
        task = train_task(doc)
        if task is None:
            return None
        waiting = depth(_train_queue(doc))
        if waiting != 0:
            return None  # its message is probably in the queue (or the broker is down)
        return self._requeue_train(
            doc, now, f"no lease and no progress for {idle:.0f}s, and its queue is empty"
        )

    def _evaluated(self, session_id: str, step: int) -> bool:
        return bool(self.store.query_statistics(session_id, phase="eval", step_min=step,
                                                step_max=step))

    def _requeue_train(self, doc: dict[str, Any], now: float, reason: str) -> Requeue | None:
        claimed = self._claim(doc, now, {"lease": None, "status": str(SessionStatus.QUEUED)})
        if claimed is None:
            return None
        task = train_task(claimed)
        if task is None:
            return None
        return self._send(claimed, reason, [task])

    def _missing_eval(
        self, doc: dict[str, Any], now: float, depth: Depth, steps: list[int]
    ) -> Requeue | None:
        plan = plan_of(doc)
        steps = [n for n in steps if n > 0 and plan.eval_due(n)]
        if not steps or now - _last_requeue(doc) < self.eval_stall_after:
            return None
        ckpts = {c["step"]: c for c in self.store.list_checkpoints(doc["_id"])}
        missing = [
            n for n in steps
            if n in ckpts and not self._evaluated(doc["_id"], n)
            and now - float(ckpts[n].get("created") or 0) >= self.eval_stall_after
        ]
        if not missing or depth(QUEUES[EVAL]) != 0:
            return None
        claimed = self._claim(doc, now, {})
        if claimed is None:
            return None
        tasks = [Task(EVAL, doc["_id"], claimed["token"], step=n) for n in missing]
        return self._send(claimed, f"Eval({', '.join(map(str, missing))}) has no result",
                          tasks)

    def _claim(
        self, doc: dict[str, Any], now: float, update: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Win the right to requeue: CAS on token, lease and the previous requeued_at."""
        return self.store.cas_session(
            doc["_id"],
            {"token": doc["token"], "lease": doc.get("lease"),
             "requeued_at": doc.get("requeued_at")},
            {**update, "requeued_at": now},
        )

    def _send(self, doc: dict[str, Any], reason: str, tasks: list[Task]) -> Requeue | None:
        sent: list[Task] = []
        for task in tasks:
            try:
                self.send(doc, task)
            except Exception as exc:  # noqa: BLE001 - the next pass tries again
                log.error("reconcile: could not requeue %s: %s", task, exc)
                break
            sent.append(task)
        if not sent:
            return None
        log.warning("reconcile: %s (%s): %s; requeued %s", doc["name"], doc["_id"][:8],
                    reason, ", ".join(map(str, sent)))
        return Requeue(doc["_id"], doc["name"], reason, sent)


def _last_touch(doc: dict[str, Any]) -> float:
    return max(float(doc.get("updated") or 0), _last_requeue(doc))


def _last_requeue(doc: dict[str, Any]) -> float:
    return float(doc.get("requeued_at") or 0)


def _train_queue(doc: dict[str, Any]) -> str:
    return Route.of(doc).queue


def reconcile_once(store: Store, app: Celery, **options: Any) -> list[Requeue]:
    """One pass over `store`, sending through the Celery `app` (options: Reconciler's)."""

    def send_task(doc: dict[str, Any], task: Task) -> None:
        send(app, task, Route.of(doc))

    return Reconciler(
        store, send=send_task, depth=lambda queue: queue_depth(app, queue), **options
    ).run()


def reconcile_loop(
    store: Store,
    app: Celery,
    every: float,
    *,
    stop: threading.Event | None = None,
    on_pass: Callable[[list[Requeue]], None] | None = None,
    completed_every: float = 60.0,
    **options: Any,
) -> None:
    """`reconcile_once` every `every` seconds until `stop` is set; errors are logged.

    Completed sessions (a missing final Eval) are looked at every `completed_every`
    seconds only: listing them is the expensive part of a pass.
    """
    stop = stop or threading.Event()
    last_full = 0.0
    while True:
        full = time.monotonic() - last_full >= completed_every
        opts = options if full else {**options, "completed_within": None}
        try:
            done = reconcile_once(store, app, **opts)
            last_full = time.monotonic() if full else last_full
            if on_pass is not None:
                on_pass(done)
        except Exception:  # noqa: BLE001 - a store or broker outage: try again next pass
            log.exception("reconcile pass failed; trying again in %.0fs", every)
        if stop.wait(every):
            return
