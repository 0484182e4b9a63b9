"""Task bodies: Train, Eval, Save (DESIGN §6), thin calls into this process's Engine.

One `WorkerContext` per worker process holds the Engine (store opened once, the last
session kept warm so consecutive chunks of a session skip the rebuild and reload). A
body runs the task, then enqueues `outcome.successors` (the engine has committed by
then) and re-sends a task that must wait (`retry_after`) with a countdown. A stale or
duplicate delivery is a logged no-op; a session failure is recorded on the session by
the engine and the body returns normally, so the worker takes the next task.

Slots (ptutils.slots): a Train chunk first takes `session.world_size` slots of this
node (shared with every worker process on it through the node's slot file), and frees
them when it returns; if they are not free now, the task goes back to its queue with a
countdown (SLOTS_RETRY_S) and no lease is taken. The Engine gets the same slots
(`Engine(slots=...)`) for the ranks it starts; the first progress report of a chunk
records them on the lease (`lease.devices`), for `ptutils status`.

Preemption: SIGTERM (Celery's `worker_shutting_down`) sets the running task's stop flag,
so the chunk stops at the next step boundary, checkpoints (kind `preempt`), commits and
enqueues its continuation; Celery's warm shutdown then waits for the body to return.
If that takes longer than the grace period ($PTUTILS_GRACE, default 30 s), or a second
SIGTERM arrives, the process exits at once and the session's lease expires instead.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from celery import Task as CeleryTask
from celery import signals

from ptutils import policy
from ptutils.engine import Engine, Outcome
from ptutils.errors import ConfigError, PtutilsError, SessionNotFound, StoreError
from ptutils.protocol import EVAL, SAVE, TASK_NAMES, TRAIN, Task
from ptutils.reconcile import EvalClaim, Reconciler
from ptutils.rng import isolate_library_rngs
from ptutils.slots import NodeSlots, WorkerSlots, world_size_of
from ptutils.store import open_store
from ptutils.store.base import Store
from workers import metrics
from workers.app import RECONCILE_TASK, app
from workers.dispatch import Route, reconciler, send

log = logging.getLogger("ptutils.worker")

DEFAULT_GRACE = 30.0
"""Seconds a preempted worker has to checkpoint and exit ($PTUTILS_GRACE)."""

DEFAULT_LEASE_TTL = 60.0
"""Seconds a lease lives without a heartbeat ($PTUTILS_LEASE_TTL); renewed every ttl/3."""

SIGNAL_DEDUP_S = 1.0
"""A second SIGTERM within this many seconds of the first is the same preemption
delivered twice (the launcher forwards it, and systemd or SLURM may signal every
process of the group too), not a request to exit at once."""

STORE_RETRIES = 5
"""Times a task whose store was unreachable is re-sent (5 s, 10 s, ... up to 60 s)
before it is dropped and left to `reconcile`."""

SLOTS_RETRY_S = 2.0
"""Seconds before a Train task that found too few free slots on its node is tried again."""

SLOTS_TOO_FEW_RETRY_S = 30.0
"""... and before one that needs more slots than its node has (a misrouted message)."""

DEFAULT_CHUNKS_PER_TASK = 1
"""Chunks one Train task may run ($PTUTILS_CHUNKS_PER_TASK). Above 1, each chunk's
checkpoint is written in the background while the next trains (ptutils.chunks), and a
task runs up to this many chunks: keep Redis's visibility_timeout above that (a
redelivery is fenced out, but wastes a worker). The price: a worker killed while a
write is in flight loses that chunk too (the session resumes from the commit before).
1 (the default) writes and commits every checkpoint before training goes on."""

EXIT_ABANDONED = 3
"""Exit status of a worker that left its task unfinished (grace over, second SIGTERM)."""


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


class WorkerContext:
    """This process's Engine and store, and the stop flag of the task it runs."""

    def __init__(self, store: Store, worker: str, *, lease_ttl: float,
                 slots: NodeSlots | None = None, store_url: str | None = None) -> None:
        self.store = store
        self.slots = WorkerSlots(slots or NodeSlots.from_env())
        # store_url: how rank processes open the store (store.url hides a password)
        self.engine = Engine(store, worker=worker, lease_ttl=lease_ttl, slots=self.slots,
                             progress=self._on_progress, store_url=store_url,
                             chunks_per_task=int(_env_float("PTUTILS_CHUNKS_PER_TASK",
                                                            DEFAULT_CHUNKS_PER_TASK)),
                             on_commit=self._enqueue)
        self.shutting_down = threading.Event()
        self._current = threading.Event()
        self._routes: dict[str, tuple[Route, int]] = {}
        self._marked: str | None = None

    def begin(self) -> None:
        """A fresh stop flag for the next task (already set while shutting down)."""
        stop = threading.Event()
        self._current = stop
        self.engine.stop_flag = stop
        self._marked = None  # every chunk takes a new lease: record its devices again
        if self.shutting_down.is_set():
            stop.set()

    def stop_running(self) -> None:
        """The running task stops at its next step boundary."""
        self._current.set()

    def shutdown(self) -> None:
        """Preemption: stop the running task, and every later one before it starts."""
        self.shutting_down.set()
        self._current.set()

    def route(self, session_id: str) -> Route:
        """Queue and priority of a session's messages (read once per session)."""
        return self._session(session_id)[0]

    def world_size(self, session_id: str) -> int:
        """Slots a Train chunk of the session needs (`session.world_size`)."""
        return self._session(session_id)[1]

    def _session(self, session_id: str) -> tuple[Route, int]:
        known = self._routes.get(session_id)
        if known is None:
            doc = self.store.get_session(session_id)
            known = (Route.of(doc), _world_size(doc))
            if len(self._routes) > 1000:
                self._routes.clear()
            self._routes[session_id] = known
        return known

    def execute(self, task: Task) -> Outcome | None:
        """Run one task and enqueue what follows; None if its session no longer exists."""
        self.begin()
        with metrics.task_timer(task.kind) as measured:
            try:
                if task.kind == TRAIN:
                    outcome = self._train(task)
                else:
                    with self._claim(task):
                        outcome = self.engine.run(task)
            except SessionNotFound:
                log.info("%s: skipped (the session was deleted)", task)
                measured(None, False)
                return None
            measured(outcome, self.shutting_down.is_set())
        _log_outcome(outcome)
        self.dispatch(outcome)
        return outcome

    def _train(self, task: Task) -> Outcome:
        """A Train chunk on `world_size` slots of this node, taken before the lease (so
        waiting for them is not an attempt) and freed when the chunk returns."""
        doc = self.store.get_session(task.session)
        if doc["token"] != task.token or int(doc["step"]) != task.start:
            return self.engine.run(task)  # stale: the engine says why and does nothing
        n = _world_size(doc)
        if self.slots.reserve(n, task.session) is None:
            return self._wait_for_slots(task, n)
        self._marked = None
        try:
            return self.engine.run(task)
        finally:
            self.slots.end()

    def _wait_for_slots(self, task: Task, n: int) -> Outcome:
        """Send the task back for later; mark the session (its `updated` moves, so
        reconcile sees it is not lost while it waits)."""
        capacity = self.slots.node.capacity
        try:
            self.store.cas_session(task.session, {"token": task.token, "lease": None},
                                   {"meta.slot_wait": {"slots": n, "at": self.store.now()}})
        except StoreError as exc:
            log.warning("%s: could not mark the wait for slots: %s", task, exc)
        if n > capacity:
            reason = (f"needs {n} slots, this node has {capacity}: back to its queue "
                      f"{self.route(task.session).queue} for a larger node")
            return Outcome(task, False, reason, retry_after=SLOTS_TOO_FEW_RETRY_S)
        return Outcome(task, False, f"waiting for {n} free slot(s) on this node",
                       retry_after=SLOTS_RETRY_S)

    def _on_progress(self, session_id: str, step: int, loss: float) -> None:
        """At the first progress report of a chunk: record the slots on the lease
        (`lease.devices`), for `ptutils status`."""
        held = self.slots.held
        if held is None or self._marked == session_id:
            return
        self._marked = session_id
        try:
            self.store.cas_session(session_id, {"lease.worker": self.engine.worker},
                                   {"lease.devices": list(held)})
        except StoreError as exc:
            log.warning("could not record the devices of %s: %s", session_id[:8], exc)

    def _claim(self, task: Task) -> AbstractContextManager[object]:
        """An Eval holds a claim on its checkpoint while it runs (reconcile leaves it be)."""
        if task.kind != EVAL:
            return nullcontext()
        return EvalClaim(self.store, task.session, task.step, self.engine.worker,
                         self.engine.lease_ttl)

    def dispatch(self, outcome: Outcome) -> None:
        """Enqueue the successors, then the task itself again if it must wait."""
        pending: list[tuple[Task, float | None]] = [(t, None) for t in outcome.successors]
        if outcome.retry_after is not None:
            pending.append((outcome.task, outcome.retry_after))
        self._send(pending)

    def _enqueue(self, tasks: list[Task]) -> None:
        """The Eval/Save tasks of a chunk committed while its Train task goes on."""
        self._send([(t, None) for t in tasks])

    def _send(self, pending: list[tuple[Task, float | None]]) -> None:
        for task, countdown in pending:
            try:
                send(app, task, self.route(task.session), countdown=countdown)
            except PtutilsError as exc:
                log.error("%s was not enqueued (%s); `ptutils reconcile` will requeue it",
                          task, exc)


def _world_size(doc: dict[str, Any]) -> int:
    try:
        return world_size_of(doc)
    except ConfigError:
        return 1  # the engine fails the session, naming the key


def _log_outcome(outcome: Outcome) -> None:
    if outcome.failed:
        log.error("%s: session failed: %s", outcome.task, outcome.reason)
    elif outcome.ran:
        log.info("%s: done (step %s)", outcome.task, outcome.step)
    else:
        log.info("%s: no-op (%s)", outcome.task, outcome.reason)


_context: WorkerContext | None = None
_context_lock = threading.Lock()


def context(hostname: str | None = None) -> WorkerContext:
    """This process's WorkerContext, created (store opened) on first use."""
    global _context
    with _context_lock:
        if _context is None:
            url = os.environ.get("PTUTILS_STORE")
            store = metrics.instrument_store(open_store(url))
            worker = f"{hostname or 'celery'}:{os.getpid()}"
            _context = WorkerContext(
                store, worker, lease_ttl=_env_float("PTUTILS_LEASE_TTL", DEFAULT_LEASE_TTL),
                store_url=url,
            )
            if _preemption.signalled:
                _context.shutdown()
            log.info("worker %s uses store %s; %s", worker, store.url,
                     policy.current().describe())
        return _context


def stop_running_task() -> None:
    """Ask the task this process runs (if any) to stop at its next step boundary."""
    if _context is not None:
        _context.stop_running()


def _run(celery_task: CeleryTask, message: dict[str, Any]) -> dict[str, Any]:
    task = Task.from_message(message)
    try:
        outcome = context(celery_task.request.hostname).execute(task)
    except StoreError as exc:
        retries = int(celery_task.request.retries or 0)
        log.warning("%s: store error (%s); trying again later", task, exc)
        raise celery_task.retry(exc=exc, countdown=min(60, 5 * 2**retries),
                                max_retries=STORE_RETRIES) from exc
    if outcome is None:
        return {"ran": False, "reason": "session not found"}
    return {"ran": outcome.ran, "reason": outcome.reason, "step": outcome.step,
            "failed": outcome.failed}


@app.task(name=TASK_NAMES[TRAIN], bind=True)
def train(self: CeleryTask, **message: Any) -> dict[str, Any]:
    """Train[start, stop) of a session (message: protocol.Task fields)."""
    return _run(self, message)


@app.task(name=TASK_NAMES[EVAL], bind=True)
def evaluate(self: CeleryTask, **message: Any) -> dict[str, Any]:
    """Eval(step) of a session: metrics of its checkpoint at `step`."""
    return _run(self, message)


@app.task(name=TASK_NAMES[SAVE], bind=True)
def save(self: CeleryTask, **message: Any) -> dict[str, Any]:
    """Save(step) of a session: retention, best/final marks."""
    return _run(self, message)


@app.task(name=RECONCILE_TASK, bind=True)
def reconcile(self: CeleryTask) -> int:
    """The beat task: requeue lost work of every session (see ptutils.reconcile)."""
    global _beat_reconciler
    store = context(self.request.hostname).store
    if _beat_reconciler is None or _beat_reconciler.store is not store:
        _beat_reconciler = reconciler(store, app, **_reconcile_options())
    return len(_beat_reconciler.tick())


_beat_reconciler: Reconciler | None = None
"""The beat task's Reconciler in this process (it remembers when it last listed the
completed sessions, and which sessions it saw finish)."""


# --- preemption -------------------------------------------------------------------------
class _Preemption:
    """First SIGTERM: stop at the next step, arm the grace timer. Second: exit now."""

    def __init__(self) -> None:
        self.first: float | None = None

    @property
    def signalled(self) -> bool:
        return self.first is not None

    def on_signal(self, sig: str) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
            grace = _env_float("PTUTILS_GRACE", DEFAULT_GRACE)
            log.warning("%s: stopping at the next step boundary, checkpointing "
                        "(grace %.0fs; a second SIGTERM exits at once)", sig, grace)
            _stopped.set()
            if _context is not None:
                _context.shutdown()
            timer = threading.Timer(grace, _abandon, args=(f"grace period of {grace:g}s over",))
            timer.daemon = True
            timer.start()
        elif now - self.first > SIGNAL_DEDUP_S:
            _abandon(f"second {sig}")


def _abandon(why: str) -> None:
    """Exit at once: the running task's lease expires and reconcile requeues it."""
    log.error("%s: exiting without finishing the running task (its lease will expire)", why)
    logging.shutdown()
    os._exit(EXIT_ABANDONED)


_preemption = _Preemption()
isolate_library_rngs(import_missing=True)
_stopped = threading.Event()


@signals.worker_shutting_down.connect
def _on_shutting_down(sig: str = "SIGTERM", how: str = "Warm", **_: Any) -> None:
    _preemption.on_signal(sig)


@signals.worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    _guard_sigterm()
    every = _env_float("PTUTILS_WORKER_RECONCILE", 0.0)
    if every > 0:
        threading.Thread(target=_reconcile_forever, args=(every,), daemon=True,
                         name="ptutils-reconcile").start()


def _guard_sigterm() -> None:
    """Put a dedup in front of Celery's SIGTERM handler: copies of one SIGTERM arriving
    within SIGNAL_DEDUP_S never reach it.

    Celery's handler is not reentrant: a second SIGTERM landing while the first one
    dispatches `worker_shutting_down` (the first dispatch takes the signal's
    threading.Lock) deadlocks the main thread, and the worker neither stops its chunk nor
    exits. Under SLURM this is the common case: slurmstepd signals every process of the
    job step, and the launcher forwards the same SIGTERM (tests/test_slurm.py met it)."""
    handler = signal.getsignal(signal.SIGTERM)
    if not callable(handler) or getattr(handler, "ptutils_dedup", False):
        return
    if threading.current_thread() is not threading.main_thread():
        log.warning("SIGTERM copies are not deduplicated (worker_ready off the main thread)")
        return
    passed: list[float] = []  # when a SIGTERM went through to Celery

    def dedup(signum: int, frame: Any) -> None:
        now = time.monotonic()
        if passed and now - passed[-1] < SIGNAL_DEDUP_S:
            return
        # a copy nested before this append runs Celery's handler to the end first, so
        # the call below never interrupts it; one nested after it returns above
        passed.append(now)
        handler(signum, frame)

    dedup.ptutils_dedup = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, dedup)


def _reconcile_forever(every: float) -> None:
    """The light reconcile loop `ptutils worker` runs in one process per machine."""
    store = open_store(os.environ.get("PTUTILS_STORE"))
    log.info("reconciling %s every %gs", store.url, every)
    reconciler(store, app, **_reconcile_options()).loop(
        every, stop=_stopped, on_pass=metrics.ReconcileMetrics(
            store, _env_float(metrics.SESSIONS_EVERY_ENV, metrics.SESSIONS_EVERY_S)))


def _reconcile_options() -> dict[str, float]:
    """Reconcile thresholds from $PTUTILS_STALL_AFTER / $PTUTILS_EVAL_STALL_AFTER."""
    options = {"stall_after": _env_float("PTUTILS_STALL_AFTER", 0.0),
               "eval_stall_after": _env_float("PTUTILS_EVAL_STALL_AFTER", 0.0)}
    return {k: v for k, v in options.items() if v > 0}
