"""Reconcile: find lost work in the store and requeue it (DESIGN §4.1, §4.6).

The store is the source of truth; a queue message is only a reminder. A `Reconciler`
looks at every queued or running session (and recently completed ones, for their
final Eval) and decides, from the store alone, what nobody is doing:

- Train, lease expired (the worker died, was SIGKILLed, lost its network): the lease is
  cleared and the continuation (`plan.train_task`) is sent;
- Train, no lease and the session untouched for `stall_after` seconds while its train
  queue is empty (the broker restarted empty, a message was lost): the continuation is
  sent. A non-empty queue means the message is probably waiting there;
- Eval(n), for the checkpoint a chunk waits for and for the newest checkpoint: no eval
  result, nobody holds its claim (`EvalClaim`, renewed while an Eval runs), the
  checkpoint is `eval_stall_after` seconds old and the eval queue is empty: Eval(n) is
  sent. A running Eval is never sent again, however long it takes.

Ages and expiries are judged by the store's clock (`Store.now()`), never by the clock
of the machine that reconciles. Each requeue is claimed by a compare-and-set on the
session (`requeued_at`), so any number of reconcilers can run at once; a duplicate
message would be harmless anyway, since every task is fenced.

This module decides and records; the caller sends. `send(doc, task)` enqueues a task on
the session's route and `depth(queue)` counts the messages waiting in a queue
(`workers.dispatch.reconciler` wires both to Celery).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ptutils.errors import PtutilsError
from ptutils.plan import pending_eval_steps, plan_of, train_task
from ptutils.protocol import EVAL, QUEUES, TRAIN, Task, queue_of
from ptutils.store.base import SessionStatus, Store

log = logging.getLogger("ptutils.reconcile")

STALL_AFTER = 15.0
"""Seconds a session may sit with no lease, untouched and with an empty train queue
before its Train continuation is requeued (a message in flight takes milliseconds)."""

EVAL_STALL_AFTER = 15.0
"""Seconds a checkpoint due an eval may wait, unclaimed and with an empty eval queue,
before its Eval is requeued."""

LEASE_SLACK = 1.0
"""Seconds a lease or an eval claim must be past its expiry before it counts as lost."""

COMPLETED_WITHIN = 3600.0
"""Completed sessions updated this recently are checked for a missing final Eval."""

COMPLETED_EVERY = 60.0
"""Seconds between full passes (listing completed sessions is the expensive part; in
between, a loop checks the sessions it saw finish)."""

EVAL_CLAIM = "eval_claim"
"""Checkpoint field of a running Eval: {"worker", "expires"} (store clock)."""


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
    """Reconcile passes over a store; `send` and `depth` talk to the broker."""

    store: Store
    send: Sender
    depth: Depth
    stall_after: float = STALL_AFTER
    eval_stall_after: float = EVAL_STALL_AFTER
    lease_slack: float = LEASE_SLACK
    completed_within: float | None = COMPLETED_WITHIN
    completed_every: float = COMPLETED_EVERY
    _watch: set[str] = field(default_factory=set, repr=False)
    _last_full: float = field(default=-math.inf, repr=False)

    def run(self, now: float | None = None, *, completed: bool = True) -> list[Requeue]:
        """One pass: requeue what is lost; the requeues this pass made (and won).

        `completed`: also list the completed sessions of the last `completed_within`
        seconds (otherwise only those this reconciler saw active are looked at).
        """
        now = self.store.now() if now is None else now
        candidates = self._candidates(now, completed)
        depths: dict[str, int | None] = {}

        def depth(queue: str) -> int | None:  # as it was before this pass sent anything
            if queue not in depths:
                depths[queue] = self.depth(queue)
            return depths[queue]

        if candidates:
            depth(QUEUES[EVAL])
            for q in sorted({queue_of(d, TRAIN) for d in candidates if not d.get("lease")}):
                depth(q)
        done: list[Requeue] = []
        watch: set[str] = set()
        for doc in candidates:
            try:
                action = self._check(doc, now, depth, watch)
            except Exception:  # noqa: BLE001 - one odd session must not stop the pass
                log.exception("reconcile: could not check session %s", doc.get("name"))
                watch.add(doc["_id"])
                continue
            if action is not None:
                done.append(action)
        self._watch = watch
        return done

    def tick(self) -> list[Requeue]:
        """A pass, a full one (completed sessions listed) every `completed_every` s."""
        full = time.monotonic() - self._last_full >= self.completed_every
        done = self.run(completed=full)
        if full:
            self._last_full = time.monotonic()
        return done

    def loop(
        self,
        every: float,
        *,
        stop: threading.Event | None = None,
        on_pass: Callable[[list[Requeue]], None] | None = None,
    ) -> None:
        """`tick` every `every` seconds until `stop` is set; errors are logged."""
        stop = stop or threading.Event()
        while True:
            try:
                done = self.tick()
                if on_pass is not None:
                    on_pass(done)
            except Exception:  # noqa: BLE001 - a store or broker outage: try again next pass
                log.exception("reconcile pass failed; trying again in %.0fs", every)
            if stop.wait(every):
                return

    # --- which sessions ---------------------------------------------------------------
    def _candidates(self, now: float, completed: bool) -> list[dict[str, Any]]:
        active = self.store.find_sessions(
            status=[str(SessionStatus.QUEUED), str(SessionStatus.RUNNING)]
        )
        if self.completed_within is None:
            return active
        if completed:
            done = self.store.find_sessions(status=str(SessionStatus.COMPLETED))
        else:  # the sessions seen active (or still missing their final Eval) last pass
            seen = {d["_id"] for d in active}
            done = [d for d in map(self._get, sorted(self._watch - seen)) if d is not None]
        recent = [
            d for d in done
            if d["status"] == str(SessionStatus.COMPLETED)
            and float(d.get("updated") or 0) > now - self.completed_within
        ]
        return active + recent

    def _get(self, session_id: str) -> dict[str, Any] | None:
        try:
            return self.store.get_session(session_id)
        except PtutilsError:  # deleted since
            return None

    # --- what is lost ---------------------------------------------------------------
    def _check(
        self, doc: dict[str, Any], now: float, depth: Depth, watch: set[str]
    ) -> Requeue | None:
        unevaluated, gated, evaluated_at = self._unevaluated(doc)
        if doc["status"] != str(SessionStatus.COMPLETED) or unevaluated:
            watch.add(doc["_id"])
        evals = self._lost_evals(doc, now, depth, unevaluated)
        train = None if gated else self._lost_train(doc, now, depth, evaluated_at)
        if not evals and train is None:
            return None
        reasons = [train] if train else []
        if evals:
            reasons.append(f"Eval({', '.join(map(str, evals))}) has no result and nobody "
                           "runs it")
        return self._requeue(doc, now, "; ".join(reasons), evals, train is not None)

    def _lost_train(
        self, doc: dict[str, Any], now: float, depth: Depth, evaluated_at: float
    ) -> str | None:
        """Why the session's Train must be requeued, or None. `evaluated_at`: when the
        Eval the chunk waited for came in (its Train, waiting, re-checks every second)."""
        if doc["status"] == str(SessionStatus.COMPLETED):
            return None
        lease = doc.get("lease")
        if lease:
            expired = now - float(lease.get("expires", 0))
            if expired <= self.lease_slack:
                return None
            return f"the lease of {lease.get('worker')} expired {expired:.1f}s ago"
        idle = now - max(float(doc.get("updated") or 0), _last_requeue(doc), evaluated_at)
        if idle < self.stall_after or train_task(doc) is None:
            return None
        if depth(queue_of(doc, TRAIN)) != 0:
            return None  # its message is probably in the queue (or the broker is down)
        return f"no lease and no progress for {idle:.0f}s, and its queue is empty"

    def _unevaluated(self, doc: dict[str, Any]) -> tuple[list[int], bool, float]:
        """Eval steps to watch that have no result yet; whether the next chunk waits for
        one of them; when the result it waits for came in (0 if none)."""
        plan = plan_of(doc)
        step = int(doc["step"])
        gating = [] if doc["status"] == str(SessionStatus.COMPLETED) else (
            pending_eval_steps(doc, step)[-1:])
        steps = gating + ([step] if step > 0 and plan.eval_due(step) else [])
        if not steps:
            return [], False, 0.0
        points = self.store.query_statistics(
            doc["_id"], phase="eval", step_min=min(steps), step_max=max(steps))
        done = {int(p["step"]) for p in points}
        missing = [n for n in steps if n not in done]
        evaluated_at = max((float(p.get("time") or 0) for p in points
                            if gating and p["step"] == gating[0]), default=0.0)
        return missing, bool(gating) and gating[0] in missing, evaluated_at

    def _lost_evals(
        self, doc: dict[str, Any], now: float, depth: Depth, steps: list[int]
    ) -> list[int]:
        """The steps whose Eval nobody runs: old enough, unclaimed, eval queue empty."""
        if not steps or now - _last_requeue(doc) < self.eval_stall_after:
            return []
        ckpts: dict[int, list[dict[str, Any]]] = {}
        for c in self.store.list_checkpoints(doc["_id"]):
            ckpts.setdefault(int(c["step"]), []).append(c)
        lost = [
            n for n in steps
            if n in ckpts
            and now - min(float(c.get("created") or 0) for c in ckpts[n]) >= self.eval_stall_after
            and not any(self._claimed(c, now) for c in ckpts[n])
        ]
        if not lost or depth(QUEUES[EVAL]) != 0:
            return []
        return lost

    def _claimed(self, ckpt: dict[str, Any], now: float) -> bool:
        claim = ckpt.get(EVAL_CLAIM)
        return bool(claim) and float(claim.get("expires", 0)) > now - self.lease_slack

    # --- requeue --------------------------------------------------------------------
    def _requeue(
        self, doc: dict[str, Any], now: float, reason: str, evals: list[int], train: bool
    ) -> Requeue | None:
        update = {"lease": None, "status": str(SessionStatus.QUEUED)} if train else {}
        claimed = self.store.cas_session(  # win the right to requeue
            doc["_id"],
            {"token": doc["token"], **_same_lease(doc), "requeued_at": doc.get("requeued_at")},
            {**update, "requeued_at": now},
        )
        if claimed is None:
            return None
        tasks = [Task(EVAL, doc["_id"], claimed["token"], step=n) for n in evals]
        nxt = train_task(claimed) if train else None
        return self._send(claimed, reason, tasks + ([nxt] if nxt else []))

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


def _same_lease(doc: dict[str, Any]) -> dict[str, Any]:
    """The CAS expectation that the session's lease is still the one read: its holder
    and expiry (not the whole sub-document: it carries `devices`, a list, which the
    MongoDB stand-in of the tests does not match inside an embedded document)."""
    lease = doc.get("lease")
    if not lease:
        return {"lease": None}
    return {"lease.worker": lease.get("worker"), "lease.expires": lease.get("expires")}


def _last_requeue(doc: dict[str, Any]) -> float:
    return float(doc.get("requeued_at") or 0)


class EvalClaim:
    """`with EvalClaim(store, session, step, worker, ttl):` marks Eval(step) as running.

    Writes {"worker", "expires"} (store clock) on the session's checkpoints at `step`,
    renews it every ttl/3 while the block runs and clears it at the end, so reconcile
    never sends a running Eval again. The claim is advisory: a store error while
    claiming is logged, and the Eval runs anyway (a duplicate Eval is harmless).
    """

    def __init__(self, store: Store, session_id: str, step: int, worker: str,
                 ttl: float) -> None:
        self.store = store
        self.session_id = session_id
        self.step = int(step)
        self.worker = worker
        self.ttl = float(ttl)
        self._kinds: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> EvalClaim:
        try:
            self._kinds = [str(c["kind"]) for c in self.store.list_checkpoints(self.session_id)
                           if int(c["step"]) == self.step]
        except PtutilsError as exc:
            log.warning("could not claim Eval(%s) of %s: %s", self.step, self.session_id, exc)
        if self._set(lambda: {"worker": self.worker, "expires": self.store.now() + self.ttl}):
            self._thread = threading.Thread(target=self._renew, daemon=True,
                                            name=f"eval-claim-{self.session_id[:8]}")
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._set(lambda: None)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            self._set(lambda: {"worker": self.worker, "expires": self.store.now() + self.ttl})

    def _set(self, value: Callable[[], dict[str, Any] | None]) -> bool:
        """Write the claim on every checkpoint at the step; False if none took it."""
        wrote = False
        for kind in self._kinds:
            try:
                self.store.update_checkpoint(self.session_id, self.step, kind,
                                             {EVAL_CLAIM: value()})
                wrote = True
            except PtutilsError as exc:  # deleted by retention, or a store hiccup
                log.debug("eval claim of %s at %s (%s): %s", self.session_id, self.step,
                          kind, exc)
        return wrote
