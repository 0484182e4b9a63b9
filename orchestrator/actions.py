"""`ptutils pause|resume|requeue` (and the dashboard's buttons): stop and restart
sessions on the Celery cluster, fenced by compare-and-set on the session document.

- pause: a queued or running session becomes `paused`. Like `cancel`, the token changes
  (every queued message is fenced out: a Train of a paused session is a logged no-op)
  and the lease is dropped, so the worker running a chunk fails its next lease renewal
  (within a third of its lease TTL), stops at the next step and discards that chunk.
  Nothing stored is lost: the session stays at its last verified checkpoint, and that
  chunk is trained again, from the same State, on resume (exact resume: the result is
  bit-identical to a run never paused). Reconcile leaves paused sessions alone.
- resume: a paused session is queued again with a new token; its next Train (and any
  Eval whose result was lost with it) is sent on the session's route (`meta.queue`,
  `meta.priority`, as submit recorded them), planned by `ptutils.plan` as everywhere.
- requeue: a failed, cancelled or lost (lease expired) session runs again from its last
  verified checkpoint with fresh attempts (as `ptutils run --resume` resets it), sent to
  the cluster the same way.

Only sessions submitted to the cluster (`ptutils submit`, a search on the cluster: they
record a train queue) can be resumed or requeued here: one that `ptutils run` started
is continued with `ptutils run --resume NAME`, which the refusal says. The broker is
checked before the session is touched; a send that fails afterwards puts the session
back as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery

from ptutils.errors import BrokerUnavailable, OrchestratorError
from ptutils.plan import lost_eval_steps, train_task
from ptutils.protocol import EVAL, Task
from ptutils.store.base import SessionStatus, Store, event, new_id, with_event
from workers.dispatch import Route, check_broker, send

ATTEMPTS = 20
"""Compare-and-set attempts against a session that keeps moving (a chunk committing)."""

ACTIVE = (str(SessionStatus.QUEUED), str(SessionStatus.RUNNING))
REQUEUABLE = (str(SessionStatus.FAILED), str(SessionStatus.CANCELLED))


class ActionRefused(OrchestratorError):
    """The session is not in a state the action applies to (the message says why and
    what to do instead); nothing was changed."""


def pause(store: Store, ref: str) -> dict[str, Any]:
    """Pause a queued or running cluster session (see the module's docstring); the new
    document. ActionRefused for a finished, already paused or `ptutils run` session."""
    for _ in range(ATTEMPTS):
        doc = store.get_session(ref)
        status = str(doc["status"])
        if status == str(SessionStatus.PAUSED):
            raise ActionRefused(f"{_named(doc)} is paused already: "
                                f"{_command(store, doc, 'resume')} continues it")
        if status not in ACTIVE:
            raise ActionRefused(f"{_named(doc)} is {status}: only a queued or running "
                                "session can be paused" + _requeue_hint(store, doc))
        _require_cluster(doc, "paused", "press Ctrl-C in that `ptutils run` to pause it")
        lease = doc.get("lease") or {}
        held = f" (its chunk on {lease['worker']} is discarded)" if lease.get("worker") else ""
        new = store.cas_session(
            doc["_id"],
            {"token": doc["token"], "status": status},
            {"status": str(SessionStatus.PAUSED), "lease": None, "token": new_id(),
             "events": with_event(doc, event(
                 "paused", f"paused at step {doc['step']}{held}", store.now()))},
        )
        if new is not None:
            return new
    raise _kept_moving("pause", ref)


def resume(store: Store, ref: str, app: Celery) -> dict[str, Any]:
    """Queue a paused cluster session again and send its next task(s); the new document.
    ActionRefused unless it is paused; BrokerUnavailable (nothing changed) if the broker
    does not answer."""

    def check(doc: dict[str, Any]) -> None:
        status = str(doc["status"])
        if status == str(SessionStatus.PAUSED):
            return
        if status in REQUEUABLE:
            raise ActionRefused(f"{_named(doc)} is {status}, not paused: "
                                f"{_command(store, doc, 'requeue')} runs it again from its "
                                "last checkpoint")
        raise ActionRefused(f"{_named(doc)} is {status}, not paused: nothing to resume")

    return _send_again(store, ref, app, check, "resumed")


def requeue(store: Store, ref: str, app: Celery) -> dict[str, Any]:
    """Run a failed, cancelled or lost cluster session again from its last verified
    checkpoint with fresh attempts; the new document. ActionRefused for a completed,
    paused, queued or live one; BrokerUnavailable (nothing changed) if the broker does
    not answer."""

    def check(doc: dict[str, Any]) -> None:
        status = str(doc["status"])
        if status in REQUEUABLE:
            return
        if status == str(SessionStatus.PAUSED):
            raise ActionRefused(f"{_named(doc)} is paused: {_command(store, doc, 'resume')} "
                                "continues it")
        if status == str(SessionStatus.COMPLETED):
            raise ActionRefused(f"{_named(doc)} is completed: nothing to run again")
        lease = doc.get("lease") or {}
        if lease and float(lease.get("expires", 0)) <= store.now():
            return  # lost: its worker died
        if lease:
            raise ActionRefused(f"{_named(doc)} is running on {lease.get('worker')}: pause "
                                "or cancel it first")
        raise ActionRefused(f"{_named(doc)} is queued: its next task waits in queue "
                            f"{Route.of(doc).queue} (`ptutils reconcile` sends it again "
                            "if that message was lost)")

    return _send_again(store, ref, app, check, "requeued")


def _send_again(store: Store, ref: str, app: Celery,
                check: Callable[[dict[str, Any]], None], verb: str) -> dict[str, Any]:
    """The shared transition of resume and requeue: `check` the session, check the
    broker, CAS it to queued (new token, no lease, fresh attempts, no error), send what
    the plan says comes next; undone if a send fails."""
    doc = store.get_session(ref)
    check(doc)
    _require_cluster(doc, verb, f"continue it with {_command(store, doc, 'resume')}")
    check_broker(app)
    for _ in range(ATTEMPTS):
        now = store.now()
        before = {"status": doc["status"], "error": doc.get("error"),
                  "attempts": doc.get("attempts", 0)}
        new = store.cas_session(
            doc["_id"],
            {"token": doc["token"], "status": doc["status"]},
            {"status": str(SessionStatus.QUEUED), "token": new_id(), "lease": None,
             "attempts": 0, "error": None, "requeued_at": now,
             "events": with_event(doc, event(
                 verb, f"{verb} at step {doc['step']}", now))},
        )
        if new is not None:
            break
        doc = store.get_session(doc["_id"])
        check(doc)
    else:
        raise _kept_moving(verb.removesuffix("d"), ref)
    tasks = [Task(EVAL, new["_id"], new["token"], step=n) for n in lost_eval_steps(store, new)]
    nxt = train_task(new)
    tasks += [nxt] if nxt is not None else []
    route = Route.of(new)
    try:
        for task in tasks:
            send(app, task, route)
    except BrokerUnavailable:
        store.cas_session(new["_id"], {"token": new["token"]},
                          {**before, "token": new_id(), "requeued_at": doc.get("requeued_at")})
        raise
    return new


def _require_cluster(doc: dict[str, Any], verb: str, instead: str) -> None:
    """ActionRefused for a session `ptutils run` started (it records no train queue)."""
    if not (doc.get("meta") or {}).get("queue"):
        raise ActionRefused(f"{_named(doc)} was started by `ptutils run`, not submitted to "
                            f"the cluster, so it cannot be {verb} here: {instead}")


def _requeue_hint(store: Store, doc: dict[str, Any]) -> str:
    if str(doc["status"]) in REQUEUABLE:
        return f" ({_command(store, doc, 'requeue')} runs it again from its last checkpoint)"
    return ""


def _command(store: Store, doc: dict[str, Any], verb: str) -> str:
    """The command that does `verb` (resume, requeue) to the session: `ptutils VERB NAME`
    for a cluster session, `ptutils run --resume NAME` for one `ptutils run` started."""
    if (doc.get("meta") or {}).get("queue"):
        return f"`ptutils {verb} {doc['name']}`"
    return f"`ptutils run --resume {doc['name']} --store {store.url}`"


def _named(doc: dict[str, Any]) -> str:
    return f"session {doc['name']!r}"


def _kept_moving(what: str, ref: str) -> OrchestratorError:
    return OrchestratorError(
        f"could not {what} session {ref!r}: it changed {ATTEMPTS} times while trying")
