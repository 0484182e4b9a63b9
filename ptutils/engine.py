"""The task bodies: Train[s, s+K), Eval(n), Save(n) against a Store (DESIGN §6).

`ptutils run` calls them in-process; Celery workers call the very same methods. Each
is fenced (it acts only if the session is at the step and token it was issued for)
and idempotent (a stale or duplicate delivery is a logged no-op).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ptutils import registry
from ptutils.chunks import Live, run_chunks, settle
from ptutils.ckpt_process import SharedSnapshot
from ptutils.ckpt_process import enabled as writer_process_enabled
from ptutils.ckpt_writer import CheckpointWriter, HostSnapshot
from ptutils.errors import CheckpointCorrupt, CheckpointNotFound, PtutilsError, StoreError
from ptutils.group.slots import LocalSlots, Slots
from ptutils.group.train import train_group
from ptutils.module import check_types
from ptutils.plan import pending_eval_steps, plan_of, train_task
from ptutils.protocol import EVAL, SAVE, TRAIN, Task
from ptutils.retention import (
    GC_CHORE,
    GC_EVERY_S,
    apply_retention,
    collect_garbage,
    retained_steps,
)
from ptutils.rng import get_rng_state, isolate_library_rngs, set_rng_state
from ptutils.session import Session, apply_determinism
from ptutils.state import Statistic
from ptutils.store.base import (
    GC_GRACE_S,
    SessionStatus,
    StatPoint,
    Store,
    event,
    new_id,
    with_event,
)

log = logging.getLogger("ptutils.engine")

__all__ = [
    "Engine",
    "Outcome",
    "ProgressFn",
    "ResizeRefused",
    "build_session",
    "check_resize",
    "deliver_evals",
    "retained_steps",
]

ProgressFn = Callable[[str, int, float], None]
"""progress(session_id, step, loss), called at every log interval."""

UNLOADABLE = (CheckpointCorrupt, CheckpointNotFound)
"""A checkpoint that cannot be loaded: the session goes back to an intact one."""

ROLLBACK_ATTEMPTS = 5
"""Compare-and-set attempts of an Eval's rollback against a session that keeps moving."""

HANG_TIMEOUT_ENV = "PTUTILS_HANG_TIMEOUT"
"""Seconds a rank of a group session may go without finishing a step (default: the
lease TTL); it is then declared hung and the group is restarted from its checkpoint."""


class ResizeRefused(PtutilsError):
    """A checkpoint written with another world_size, resumed without --allow-resize."""


@dataclass
class Outcome:
    """What a task did: `ran` False for a fenced no-op; successors to enqueue."""

    task: Task
    ran: bool
    reason: str = "ok"
    step: int | None = None
    successors: list[Task] = field(default_factory=list)
    retry_after: float | None = None
    failed: bool = False


@dataclass
class _Warm:
    session_id: str
    config_hash: str
    step: int
    session: Session
    rng: dict[str, Any]


class Engine:
    """Runs tasks of any session against one Store, keeping the last session warm."""

    def __init__(
        self,
        store: Store,
        *,
        worker: str = "local",
        lease_ttl: float = 60.0,
        progress: ProgressFn | None = None,
        stop_flag: threading.Event | None = None,
        gc_every: float = GC_EVERY_S,
        gc_grace: float = GC_GRACE_S,
        slots: Slots | None = None,
        store_url: str | None = None,
        hang_timeout: float | None = None,
        chunks_per_task: int = 1,
        on_commit: Callable[[list[Task]], None] | None = None,
    ) -> None:
        """`gc_every`: seconds between store-wide garbage collections (run from Save);
        `gc_grace`: the age below which nothing unreferenced is collected.

        A session with `session.world_size` N > 1 trains on N rank processes
        (ptutils.group): `slots` hands out this node's devices (default: N CPU slots,
        never refused); `store_url` is how the ranks open the store (default
        `store.url`; give it when that is redacted, a MongoDB URL with a password);
        `hang_timeout`: seconds a rank may go without a step before the group is
        killed and retried (default $PTUTILS_HANG_TIMEOUT, else `lease_ttl`).

        `chunks_per_task` > 1: a Train task runs up to that many chunks of its session
        while each chunk's checkpoint is written in the background (ptutils.chunks);
        `on_commit(tasks)` gets the Eval/Save tasks of each chunk committed before the
        task ends (without it they come back in the Outcome's successors)."""
        self.store = store
        self.worker = worker
        self.lease_ttl = lease_ttl
        self.progress = progress
        self.stop_flag = stop_flag or threading.Event()
        self.gc_every = gc_every
        self.gc_grace = gc_grace
        self.slots: Slots = slots if slots is not None else LocalSlots()
        self.store_url = store_url
        env_hang = os.environ.get(HANG_TIMEOUT_ENV)
        self.hang_timeout = (
            hang_timeout if hang_timeout is not None
            else float(env_hang) if env_hang else lease_ttl
        )
        self.chunks_per_task = max(1, int(chunks_per_task))
        self.on_commit = on_commit
        self.writer = CheckpointWriter(_writer_url(store, store_url))
        self.snapshot: HostSnapshot = (SharedSnapshot() if writer_process_enabled()
                                       else HostSnapshot())
        self._warm: _Warm | None = None
        isolate_library_rngs()  # the store's client is imported by now

    def adopt(self, doc: dict[str, Any], session: Session, rng: dict[str, Any]) -> None:
        """Use an already built session (at its doc's step) as the warm one."""
        self._warm = _Warm(doc["_id"], doc["config_hash"], int(doc["step"]), session, rng)

    # --- dispatch -------------------------------------------------------------------
    def run(self, task: Task) -> Outcome:
        handler = {TRAIN: self.train, EVAL: self.eval, SAVE: self.save}[task.kind]
        return handler(task)

    # --- Train ----------------------------------------------------------------------
    def train(self, task: Task) -> Outcome:
        """Train[start, stop): lease, load, run, checkpoint, CAS, successors."""
        doc = self.store.get_session(task.session)
        stale = self._fence(doc, task)
        if stale:
            log.info("%s: skipped (%s)", task, stale)
            return Outcome(task, False, stale)
        waiting = self._eval_missing(doc, task.start)
        if waiting is not None:  # checked before the lease: waiting is not an attempt
            return Outcome(task, False, f"waiting for Eval({waiting})", retry_after=1.0)
        plan = plan_of(doc)
        if doc.get("attempts", 0) >= plan.max_attempts:
            return self._fail(
                doc,
                task,
                PtutilsError(
                    f"Train[{task.start},{task.stop}) was started {doc['attempts']} times and never "
                    f"finished (session.max_attempts={plan.max_attempts}): its worker keeps dying "
                    "(out of memory? a crash in native code?). See the worker logs."
                ),
            )
        doc = self.store.acquire_lease(
            task.session, task.token, self.worker, self.lease_ttl,
            also={"attempts": int(doc.get("attempts", 0)) + 1,
                  "status": str(SessionStatus.RUNNING)},
        )  # fmt: skip
        if doc is None:
            return Outcome(task, False, "lease held by another worker")
        live = Live(doc, task)
        with _Heartbeat(self.store, task.session, self.worker, self.lease_ttl) as hb:
            try:
                if plan.world_size > 1:
                    return train_group(self, doc, task, hb)
                return self._train_leased(doc, task, hb, live)
            except StoreError as exc:
                return self._store_failed(live, exc)
            except Exception as exc:  # noqa: BLE001 - recorded on the session, worker stays up
                settle(self, live)  # a write in flight commits its (earlier) checkpoint
                return self._fail(live.doc, live.task, exc)

    def _store_failed(self, live: Live, exc: StoreError) -> Outcome:
        """A store error in a chunk: raised for redelivery of the task, unless this task
        already committed a chunk (its message is stale then): that continuation is returned."""
        settle(self, live)
        self._warm = None
        self._release(live.task)
        if not live.committed:
            raise exc
        return Outcome(live.origin, True, f"store error ({exc}); continuing from step "
                       f"{live.task.start}", step=live.task.start,
                       successors=[*live.successors, live.task])

    def _fence(self, doc: dict[str, Any], task: Task) -> str | None:
        if SessionStatus(doc["status"]).finished:
            return f"session is {doc['status']}"
        if doc["status"] == str(SessionStatus.PAUSED):
            return "session is paused"
        if int(doc["step"]) != task.start or doc["token"] != task.token:
            return f"stale: session is at step {doc['step']}, task was for {task.start}"
        return None

    def _train_leased(
        self, doc: dict[str, Any], task: Task, hb: _Heartbeat, live: Live
    ) -> Outcome:
        try:
            session = self._session_at(doc, task.start)
        except UNLOADABLE as exc:
            return self._roll_back(doc, task, task.start, exc)
        wait = deliver_evals(self.store, doc, session, task.start)
        if wait is not None:
            self._unlease_waiting(doc, task)
            return Outcome(task, False, f"waiting for Eval({wait})", retry_after=1.0)
        self.store.delete_statistics(task.session, after_step=task.start)
        reason = session.callbacks.stop_reason
        if reason:
            return self._finish_early(doc, task, session, reason)
        apply_determinism(session.plan)
        return run_chunks(self, session, live, hb, _Either(self.stop_flag, hb.stop),
                          self.progress_of(task.session))

    def progress_of(self, session_id: str) -> Callable[[int, float], None] | None:
        """The Trainer's progress(step, loss) reporting to `self.progress` for a session."""
        report = self.progress
        if report is None:
            return None
        return lambda step, loss: report(session_id, step, loss)

    def _commit(
        self, doc: dict[str, Any], task: Task, reached: int, *, keep_lease: bool = False
    ) -> dict[str, Any] | None:
        """Move the session from the chunk's start to `reached`, whose checkpoint is in
        the store (CAS on step, token and lease); the new document, or None if fenced out.
        `keep_lease`: this worker goes on with the next chunk (a background write)."""
        return self.store.cas_session(task.session,
                                      *self.commit_change(doc, task, reached, keep_lease))

    def commit_change(
        self, doc: dict[str, Any], task: Task, reached: int, keep_lease: bool = False
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(expect, update) of `_commit`'s compare-and-set: plain values, so a writer
        process can run it."""
        plan = plan_of(doc)
        kind = plan.checkpoint_kind(reached, task.stop)
        done = reached >= plan.total_steps
        expect = {"step": task.start, "token": task.token, "lease.worker": self.worker}
        return expect, {
            "step": reached,
            "token": new_id(),
            **({} if keep_lease else {"lease": None}),
            "attempts": 0,
            "checkpoint": {"step": reached, "kind": str(kind)},
            "status": str(SessionStatus.COMPLETED if done else SessionStatus.RUNNING),
        }

    def _unlease_waiting(self, doc: dict[str, Any], task: Task) -> None:
        """Release the lease of a chunk that waits (an Eval, device slots): not an attempt."""
        self.store.cas_session(
            task.session,
            {"token": task.token, "lease.worker": self.worker},
            {"lease": None, "attempts": max(0, int(doc.get("attempts", 1)) - 1)},
        )

    def _eval_missing(self, doc: dict[str, Any], start: int) -> int | None:
        """The latest Eval step a chunk from `start` needs, if its result is not in yet."""
        steps = pending_eval_steps(doc, start)
        if not steps:
            return None
        n = steps[-1]
        done = self.store.query_statistics(doc["_id"], phase="eval", step_min=n, step_max=n)
        return None if done else n

    def _session_at(self, doc: dict[str, Any], step: int) -> Session:
        """The session's modules at `step`: the warm ones, or rebuilt and restored."""
        warm = self._warm
        if (
            warm is not None
            and warm.session_id == doc["_id"]
            and warm.config_hash == doc["config_hash"]
            and warm.step == step
        ):
            set_rng_state(warm.rng)
            return warm.session
        self._warm = None
        session = _session_of(doc)
        if step > 0 or doc.get("checkpoint"):
            ckpt = self.store.get_checkpoint(doc["_id"], step)
            state = self.store.load_state(ckpt)
            session.load_state_dict(state)
            _check_torch_version(state, doc)
            check_resize(session, doc, step)
        return session

    def _remember(self, doc: dict[str, Any], session: Session) -> None:
        self._warm = _Warm(doc["_id"], doc["config_hash"], session.step, session, get_rng_state())

    def _finish_early(
        self, doc: dict[str, Any], task: Task, session: Session | None, reason: str
    ) -> Outcome:
        new = self.store.cas_session(
            task.session,
            {"token": task.token, "lease.worker": self.worker},
            {
                "status": str(SessionStatus.COMPLETED),
                "lease": None,
                "token": new_id(),
                "meta.stopped": reason,
            },
        )
        self._warm = None
        log.info("%s: %s", task, reason)
        return Outcome(task, new is not None, reason, step=task.start)

    def _release(self, task: Task) -> None:
        try:
            self.store.release_lease(task.session, self.worker)
        except StoreError:
            log.warning("could not release the lease of %s", task.session)

    def _fail(self, doc: dict[str, Any], task: Task, exc: BaseException) -> Outcome:
        """Record the error on the session (status failed) instead of crashing in a loop."""
        self._warm = None
        message = f"{type(exc).__name__}: {exc}"
        tb = getattr(exc, "remote_traceback", "") or "".join(traceback.format_exception(exc))
        log.error("%s failed: %s", task, message)
        if task.kind != TRAIN and SessionStatus(doc["status"]).finished:
            return Outcome(task, False, message, failed=True)
        # An Eval/Save runs beside the next Train chunk, so the session's token has
        # usually moved on: fail it whatever its token, and fence that chunk out.
        fenced = {"token": task.token} if task.kind == TRAIN else {"status": doc["status"]}
        now = self.store.now()
        self.store.cas_session(
            task.session,
            fenced,
            {
                **({} if task.kind == TRAIN else {"token": new_id()}),
                "status": str(SessionStatus.FAILED),
                "lease": None,
                "error": {
                    "message": message,
                    "type": type(exc).__name__,
                    "traceback": tb,
                    "task": str(task),
                    "worker": self.worker,
                    "time": now,
                },
                "events": with_event(doc, event("failed", f"{task}: {message}", now)),
            },
        )
        return Outcome(task, False, message, failed=True)

    # --- Eval -----------------------------------------------------------------------
    def eval(self, task: Task) -> Outcome:
        """Eval(n): metrics of the checkpoint at n, as eval statistics; idempotent."""
        doc = self.store.get_session(task.session)
        if int(doc["step"]) < task.step:
            reason = f"stale: session went back to step {doc['step']}, before {task.step}"
            return Outcome(task, False, reason, step=task.step)
        done = self.store.query_statistics(
            task.session, phase="eval", step_min=task.step, step_max=task.step
        )
        if done:
            return Outcome(task, False, "already evaluated", step=task.step)
        saved_rng = get_rng_state()
        try:
            try:
                metrics = self._evaluate(doc, task.step)
            except UNLOADABLE as exc:
                return self._roll_back(doc, task, task.step, exc)
        except StoreError:
            raise  # a store hiccup (retried already): redelivered, not the session's fault
        except Exception as exc:  # noqa: BLE001 - recorded on the session, worker stays up
            return self._fail(doc, task, exc)
        finally:
            set_rng_state(saved_rng)
        now = time.time()
        self.store.write_statistics(
            task.session, [StatPoint("eval", task.step, k, v, now) for k, v in metrics.items()]
        )
        for ckpt in self.store.list_checkpoints(task.session):
            if ckpt["step"] == task.step:
                self.store.update_checkpoint(
                    task.session,
                    task.step,
                    ckpt["kind"],
                    {"metrics": {**ckpt.get("metrics", {}), **metrics}},
                )
        return Outcome(task, True, "ok", step=task.step)

    def _evaluate(self, doc: dict[str, Any], step: int) -> dict[str, float]:
        warm = self._warm
        if warm is not None and warm.session_id == doc["_id"] and warm.step == step:
            session = warm.session
        else:
            session = _session_of(doc)
            session.load_state_dict(
                self.store.load_state(self.store.get_checkpoint(doc["_id"], step))
            )
        return session.evaluator.evaluate(session.model, session.data)

    # --- Save -----------------------------------------------------------------------
    def save(self, task: Task) -> Outcome:
        """Save(n): mark best/final checkpoints, apply retention, delete dropped blobs."""
        doc = self.store.get_session(task.session)
        dropped = apply_retention(self.store, doc, grace=self.gc_grace)
        self._collect_garbage()
        return Outcome(task, True, f"dropped {dropped}", step=task.step)

    def _collect_garbage(self) -> None:
        """Store-wide garbage collection, at most every `gc_every` s across all workers.
        A failure is logged, never a failed Save: the next claim tries again."""
        try:
            if self.store.claim_periodic(GC_CHORE, self.gc_every):
                collect_garbage(self.store, older_than=self.gc_grace)
        except StoreError as exc:
            log.warning("garbage collection failed (%s); a later Save tries again", exc)

    # --- corrupt checkpoints --------------------------------------------------------
    def _roll_back(
        self, doc: dict[str, Any], task: Task, bad_step: int, exc: StoreError
    ) -> Outcome:
        """The checkpoint at `bad_step` does not load: flag it, and move the session back
        to the newest intact checkpoint before it (step 0 if none), with an event."""
        sid = doc["_id"]
        for ckpt in self.store.list_checkpoints(sid):
            if ckpt["step"] == bad_step and not ckpt.get("corrupt"):
                self.store.mark_corrupt(ckpt, str(exc))
        target, session, rng = self._intact_before(doc, bad_step)
        step = 0 if target is None else int(target["step"])
        what = "is missing" if isinstance(exc, CheckpointNotFound) else "is corrupt"
        if target is None and doc.get("init"):  # a warm start's step 0 is not the seed's
            return self._fail(doc, task, CheckpointCorrupt(
                f"checkpoint at step {bad_step} {what} ({exc}) and so is every one before "
                "it, down to the warm start's `init` checkpoint at step 0, which the config "
                "cannot rebuild; start the session again (ptutils submit / run)"))
        message = f"checkpoint at step {bad_step} {what} ({exc}); the session resumes from " + (
            f"the intact checkpoint at step {step} ({target['kind']})"
            if target is not None
            else "step 0 (no intact checkpoint before it; config and seed rebuild step 0)"
        )
        new = self._commit_rollback(doc, task, bad_step, target, message)
        if new is None:
            self._warm = None
            return Outcome(task, False, f"checkpoint at step {bad_step} {what}; not rolled "
                           "back (the session moved on or ended meanwhile)")
        self.store.delete_statistics(sid, after_step=step)
        self._warm = _Warm(sid, new["config_hash"], step, session, rng)
        log.warning("%s: %s", task, message)
        nxt = train_task(new)
        return Outcome(task, False, f"rolled back to step {step}: checkpoint at step "
                       f"{bad_step} {what}", step=step, successors=[nxt] if nxt else [])

    def _intact_before(
        self, doc: dict[str, Any], bad_step: int
    ) -> tuple[dict[str, Any] | None, Session, dict[str, Any]]:
        """(checkpoint, session restored from it, its RNG state) of the newest intact
        checkpoint before `bad_step`; (None, the session at step 0, ...) if none is."""
        cands = [
            c
            for c in self.store.list_checkpoints(doc["_id"])
            if c["step"] < bad_step and not c.get("corrupt")
        ]
        cands.sort(key=lambda c: (c["step"], c.get("created") or 0), reverse=True)
        for ckpt in cands:
            try:
                state = self.store.load_state(ckpt)
            except CheckpointCorrupt as exc:
                self.store.mark_corrupt(ckpt, str(exc))
                continue
            session = _session_of(doc)
            session.load_state_dict(state)
            _check_torch_version(state, doc)
            return ckpt, session, get_rng_state()
        return None, _session_of(doc), get_rng_state()

    def _commit_rollback(
        self,
        doc: dict[str, Any],
        task: Task,
        bad_step: int,
        target: dict[str, Any] | None,
        message: str,
    ) -> dict[str, Any] | None:
        """CAS the session back to `target`. A Train holds the lease and its fence; an
        Eval runs beside the session's chunks, so it expects the step and token it read
        and reads again if a chunk committed meanwhile."""
        step = 0 if target is None else int(target["step"])
        for _ in range(ROLLBACK_ATTEMPTS):
            status = SessionStatus(doc["status"])
            if int(doc["step"]) < bad_step or status in (
                SessionStatus.FAILED,
                SessionStatus.CANCELLED,
            ):
                return None  # rolled back by someone else, or ended: leave it
            if task.kind == TRAIN:
                expect = {"step": task.start, "token": task.token, "lease.worker": self.worker}
            else:
                expect = {"step": doc["step"], "token": doc["token"]}
            keep_paused = status == SessionStatus.PAUSED
            new = self.store.cas_session(doc["_id"], expect, {
                "step": step,
                "token": new_id(),
                "lease": None,
                "attempts": 0,
                "checkpoint": None if target is None else {"step": step, "kind": target["kind"]},
                "status": str(SessionStatus.PAUSED if keep_paused else SessionStatus.RUNNING),
                "events": with_event(doc, event("rollback", message, self.store.now())),
            })  # fmt: skip
            if new is not None or task.kind == TRAIN:
                return new
            doc = self.store.get_session(doc["_id"])
        return None


def build_session(
    config: dict[str, Any], code: list[dict[str, Any]] | None = None, *, place: bool = True
) -> Session:
    """Build a Session from a stored config and its stored session code (`doc["code"]`).

    In a registry scope of its own: `imports:` are checked against this machine's
    operator policy (ptutils.policy), the session's files are loaded only if the
    operator trusts session code (or this process read them from its own disk, as
    `ptutils run` does), a path is refused (a stored config names files by content), and
    every `type:` is resolved before the first object is built. The session's modules
    are dropped on return, so the next session never sees them.
    """
    with registry.session_scope():
        registry.allow_imports(config.get("imports") or [], code=code, from_disk=False)
        check_types(config)
        return Session.create(config, place=place)


def deliver_evals(store: Store, doc: dict[str, Any], session: Session, start: int) -> int | None:
    """Feed due eval results to the callbacks in step order; a step still missing."""
    for n in pending_eval_steps(doc, start):
        if n <= session.evals_seen:
            continue
        points = store.query_statistics(doc["_id"], phase="eval", step_min=n, step_max=n)
        if not points:
            return n
        session.callbacks.fire("on_eval_end", n, {p["name"]: p["value"] for p in points})
        session.evals_seen = n
    return None


def stat_points(stats: list[Statistic]) -> list[StatPoint]:
    """Train statistics as the store's points."""
    return [StatPoint(s.phase, s.step, s.name, s.value, s.time) for s in stats]


def check_resize(session: Session, doc: dict[str, Any], step: int) -> None:
    """ResizeRefused if the State just loaded (at `step` > 0) was written by another
    world_size than the session's, unless the session allows it (`allow_resize`)."""
    saved, now = session.saved_world_size(), session.plan.world_size
    if saved == now or step == 0 or doc.get("allow_resize"):
        return
    raise ResizeRefused(
        f"session {doc.get('name')!r} was checkpointed at step {step} by {saved} rank(s), "
        f"and session.world_size is now {now}: the per-rank batches and the order of the "
        "gradient sums change, so the run would no longer be bit-identical to one that "
        f"kept {saved}. Resume with `ptutils run --resume {doc.get('name')} "
        "--allow-resize` to accept that (the data position is global: no sample is "
        "skipped or repeated), or set session.world_size back to "
        f"{saved}."
    )


_PLAIN_STORES = {"ptutils.store.local.LocalStore", "ptutils.store.mongo.MongoStore"}
"""Stores a writer process opens again from their URL alone."""


def _writer_url(store: Store, store_url: str | None) -> str | None:
    """The URL the checkpoint writer process opens `store` by; None for a store it could
    not rebuild from one (a subclass with behaviour of its own, or a MongoDB URL whose
    password was redacted): its writes stay in this process."""
    kind = type(store)
    if f"{kind.__module__}.{kind.__qualname__}" not in _PLAIN_STORES:
        return None
    url = store_url or getattr(store, "url", None)
    if url is not None and url.startswith("mongodb"):
        from ptutils.store.mongo_retry import is_redacted  # pymongo: loaded for this store

        return None if is_redacted(url) else url
    return url


def _session_of(doc: dict[str, Any]) -> Session:
    """A fresh Session of a stored session document (at step 0)."""
    return build_session(doc["config"], doc.get("code"))


def _check_torch_version(state: dict[str, Any], doc: dict[str, Any]) -> None:
    import torch

    saved = state.get("torch_version")
    if saved and saved != torch.__version__:
        log.warning(
            "session %s was checkpointed with torch %s; this worker has %s: results "
            "may differ bit-wise",
            doc.get("name"),
            saved,
            torch.__version__,
        )


class _Heartbeat:
    """Renews the lease every ttl/3 in a thread; a lost lease stops the chunk."""

    def __init__(self, store: Store, session_id: str, worker: str, ttl: float) -> None:
        self.store, self.session_id, self.worker, self.ttl = store, session_id, worker, ttl
        self.stop = threading.Event()
        self.lost = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="ptutils-heartbeat")

    def _beat(self) -> None:
        while not self._done.wait(self.ttl / 3):
            try:
                if not self.store.renew_lease(self.session_id, self.worker, self.ttl):
                    self.lost = True
                    self.stop.set()
                    return
            except Exception:  # noqa: BLE001 - a transient store error: try again next beat
                log.warning("lease renewal of %s failed; retrying", self.session_id)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)


class _Either:
    """Set when either event is set (preemption, or a lost lease)."""

    def __init__(self, a: threading.Event, b: threading.Event) -> None:
        self.a, self.b = a, b

    def is_set(self) -> bool:
        return self.a.is_set() or self.b.is_set()
