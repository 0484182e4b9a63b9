"""`ptutils reconcile`: requeue lost work through the Celery broker (DESIGN §4.1, §4.6).

The rules live in `ptutils.reconcile` (store-side decisions, no Celery); the broker side
(sending on a session's route, queue depths) in `workers.dispatch.reconciler`. This
module is what the CLI and users call: one pass, or a loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from celery import Celery

from ptutils.reconcile import (
    COMPLETED_EVERY,
    COMPLETED_WITHIN,
    EVAL_STALL_AFTER,
    LEASE_SLACK,
    STALL_AFTER,
    Reconciler,
    Requeue,
)
from ptutils.store.base import Store
from workers.dispatch import reconciler

__all__ = [
    "COMPLETED_EVERY",
    "COMPLETED_WITHIN",
    "EVAL_STALL_AFTER",
    "LEASE_SLACK",
    "STALL_AFTER",
    "Reconciler",
    "Requeue",
    "reconcile_loop",
    "reconcile_once",
]


def reconcile_once(store: Store, app: Celery, **options: Any) -> list[Requeue]:
    """One full pass over `store`, sending through the Celery `app` (options: Reconciler's)."""
    return reconciler(store, app, **options).run()


def reconcile_loop(
    store: Store,
    app: Celery,
    every: float,
    *,
    stop: threading.Event | None = None,
    on_pass: Callable[[list[Requeue]], None] | None = None,
    **options: Any,
) -> None:
    """A pass every `every` seconds until `stop` is set; errors are logged.

    Completed sessions (a missing final Eval) are listed every `completed_every` seconds
    only; in between, the loop follows the sessions it saw finish.
    """
    reconciler(store, app, **options).loop(every, stop=stop, on_pass=on_pass)
