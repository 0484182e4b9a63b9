"""Sending tasks: the queue and priority of a session's messages, and a reachable broker.

Every sender (submit, the task bodies enqueueing successors, reconcile through
`reconciler`) goes through `send`, so a session's messages all take the same route:
Train to the session's train queue (`meta.queue`, default `train`), Eval and Save to
their own queues, all with the session's priority (`meta.priority`). Priorities mean
the same on every broker: 0..9, higher runs sooner (Redis orders its priority lists the
other way round, so the value is mirrored for it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from celery import Celery
from kombu.utils.url import maybe_sanitize_url

from ptutils.errors import BrokerUnavailable
from ptutils.protocol import QUEUES, TASK_NAMES, TRAIN, Task, queue_of
from ptutils.reconcile import Reconciler
from ptutils.store.base import Store
from workers.app import MAX_PRIORITY, is_redis

log = logging.getLogger("ptutils.dispatch")

DEFAULT_PRIORITY = 5
"""Priority of a session submitted without --priority."""

SEND_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5,
                     "interval_max": 1.0}
"""How long a send keeps trying a broker that went away (about 2 s) before it fails."""


@dataclass(frozen=True)
class Route:
    """Where a session's messages go: its train queue and its priority (0..9)."""

    queue: str = QUEUES[TRAIN]
    priority: int = DEFAULT_PRIORITY

    @classmethod
    def of(cls, doc: Mapping[str, Any]) -> Route:
        """The route recorded on a session document at submit time (`meta`)."""
        meta = doc.get("meta") or {}
        return cls(queue_of(doc, TRAIN), int(meta.get("priority", DEFAULT_PRIORITY)))

    def queue_for(self, task: Task) -> str:
        return self.queue if task.kind == TRAIN else QUEUES[task.kind]


def check_priority(priority: int) -> int:
    """`priority` if it is within 0..MAX_PRIORITY; ValueError otherwise."""
    if not 0 <= int(priority) <= MAX_PRIORITY:
        raise ValueError(f"priority must be within 0..{MAX_PRIORITY} (higher runs sooner)")
    return int(priority)


def broker_priority(app: Celery, priority: int) -> int:
    """The message priority that means `priority` on this app's broker."""
    if is_redis(app.conf.broker_url):
        return MAX_PRIORITY - priority
    return priority


def redacted(url: str) -> str:
    """A broker URL with its password masked, for messages and logs."""
    return maybe_sanitize_url(url)


def send(app: Celery, task: Task, route: Route, *, countdown: float | None = None) -> str:
    """Enqueue `task` by name (ids and a step range only); its message id.

    Raises BrokerUnavailable, naming the broker without its password, when the broker
    cannot take the message within SEND_RETRY_POLICY.
    """
    try:
        result = app.send_task(
            TASK_NAMES[task.kind],
            kwargs=task.to_message(),
            queue=route.queue_for(task),
            priority=broker_priority(app, route.priority),
            countdown=countdown,
            retry=True,
            retry_policy=SEND_RETRY_POLICY,
        )
    except Exception as exc:  # noqa: BLE001 - kombu raises transport-specific errors
        raise BrokerUnavailable(
            f"could not send {task} to the broker at {redacted(app.conf.broker_url)}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    log.debug("sent %s to %s", task, route.queue_for(task))
    return str(result.id)


def reconciler(store: Store, app: Celery, **options: Any) -> Reconciler:
    """A Reconciler of `store` that sends through `app` on each session's route and reads
    the broker's queue depths (options: Reconciler's thresholds)."""

    def send_task(doc: dict[str, Any], task: Task) -> None:
        send(app, task, Route.of(doc))

    return Reconciler(store, send=send_task, depth=lambda q: queue_depth(app, q), **options)


def check_broker(app: Celery, timeout: float = 5.0) -> None:
    """Connect to the broker once; BrokerUnavailable (password masked) if it does not answer."""
    url = redacted(app.conf.broker_url)
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
            conn.default_channel  # noqa: B018 - Redis answers a PING here
    except Exception as exc:  # noqa: BLE001 - kombu raises transport-specific errors
        raise BrokerUnavailable(
            f"the broker at {url} cannot be reached ({type(exc).__name__}: {exc}). Start it, "
            "or point --broker / $PTUTILS_BROKER at a running one."
        ) from exc


def queue_depth(app: Celery, queue: str) -> int | None:
    """Messages waiting (not yet delivered) in `queue`; 0 if it does not exist, None on error."""
    try:
        with app.connection_for_write() as conn:
            channel = conn.channel()
            try:
                return int(channel.queue_declare(queue=queue, passive=True).message_count)
            finally:
                _close_quietly(channel)
    except Exception as exc:  # noqa: BLE001 - a missing queue is an error on AMQP
        if _is_not_found(exc):
            return 0
        log.warning("could not read the depth of queue %s: %s", queue, exc)
        return None


def _is_not_found(exc: BaseException) -> bool:
    code = getattr(exc, "code", None) or getattr(exc, "reply_code", None)
    return code == 404 or "NOT_FOUND" in str(exc) or "no queue" in str(exc).lower()


def _close_quietly(channel: Any) -> None:
    try:
        channel.close()
    except Exception:  # noqa: BLE001 - a channel closed by the server (AMQP 404)
        pass
