"""The worker's execution pool: one task at a time, in one thread of the worker process.

Why not `--pool solo`: solo runs the task inside the consumer's event loop, so while a
chunk trains the worker answers no remote control (`celery inspect active` times out)
and cannot notice a broker disconnect. Why not prefork: forking after CUDA is
initialised breaks CUDA (pytorch#40403). This pool runs every task in the same single
thread of the worker's own process (no fork, one CUDA context), while the main thread
keeps the broker connection, remote control and signal handling alive.

Celery "terminates" a job on `app.control.revoke(id, terminate=True)` and, with
`worker_cancel_long_running_tasks_on_connection_loss`, after a broker disconnect. A
thread cannot be killed, so terminating a job here asks the running chunk to stop at
its next step boundary: it checkpoints (kind `preempt`), commits and enqueues its
continuation, exactly as on SIGTERM.

On RabbitMQ, `NoPrefetchWhileBusy` keeps a busy worker from holding a message it cannot
run yet (see its docstring and workers.app).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from celery import bootsteps, signals
from celery.concurrency.base import apply_target
from celery.concurrency.thread import ApplyResult
from celery.concurrency.thread import TaskPool as ThreadTaskPool
from celery.worker import state

log = logging.getLogger("ptutils.worker")


class TaskPool(ThreadTaskPool):
    """Celery's thread pool (one thread: worker_concurrency = 1) with a cooperative
    terminate_job, that knows whether a job runs and says when it is idle again."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._jobs = 0
        self._jobs_lock = threading.Lock()
        self.on_idle: Callable[[], None] | None = None

    @property
    def busy(self) -> bool:
        """A job was handed to the pool and has not finished."""
        return self._jobs > 0

    def on_apply(self, target: Any, args: Any = None, kwargs: Any = None,
                 callback: Any = None, accept_callback: Any = None, **_: Any) -> ApplyResult:
        with self._jobs_lock:
            self._jobs += 1
        return ApplyResult(self.executor.submit(self._job, target, args, kwargs, callback,
                                                accept_callback))

    def _job(self, *job: Any) -> None:
        try:
            apply_target(*job)
        finally:
            with self._jobs_lock:
                self._jobs -= 1
                idle = self._jobs == 0
            if idle and self.on_idle is not None:
                self.on_idle()

    def terminate_job(self, pid: int | None, signal: int | None = None) -> None:
        """Stop the running task at its next step boundary (it checkpoints first)."""
        from workers.tasks import stop_running_task

        log.warning("stopping the running task at its next step (terminate requested)")
        stop_running_task()


class NoPrefetchWhileBusy(bootsteps.StartStopStep):
    """Consumer step for RabbitMQ: no message waits, unacknowledged, in a busy worker.

    On RabbitMQ a task is acknowledged when it starts (workers.app says why), which
    frees the prefetch window: the broker would push the next message at once, and it
    would wait in this worker, unacknowledged, behind an hour-long chunk, until the
    broker's consumer_timeout cancels the consumer. So this step stops consuming
    (basic.cancel) before a task is handed to the pool, and consumes again once the
    pool is idle. A message that still reaches a busy worker (a delivery right after a
    reconnect) goes back to its queue for an idle worker.

    A message with a countdown (a task that waits, `retry_after`) is held by Celery,
    unacknowledged, in the worker's timer until it is due. A worker that becomes busy
    gives every such message back to its queue at once, and so does a busy worker that
    receives one: held behind a chunk, it would outlive the consumer_timeout (this was
    seen with a 1 s countdown, a 2 s timeout and a loaded machine). Everything here runs
    in the consumer's event-loop thread.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self._pausing = False
        handle = c.on_task_request  # strategies (made at Tasks.start) bind the wrapper

        def on_task_request(req: Any) -> None:
            self._pause(c)
            if getattr(c.pool, "busy", False):
                log.info("%s[%s] reached a busy worker: back to its queue", req.name, req.id)
                req.reject(requeue=True)
                state.task_ready(req)
                return
            handle(req)
            self._return_scheduled(c)

        c.on_task_request = on_task_request

        def on_received(sender: Any = None, request: Any = None, **_: Any) -> None:
            if sender is c and request is not None and request.eta \
                    and getattr(c.pool, "busy", False):
                c.call_soon(self._return_scheduled, c)  # once the strategy has timed it

        self._on_received = on_received  # signals hold it weakly otherwise
        signals.task_received.connect(on_received)

    def start(self, c: Any) -> None:
        """(Re)connected: resume when the pool is idle; pause if a task runs now."""
        if hasattr(c.pool, "on_idle"):
            c.pool.on_idle = lambda: c.call_soon(self._resume, c)
            if c.pool.busy:
                c.call_soon(self._pause, c)  # after the event loop's first consume()

    def _pause(self, c: Any) -> None:
        """basic.cancel every task queue. The cancel waits for the broker's reply, and a
        message delivered meanwhile comes back here: that nested call leaves it be."""
        if self._pausing or c.task_consumer is None:
            return
        self._pausing = True
        try:
            c.task_consumer.cancel()
        except Exception:  # noqa: BLE001 - a lost connection: the consumer restarts
            log.warning("could not stop consuming while a task runs", exc_info=True)
        finally:
            self._pausing = False
        self._return_scheduled(c)

    def _return_scheduled(self, c: Any) -> None:
        """Give every message waiting in this worker's timer (a countdown not yet due)
        back to its queue: an idle worker runs it when it is due."""
        if not getattr(c.pool, "busy", False):
            return
        for req in tuple(state.scheduled_requests):
            entry = req._eta_timer_entry
            if entry is not None and c.timer is not None:
                c.timer.cancel(entry)
            log.info("%s[%s] (due later) waits in its queue, not in a busy worker",
                     req.name, req.id)
            try:
                req.reject(requeue=True)
            finally:
                state.task_ready(req)
                c.qos.decrement_eventually()

    def _resume(self, c: Any) -> None:
        """Consume again once the pool is idle (a message may start a task meanwhile)."""
        if self._pausing or c.task_consumer is None or c.pool.busy:
            return
        self._pausing = True  # a delivery during consume() is handled, not paused on
        try:
            c.task_consumer.consume()
        except Exception:  # noqa: BLE001 - a lost connection: the consumer restarts
            log.warning("could not consume again", exc_info=True)
        finally:
            self._pausing = False
        if c.pool.busy:
            self._pause(c)
