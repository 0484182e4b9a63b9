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
"""

from __future__ import annotations

import logging

from celery.concurrency.thread import TaskPool as ThreadTaskPool

log = logging.getLogger("ptutils.worker")


class TaskPool(ThreadTaskPool):
    """Celery's thread pool (one thread: worker_concurrency = 1) with a cooperative
    terminate_job."""

    def terminate_job(self, pid: int | None, signal: int | None = None) -> None:
        """Stop the running task at its next step boundary (it checkpoints first)."""
        from workers.tasks import stop_running_task

        log.warning("stopping the running task at its next step (terminate requested)")
        stop_running_task()
