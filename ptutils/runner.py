"""`ptutils run`: execute a session's plan in-process against a store (DESIGN §6, last line).

The same Engine task bodies the Celery workers run, called one after another:
Train[s, s+K) -> Eval(s+K) when due -> Save(s+K) -> Train[s+K, ...).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptutils.config import apply_overrides, config_hash, load_config
from ptutils.engine import Engine, ProgressFn, build_session
from ptutils.errors import (
    CheckpointCorrupt,
    ConfigError,
    PtutilsError,
    SessionExists,
    SessionNotFound,
    TrainingError,
)
from ptutils.plan import lost_eval_steps, pending_eval_steps, train_task
from ptutils.protocol import EVAL, TRAIN, Task
from ptutils.rng import get_rng_state
from ptutils.session import Session
from ptutils.sources import SourceFile, code_for, looks_like_path
from ptutils.store.base import SessionStatus, Store, event, new_session_doc, with_event
from ptutils.warmstart import INIT_CHECKPOINT, warm_start
from ptutils.warmstart import create_session as create_warm_session

log = logging.getLogger("ptutils.runner")

LOCAL_CHUNKS_PER_TASK = 1 << 30
"""`ptutils run` has no task queue to share: a Train task goes on chunk after chunk,
each chunk's checkpoint written in the background while the next trains (ptutils.chunks),
until an Eval result is due, the session ends or it is stopped. $PTUTILS_CHUNKS_PER_TASK
overrides it (1: every checkpoint written and committed before training goes on)."""

CHUNKS_ENV = "PTUTILS_CHUNKS_PER_TASK"


def load_experiment(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a config file and apply `a.b=value` overrides; `imports:` files become references.

    Each `.py` path under `imports:` (relative to the config's folder) is read now and
    replaced by `{module: NAME, sha256: HEX}`: the stored config names the content, not
    a path, and `sources.code_for(config)` gives the sources to store with the session.
    """
    cfg = apply_overrides(load_config(path), list(overrides))
    base = Path(path).resolve().parent
    imports = cfg.get("imports") or []
    if isinstance(imports, str):
        imports = [imports]
    if not isinstance(imports, list):
        raise ConfigError(f"{path}: imports: must be a list of module names or .py paths")
    cfg["imports"] = [
        SourceFile.read(i, base).reference() if isinstance(i, str) and looks_like_path(i) else i
        for i in imports
    ]
    if not cfg["imports"]:
        del cfg["imports"]
    return cfg


def validate(config: Mapping[str, Any], *, place: bool = True) -> Session:
    """Build the session dry: a bad config fails here, before anything is stored.
    `place=False` keeps it on the CPU whatever `session.device` says (`submit` checks a
    CUDA session on a machine without a GPU; `run` trains the session it builds here)."""
    session = build_session(dict(config), place=place)
    session.check_shapes()
    # The RNG state a Train[0, K) task starts from. `run_session` adopts this session
    # later, after imports that may draw from the global generators (rich does).
    session._rng_at_build = get_rng_state()
    return session


class TrainingFailed(TrainingError):
    """A session ended failed; the message is the one recorded in the store."""


@dataclass
class Summary:
    """What a finished run reports."""

    session_id: str
    name: str
    status: str
    step: int
    total_steps: int
    wall_time: float
    train_loss: float | None
    eval_metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: dict[str, Any] | None = None
    store: str = ""


def prepare_session(
    store: Store, config: dict[str, Any], name: str, *, resume: bool = False,
    base_dir: str | os.PathLike[str] | None = None, allow_resize: bool = False,
) -> tuple[dict[str, Any], Session | None]:
    """The session document to run (created, or found for --resume) and a dry-built Session.

    A config with `init:` (a warm start) reads its source now (a file relative to
    `base_dir`, the config's folder) and stores the session with its `init` checkpoint.
    With `resume`, a config that differs from the stored one only in
    `session.world_size` resizes the session if `allow_resize` (see `resize_session`).
    """
    chash = config_hash(config)
    if resume:
        return resume_session(store, name, config_hash=chash, config=config,
                              allow_resize=allow_resize), None
    try:
        doc = store.get_session(name)
    except SessionNotFound:
        doc = None
    if doc is not None:
        raise SessionExists(
            f"a session named {name!r} already exists in {store.url} (status {doc['status']}, "
            f"step {doc['step']}/{doc['total_steps']}). Resume it with `ptutils run --resume "
            f"{name}`, or start a new one with `--name NEW_NAME`."
        )
    session = validate(config)
    warm = warm_start(session, config, store, base_dir)
    import torch

    doc = new_session_doc(
        name,
        config,
        chash,
        session.plan.total_steps,
        tags=config.get("tags") or [],
        status=SessionStatus.RUNNING,
        meta={"torch": torch.__version__, "threads": session.plan.threads},
    )
    doc = {**doc, "code": code_for(config)}
    if warm is None:
        return store.create_session(doc), session
    doc = create_warm_session(store, doc, warm, SessionStatus.RUNNING)
    session.load_state_dict(warm.state)  # as a worker would load the init checkpoint
    return doc, session


def resume_session(
    store: Store, name: str, *, config_hash: str | None = None,
    config: dict[str, Any] | None = None, allow_resize: bool = False,
) -> dict[str, Any]:
    """The stored session `name`, made ready to continue with the config it was started
    with; `config_hash` (of a config given again, `config`) must match it, except for
    `session.world_size` when `allow_resize` (`resize_session`).

    SessionNotFound if there is no such session; SessionExists if a live process holds
    its lease. A failed, cancelled or paused session runs again with fresh attempts.
    """
    try:
        doc = store.get_session(name)
    except SessionNotFound:
        raise SessionNotFound(
            f"--resume: no session named {name!r} in {store.url}. List the sessions there "
            f"with `ptutils status --store {store.url}`; start a new one without --resume."
        ) from None
    resized = config is not None and _only_world_size_differs(doc["config"], config)
    if config_hash is not None and doc["config_hash"] != config_hash and not resized:
        raise ConfigError(
            f"--resume: the config differs from the one session {name!r} was started with "
            f"(hash {doc['config_hash']} vs {config_hash}). `ptutils run --resume {name}` "
            "(no CONFIG) continues it with its own config and overrides; or start a new "
            "session with `--name NEW_NAME`."
        )
    lease = doc.get("lease")
    if lease and not lease_is_dead(lease, store.now()):
        raise SessionExists(
            f"session {name!r} is running right now ({lease['worker']} holds its lease). "
            "Wait for it, or stop that process first."
        )
    if lease:
        doc = store.cas_session(doc["_id"], {"token": doc["token"]}, {"lease": None}) or doc
    if doc["status"] in (
        str(SessionStatus.FAILED),
        str(SessionStatus.CANCELLED),
        str(SessionStatus.PAUSED),
    ):
        doc = store.cas_session(
            doc["_id"],
            {"token": doc["token"]},
            {"status": str(SessionStatus.RUNNING), "attempts": 0, "error": None, "lease": None},
        ) or store.get_session(name)
    if resized or allow_resize:
        assert config is not None or not resized
        doc = resize_session(store, doc, config if resized else None, allow_resize=allow_resize)
    return doc


def _only_world_size_differs(stored: Mapping[str, Any], given: Mapping[str, Any]) -> bool:
    """Whether two configs differ, and only in `session.world_size`."""
    def without(cfg: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(cfg)
        sess = dict(out.get("session") or {})
        sess.pop("world_size", None)
        out["session"] = sess
        return out

    def size(cfg: Mapping[str, Any]) -> Any:
        return (cfg.get("session") or {}).get("world_size", 1)

    return size(stored) != size(given) and config_hash(without(stored)) == config_hash(without(given))


def resize_session(
    store: Store, doc: dict[str, Any], config: dict[str, Any] | None, *, allow_resize: bool
) -> dict[str, Any]:
    """Continue session `doc` with `config` (its config with another `session.world_size`;
    None: unchanged): refused without `allow_resize`, since the per-rank batches and the
    gradient sums change. The data position is global (a global batch is the same
    samples on any number of ranks), so nothing is remapped: no sample is skipped or
    repeated. Ranks the last State does not have are seeded from (seed, rank, step).
    Marks the session `allow_resize` so its checkpoints load into the new size."""
    old = int((doc["config"].get("session") or {}).get("world_size", 1))
    new = old if config is None else int((config.get("session") or {}).get("world_size", 1))
    if new != old and not allow_resize:
        raise ConfigError(
            f"--resume: session {doc['name']!r} was trained with session.world_size={old}, "
            f"and this run asks for {new}: the per-rank batches and the order of the "
            "gradient sums change, so the run would no longer be bit-identical to one that "
            f"kept {old}. Add --allow-resize to accept that (the data position is global: "
            "no sample is skipped or repeated), or keep session.world_size="
            f"{old}."
        )
    update: dict[str, Any] = {"allow_resize": True}
    if config is not None and new != old:
        build_session(dict(config), doc.get("code"), place=False)  # fails here if bad
        update.update({"config": config, "config_hash": config_hash(config),
                       "events": with_event(doc, event(
                           "resized", f"session.world_size {old} -> {new} at step "
                           f"{doc['step']} (--allow-resize)", store.now()))})
    new_doc = store.cas_session(doc["_id"], {"token": doc["token"]}, update)
    if new_doc is None:
        raise SessionExists(f"session {doc['name']!r} changed while being resized; try again")
    return new_doc


def pause_session(store: Store, session_id: str) -> dict[str, Any]:
    """Mark a session that `ptutils run` stopped on request as paused (no process runs it
    and nothing is queued; `--resume` continues it). A finished one stays as it is."""
    for _ in range(5):
        doc = store.get_session(session_id)
        if doc["status"] != str(SessionStatus.RUNNING) or doc.get("lease"):
            return doc
        new = store.cas_session(
            session_id,
            {"token": doc["token"], "status": doc["status"], "lease": None},
            {"status": str(SessionStatus.PAUSED)},
        )
        if new is not None:
            return new
    return store.get_session(session_id)


def local_worker_id() -> str:
    """`local:HOST:PID`: lets a later --resume on this host see that the process is gone."""
    return f"local:{socket.gethostname()}:{os.getpid()}"


def lease_is_dead(lease: Mapping[str, Any], now: float | None = None) -> bool:
    """True if the lease expired (at `now`, the store's clock: pass `store.now()`), or its
    holder is a local process of this host that died."""
    if float(lease.get("expires", 0)) <= (time.time() if now is None else now):
        return True
    parts = str(lease.get("worker", "")).split(":")
    if len(parts) == 3 and parts[0] == "local" and parts[1] == socket.gethostname():
        try:
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
    return False


def run_session(
    store: Store,
    doc: dict[str, Any],
    *,
    warm: Session | None = None,
    progress: ProgressFn | None = None,
    stop_flag: threading.Event | None = None,
    store_url: str | None = None,
) -> Summary:
    """Run every task of the plan until the session is finished (or stopped). A session
    with `session.world_size` N > 1 runs on N local rank processes (CPU slots; the GPUs
    of this machine for `device: cuda`); `store_url` is how they open the store (needed
    when `store.url` is redacted: a MongoDB URL with a password)."""
    engine = Engine(store, worker=local_worker_id(), progress=progress, stop_flag=stop_flag,
                    slots=_local_slots(doc), store_url=store_url,
                    chunks_per_task=int(os.environ.get(CHUNKS_ENV) or LOCAL_CHUNKS_PER_TASK))
    if warm is not None and doc["step"] == 0 and doc.get("checkpoint") in (None, INIT_CHECKPOINT):
        engine.adopt(doc, warm, getattr(warm, "_rng_at_build", None) or get_rng_state())
    started = time.time()
    lost = [Task(EVAL, doc["_id"], doc["token"], step=n) for n in lost_eval_steps(store, doc)]
    queue = deque([*lost, *(t for t in [train_task(doc)] if t is not None)])
    rerun: set[tuple[str, int | None]] = set()  # lost Evals this run sent again
    while queue:
        task = queue.popleft()
        outcome = engine.run(task)
        if outcome.retry_after is not None and not outcome.successors and not (
            stop_flag is not None and stop_flag.is_set()
        ):  # e.g. a group restarted after a rank died: the attempts bound the retries
            lost = [t for t in lost_evals(store, task) if (t.session, t.step) not in rerun]
            if lost:  # a run stopped or killed before it ran them: run them first (once)
                rerun.update((t.session, t.step) for t in lost)
                queue.extendleft([task, *reversed(lost)])
                continue
            time.sleep(min(outcome.retry_after, 1.0))
            queue.append(task)
            continue
        if outcome.failed:
            err = store.get_session(doc["_id"]).get("error") or {}
            raise TrainingFailed(err.get("message", outcome.reason))
        if stop_flag is not None and stop_flag.is_set():
            break
        stale = outcome.reason.startswith("stale")  # e.g. queued before a rollback
        if task.kind == "train" and not outcome.ran and not outcome.successors and not stale:
            doc_now = store.get_session(doc["_id"])
            if not SessionStatus(doc_now["status"]).finished:
                raise PtutilsError(f"{task} did not run: {outcome.reason}")
        queue.extend(outcome.successors)
    return summarize(store, doc["_id"], time.time() - started)


def lost_evals(store: Store, task: Task) -> list[Task]:
    """The Evals a Train task waits for that nobody will run (`lost_eval_steps` among
    its `pending_eval_steps`): in a local run no queue holds them, since the run that
    made them was stopped, or killed, before running them (with background checkpoints
    a task hands its Evals back only when it ends). Empty for another task kind."""
    if task.kind != TRAIN:
        return []
    doc = store.get_session(task.session)
    waits_for = set(pending_eval_steps(doc, task.start))
    return [Task(EVAL, doc["_id"], doc["token"], step=n)
            for n in lost_eval_steps(store, doc) if n in waits_for]


def _local_slots(doc: dict[str, Any]) -> Any:
    """This machine's slots for `ptutils run`: its GPUs ("0", "1", ... from
    CUDA_VISIBLE_DEVICES or nvidia-smi's count, never by initialising CUDA here) for a
    CUDA session, else unlimited CPU slots."""
    from ptutils.plan import plan_of

    plan = plan_of(doc)
    if plan.world_size == 1 or plan.device != "cuda":
        return None
    return _GpuSlots(_visible_gpus())


class _GpuSlots:
    """`ptutils run`'s GPUs: the first n, each used by one rank."""

    def __init__(self, gpus: list[str]) -> None:
        self.gpus = gpus

    def acquire(self, n: int, owner: str) -> list[str] | None:
        if n > len(self.gpus):
            raise ConfigError(
                f"session.world_size={n} needs {n} GPUs and this machine shows "
                f"{len(self.gpus)} ({', '.join(self.gpus) or 'none'}); lower "
                "session.world_size, or run it on a worker that has them"
            )
        return self.gpus[:n]

    def release(self, owner: str) -> None:
        return None


def _visible_gpus() -> list[str]:
    """GPU ids for CUDA_VISIBLE_DEVICES, without initialising CUDA in this process."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def summarize(store: Store, session_id: str, wall: float = 0.0) -> Summary:
    doc = store.get_session(session_id)
    losses = store.query_statistics(
        session_id, name="loss", phase="train", step_min=max(0, doc["step"] - 10)
    )
    evals = store.query_statistics(session_id, phase="eval")
    last_eval: dict[str, float] = {}
    if evals:
        top = max(p["step"] for p in evals)
        last_eval = {p["name"]: p["value"] for p in evals if p["step"] == top}
    return Summary(
        doc["_id"],
        doc["name"],
        doc["status"],
        doc["step"],
        doc["total_steps"],
        wall,
        losses[-1]["value"] if losses else None,
        last_eval,
        doc.get("checkpoint"),
        store.url,
    )


def export_state_dict(
    store: Store, ref: str, step: int | None, path: str | os.PathLike[str],
    fmt: str | None = None,
) -> dict[str, Any]:
    """Write the network's plain state_dict: for `torch.load(path, weights_only=True)`
    (fmt "pt") or `safetensors.torch.load_file` (fmt "safetensors", with the session,
    step and torch version in the header metadata). `fmt` None: from the suffix."""
    import torch

    from ptutils.weights import format_for, save_weights

    fmt = format_for(path, fmt)
    doc = store.get_session(ref)
    ckpt = store.get_checkpoint(doc["_id"], step)
    try:
        state = store.load_state(ckpt)
    except CheckpointCorrupt as exc:
        raise CheckpointCorrupt(_corrupt_export(store, doc, ckpt, exc)) from None
    try:
        weights = state["trainer"]["model"]["network"]
    except (KeyError, TypeError) as exc:
        raise PtutilsError(f"checkpoint at step {ckpt['step']} holds no network state") from exc
    metadata = {"format": "pt", "ptutils.session": doc["name"],
                "ptutils.session_id": doc["_id"], "ptutils.step": str(ckpt["step"]),
                "torch": torch.__version__}
    save_weights(weights, path, fmt, metadata)
    return ckpt


def _corrupt_export(
    store: Store, doc: dict[str, Any], bad: dict[str, Any], exc: CheckpointCorrupt
) -> str:
    """What export says of a corrupt checkpoint: which one, why, and the intact ones."""
    intact = [
        f"{c['step']} ({c['kind']})"
        for c in store.list_checkpoints(doc["_id"])
        if (c["step"], c["kind"]) != (bad["step"], bad["kind"])
        and store.checkpoint_problem(c) is None
    ]
    where = f"the checkpoint of session {doc['name']!r} at step {bad['step']} ({bad['kind']})"
    hint = (
        f"Intact checkpoints: step {', '.join(intact)}; export one with --step N."
        if intact
        else "No checkpoint of this session is intact."
    )
    return f"{where} is corrupt: {exc}. {hint}"
