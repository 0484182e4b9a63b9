"""The Celery app, configured for long GPU tasks (DESIGN §8): `celery -A workers.app ...`.

The broker comes from `$PTUTILS_BROKER` (default `redis://127.0.0.1:6379/0`; `amqp://`
for RabbitMQ), the store from `$PTUTILS_STORE`. Why each setting is what it is:

- msgpack/json only, never pickle: a message cannot make a worker run code (§4.5).
- Redis: `task_acks_late` + `task_reject_on_worker_lost`: a SIGKILLed or OOM-killed
  worker does not acknowledge its task; redeliveries are capped by the session's
  `attempts`.
- RabbitMQ: a task is acknowledged when it starts. RabbitMQ closes the channel of a
  consumer whose delivery stays unacknowledged longer than its `consumer_timeout` (30
  min by default, broker-wide before 3.12), which an acks_late chunk of an hour would
  hit; a per-queue `x-consumer-timeout` needs RabbitMQ >= 3.12, is fixed when a queue is
  first declared (changing it later fails the declare) and still bounds a chunk. Nothing
  relies on the redelivery: the session's lease and `reconcile` requeue the work of a
  worker that dies (DESIGN §4.6), and every task is fenced. The consumer step
  `workers.pool.NoPrefetchWhileBusy` stops consuming while a task runs, so no message
  waits unacknowledged behind a long chunk either.
- `worker_prefetch_multiplier = 1`: no task waits behind a long one on a busy worker.
- One task at a time per worker process, in a thread of that process
  (`workers.pool.TaskPool`): no fork after CUDA init, and remote control (`celery
  inspect active`) keeps answering while a chunk trains.
- Redis `visibility_timeout` (default 6 h, `$PTUTILS_VISIBILITY_TIMEOUT`) above the
  longest chunk, so Redis never hands a running task to a second worker; lost work is
  found through leases by `reconcile`, not through this timeout.
- `worker_cancel_long_running_tasks_on_connection_loss`: after a broker disconnect the
  running chunk (Redis: not acknowledged yet) is stopped at its next step (checkpoint,
  commit, continuation sent): its message can no longer be acknowledged.
- No result backend: the store is the source of truth; messages carry ids only.
- Priorities: 0..9, higher runs sooner, on Redis and RabbitMQ alike (see `dispatch`).
- Beat (`celery -A workers.app beat`) runs `ptutils.reconcile` every
  `$PTUTILS_RECONCILE_EVERY` seconds (default 10) with an in-memory schedule (the
  default persistent scheduler would pickle its state to a shelve file).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from ptutils.protocol import EVAL, QUEUES, SAVE, TASK_NAMES, TRAIN

BROKER_ENV = "PTUTILS_BROKER"
"""Environment variable naming the broker URL."""

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
"""Broker used when neither --broker nor $PTUTILS_BROKER is given."""

VISIBILITY_TIMEOUT = 6 * 3600
"""Seconds Redis waits before redelivering an unacknowledged message: above the
longest chunk (override with $PTUTILS_VISIBILITY_TIMEOUT)."""

RECONCILE_TASK = "ptutils.reconcile"
"""Name of the periodic reconcile task (beat schedules it; any save-queue worker runs it)."""

RECONCILE_EVERY = 10.0
"""Default period of the beat reconcile task, seconds ($PTUTILS_RECONCILE_EVERY)."""

MAX_PRIORITY = 9
"""Priorities run from 0 (lowest) to MAX_PRIORITY (highest)."""

ROUTES = {
    TASK_NAMES[TRAIN]: {"queue": QUEUES[TRAIN]},
    TASK_NAMES[EVAL]: {"queue": QUEUES[EVAL]},
    TASK_NAMES[SAVE]: {"queue": QUEUES[SAVE]},
    RECONCILE_TASK: {"queue": QUEUES[SAVE]},
}
"""Default queue of each task (a session may send its Train tasks to its own queue)."""


def resolve_broker_url(url: str | None = None) -> str:
    """The broker URL to use: the argument, else $PTUTILS_BROKER, else local Redis."""
    return url or os.environ.get(BROKER_ENV) or DEFAULT_BROKER


def is_redis(url: str) -> bool:
    return url.startswith(("redis://", "rediss://", "redis+socket://"))


def acks_late(url: str) -> bool:
    """Acknowledge a task when it ends (Redis), or when it starts (RabbitMQ: see above)."""
    return is_redis(url)


def transport_options(url: str) -> dict[str, Any]:
    """Broker transport options: Redis needs a long visibility timeout and 10 priorities."""
    if not is_redis(url):
        return {}
    return {
        "visibility_timeout": float(
            os.environ.get("PTUTILS_VISIBILITY_TIMEOUT", VISIBILITY_TIMEOUT)
        ),
        "priority_steps": list(range(MAX_PRIORITY + 1)),
        "socket_connect_timeout": 5,
        "socket_keepalive": True,
        "health_check_interval": 10,
    }


def settings(broker_url: str) -> dict[str, Any]:
    """Every Celery setting of the app (module docstring says why)."""
    every = float(os.environ.get("PTUTILS_RECONCILE_EVERY", RECONCILE_EVERY))
    return {
        "broker_url": broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 5,
        "broker_transport_options": transport_options(broker_url),
        "accept_content": ["msgpack", "json"],
        "task_serializer": "msgpack",
        "result_serializer": "msgpack",
        "event_serializer": "json",
        "task_acks_late": acks_late(broker_url),
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_pool": "workers.pool:TaskPool",
        "worker_concurrency": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_ignore_result": True,
        "result_backend": None,
        "task_routes": ROUTES,
        "task_default_queue": QUEUES[TRAIN],
        "task_queue_max_priority": MAX_PRIORITY + 1,
        "beat_scheduler": "celery.beat:Scheduler",
        "beat_schedule": {
            "ptutils-reconcile": {"task": RECONCILE_TASK, "schedule": every,
                                  "options": {"expires": every}},
        },
    }


def make_app(broker_url: str | None = None) -> Celery:
    """A Celery app with ptutils' settings; tasks are sent by name (protocol.TASK_NAMES)."""
    # `celery -b URL` sets $CELERY_BROKER_URL, which Celery prefers to any setting: derive
    # the settings (acknowledgement, transport options) from the broker it will use.
    url = os.environ.get("CELERY_BROKER_URL") or resolve_broker_url(broker_url)
    app = Celery("ptutils", include=["workers.tasks"], set_as_current=False)
    app.conf.update(settings(url))
    if not acks_late(url):
        from workers.pool import NoPrefetchWhileBusy

        app.steps["consumer"].add(NoPrefetchWhileBusy)
    return app


app = make_app()
"""The app `celery -A workers.app worker|inspect|beat` finds (broker from $PTUTILS_BROKER)."""
