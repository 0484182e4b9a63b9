"""`ptutils submit`: validate, store, enqueue (DESIGN §6, first line).

Every config of a submit (one, or the grid of a sweep) is built dry on CPU before
anything is stored (under this machine's policy: `--allow-imports`); then the broker
is checked; then each session document is created (status queued) and its first Train
task sent. The `.py` files under `imports:` are stored in each session document
(field `code`), so a worker loads the submitted code from the store, never from its
own disk. If a send fails, every session this submit created is deleted again: a
submit queues all of its sessions or none, and no session is ever left queued without
a message. A session of `session.world_size` N > 1 is queued on `QUEUE-xN` (ptutils.slots:
only nodes with N slots or more consume it), recorded as its route (`meta.queue`). A warm start (`init:`) reads its source here (a file in `prepare`, a
session of the store in `submit`) and is stored as the session's `init` checkpoint.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery

from ptutils.config import config_hash, expand_sweep
from ptutils.errors import BrokerUnavailable, SessionExists, SessionNotFound, StoreError
from ptutils.plan import train_task
from ptutils.runner import load_experiment, validate
from ptutils.slots import train_queue, world_size_of
from ptutils.sources import code_for
from ptutils.store.base import SessionStatus, Store, new_id, new_session_doc
from ptutils.warmstart import InitSpec, Source, WarmStart, initial_state, read_source
from ptutils.warmstart import apply as apply_init
from ptutils.warmstart import create_session as create_warm_session
from workers.dispatch import DEFAULT_PRIORITY, Route, check_broker, check_priority, send

log = logging.getLogger("ptutils.submit")


@dataclass
class Submitted:
    """A queued session."""

    session: str
    name: str
    overrides: list[str]
    sweep: str | None
    queue: str
    priority: int
    total_steps: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Prepared:
    """A validated config, ready to be stored."""

    name: str
    config: dict[str, Any]
    overrides: list[str]
    total_steps: int
    threads: int
    code: list[dict[str, str]] = field(default_factory=list)
    """The `.py` files under `imports:` (name, sha256, source), stored with the session."""
    init: InitSpec | None = None
    """The config's `init:` (a warm start), checked."""
    state: dict[str, Any] | None = None
    """With `init`: the dry-built session's State at step 0, before the warm start."""
    warm: WarmStart | None = None
    """With `init`: the warm start, once its source is read (a file: by `prepare`; a
    session: by `submit`, which has the store)."""


def prepare(
    path: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    sweeps: Sequence[str] = (),
    name: str | None = None,
) -> list[Prepared]:
    """Load and build every config of the submit (a sweep's grid): bad input fails here."""
    combos = expand_sweep(list(sweeps)) if sweeps else [[]]
    prepared: list[Prepared] = []
    base = name
    for combo in combos:
        cfg = load_experiment(path, [*overrides, *combo])
        base = base or cfg.get("name") or Path(path).stem
        session = validate(cfg, place=False)
        item = Prepared("", cfg, [*overrides, *combo], session.plan.total_steps,
                        session.plan.threads, code_for(cfg))
        if cfg.get("init") is not None:
            item.init = InitSpec.parse(cfg["init"], Path(path).resolve().parent)
            item.state = initial_state(session)
            if item.init.file is not None:  # read here, on the submitting machine only
                item.warm = apply_init(item.init, item.state, read_source(item.init))
        prepared.append(item)
    for item, label in zip(prepared, sweep_names(str(base), combos)):
        item.name = label
    return prepared


def sweep_names(base: str, combos: Sequence[Sequence[str]]) -> list[str]:
    """`base` for a single run; `base-lr=0.1,bs=32` for each point of a sweep.

    Keys are shortened to their last part unless two keys share it.
    """
    if combos == [[]] or not combos:
        return [base]
    keys = [o.partition("=")[0] for o in combos[0]]
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    short = len(set(leaves)) == len(leaves)
    names = []
    for combo in combos:
        parts = []
        for key, leaf, override in zip(keys, leaves, combo):
            value = override.partition("=")[2].replace(" ", "")
            parts.append(f"{leaf if short else key}={value}")
        names.append(f"{base}-{','.join(parts)}")
    return names


def check_names_free(store: Store, prepared: Sequence[Prepared]) -> None:
    """SessionExists naming every taken name, before anything is created."""
    taken = []
    for item in prepared:
        try:
            doc = store.get_session(item.name)
        except SessionNotFound:
            continue
        taken.append(f"{item.name} ({doc['status']})")
    if taken:
        raise SessionExists(
            f"session name(s) already used in {store.url}: {', '.join(taken)}. Pick another "
            "with --name NAME (a sweep appends its values to it)."
        )


def submit(
    store: Store,
    app: Celery,
    prepared: Sequence[Prepared],
    *,
    queue: str = "train",
    priority: int = DEFAULT_PRIORITY,
    tags: Sequence[str] = (),
) -> list[Submitted]:
    """Create each session (queued) and send its first Train task; all or nothing.

    `queue`: the train queue; a session of world size N > 1 goes to `queue-xN`."""
    check_priority(priority)
    check_names_free(store, prepared)
    read_warm_starts(store, prepared)
    check_broker(app)
    sweep = new_id() if len(prepared) > 1 else None
    created: list[dict[str, Any]] = []
    done: list[Submitted] = []
    try:
        for item in prepared:
            route = Route(train_queue(queue, world_size_of(item.config)), priority)
            doc = _session_doc(item, route, sweep, tags)
            if item.warm is None:
                doc = store.create_session(doc)
            else:
                doc = create_warm_session(store, doc, item.warm, SessionStatus.QUEUED)
            created.append(doc)
            task = train_task(doc)
            if task is not None:
                send(app, task, route)
            done.append(Submitted(doc["_id"], item.name, item.overrides, sweep, route.queue,
                                  route.priority, item.total_steps))
    except (BrokerUnavailable, SessionExists, StoreError):
        _undo(store, created)
        raise
    return done


def read_warm_starts(store: Store, prepared: Sequence[Prepared]) -> None:
    """Read the source session of each warm start in `store` (each source once) and
    apply it: every bad `init.from` fails here, before anything is stored."""
    sources: dict[tuple[str | None, int | None], Source] = {}
    for item in prepared:
        if item.init is None or item.warm is not None:
            continue
        assert item.state is not None
        key = (item.init.session, item.init.step)
        if key not in sources:
            sources[key] = read_source(item.init, store)
        item.warm = apply_init(item.init, item.state, sources[key])


def _session_doc(
    item: Prepared, route: Route, sweep: str | None, tags: Sequence[str]
) -> dict[str, Any]:
    import torch

    doc = new_session_doc(
        item.name,
        item.config,
        config_hash(item.config),
        item.total_steps,
        tags=[*(item.config.get("tags") or []), *tags],
        sweep=sweep,
        status=SessionStatus.QUEUED,
        meta={
            "torch": torch.__version__,
            "threads": item.threads,
            "queue": route.queue,
            "world_size": world_size_of(item.config),
            "priority": route.priority,
            "overrides": item.overrides,
            "submitted_by": _who(),
        },
    )
    return {**doc, "code": item.code}


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _undo(store: Store, created: Sequence[dict[str, Any]]) -> None:
    """Delete the sessions of a submit that failed half way (their messages, if any
    were sent, find no session and are dropped by the workers)."""
    for doc in created:
        try:
            store.delete_session(doc["_id"])
        except StoreError as exc:
            log.error("could not delete session %s after a failed submit: %s", doc["name"],
                      exc)
