"""The plan: given a session document, which tasks come next (a pure function, DESIGN §2).

The in-process runner, the workers and the orchestrator all ask `next_tasks`; none
keeps its own copy of the schedule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ptutils.config import check_keys
from ptutils.errors import ConfigError
from ptutils.protocol import EVAL, SAVE, TRAIN, Task
from ptutils.store.base import CheckpointKind, SessionStatus

MODES = ("min", "max")
"""Whether a smaller or a larger value of a watched metric is better."""

DEFAULT_MODE = "min"
"""The one default of every `mode` / `best_mode` (callbacks, retention): metrics are
losses unless said otherwise."""


@dataclass
class Retention:
    """Which checkpoints the Save task keeps."""

    keep_last: int = 2
    keep_every: int = 0
    best_metric: str | None = None
    best_mode: str = DEFAULT_MODE


@dataclass
class Plan:
    """The schedule of a session: `session:` in the config."""

    total_steps: int = 1000
    chunk_steps: int = 100
    eval_every: int = 0
    log_every: int = 10
    seed: int = 0
    threads: int = 1
    deterministic: bool = True
    device: str = "cpu"
    max_attempts: int = 3
    world_size: int = 1
    retention: Retention = field(default_factory=Retention)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> Plan:
        cfg = dict(cfg or {})
        check_keys(cfg, [f.name for f in fields(cls)], "session")
        ret = cfg.pop("retention", None) or {}
        check_keys(ret, [f.name for f in fields(Retention)], "session.retention")
        plan = cls(**cfg, retention=Retention(**ret))
        plan.validate()
        return plan

    def validate(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"session.{key}: {what} (got {getattr(self, key)!r})")

        need(
            isinstance(self.total_steps, int) and self.total_steps > 0,
            "total_steps",
            "must be a positive integer",
        )
        need(
            isinstance(self.chunk_steps, int) and self.chunk_steps > 0,
            "chunk_steps",
            "must be a positive integer",
        )
        need(
            isinstance(self.eval_every, int) and self.eval_every >= 0,
            "eval_every",
            "must be 0 (eval only at the end) or a positive integer",
        )
        need(
            self.eval_every % self.chunk_steps == 0,
            "eval_every",
            f"must be a multiple of session.chunk_steps={self.chunk_steps} "
            "(evals run on checkpoints, which are written at chunk ends)",
        )
        need(isinstance(self.threads, int) and self.threads >= 1, "threads", "must be >= 1")
        need(self.max_attempts >= 1, "max_attempts", "must be >= 1")
        need(
            isinstance(self.world_size, int)
            and not isinstance(self.world_size, bool)
            and self.world_size >= 1,
            "world_size",
            "must be a positive integer (the number of rank processes, one device each)",
        )
        if isinstance(self.world_size, int) and self.world_size > 1:
            need(
                self.device in ("cpu", "cuda"),
                "device",
                "must be cpu or cuda with session.world_size > 1 (each rank is given its own "
                "GPU as cuda:0 through CUDA_VISIBLE_DEVICES)",
            )
        if self.retention.best_mode not in MODES:
            raise ConfigError(
                f"session.retention.best_mode: must be 'min' or 'max' "
                f"(got {self.retention.best_mode!r})"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def boundary_after(self, step: int) -> int:
        """The chunk end that follows `step` (chunks are aligned to chunk_steps)."""
        return min(self.total_steps, (step // self.chunk_steps + 1) * self.chunk_steps)

    def eval_due(self, step: int) -> bool:
        return step == self.total_steps or (self.eval_every > 0 and step % self.eval_every == 0)

    def checkpoint_kind(self, reached: int, stop: int) -> CheckpointKind:
        """The kind of the checkpoint a Train chunk ending at `reached` (asked to run to
        `stop`) writes: final at the end, chunk at its boundary, preempt before it."""
        if reached == self.total_steps:
            return CheckpointKind.FINAL
        return CheckpointKind.CHUNK if reached == stop else CheckpointKind.PREEMPT


def plan_of(doc: dict[str, Any]) -> Plan:
    """The Plan of a stored session (its config's `session:` section)."""
    return Plan.from_config(doc["config"].get("session"))


def train_task(doc: dict[str, Any], plan: Plan | None = None) -> Task | None:
    """The Train chunk that continues the session from its current step, if any."""
    plan = plan or plan_of(doc)
    if SessionStatus(doc["status"]).finished or doc["step"] >= plan.total_steps:
        return None
    step = int(doc["step"])
    return Task(TRAIN, doc["_id"], doc["token"], start=step, stop=plan.boundary_after(step))


def next_tasks(doc: dict[str, Any], *, after_train: bool = True) -> list[Task]:
    """Tasks that follow the session's current state.

    After a Train chunk reached step n (a chunk boundary): Eval(n) when due, Save(n),
    then Train[n, next boundary) unless the session is finished.
    """
    plan = plan_of(doc)
    step = int(doc["step"])
    tasks: list[Task] = []
    ckpt = doc.get("checkpoint") or {}
    at_boundary = (
        step > 0
        and ckpt.get("step") == step
        and (step % plan.chunk_steps == 0 or step == plan.total_steps)
    )
    if after_train and at_boundary and doc["status"] != str(SessionStatus.FAILED):
        if plan.eval_due(step):
            tasks.append(Task(EVAL, doc["_id"], doc["token"], step=step))
        tasks.append(Task(SAVE, doc["_id"], doc["token"], step=step))
    nxt = train_task(doc, plan)
    if nxt is not None:
        tasks.append(nxt)
    return tasks


def pending_eval_steps(doc: dict[str, Any], start: int) -> list[int]:
    """Eval steps whose results a Train chunk starting at `start` must deliver first.

    Evals at steps n <= start - chunk_steps are delivered (a fixed point of the plan:
    Eval(n) runs beside Train[n, n+K) and is needed by Train[n+K, ...)).
    """
    plan = plan_of(doc)
    limit = start - plan.chunk_steps
    if limit <= 0:
        return []
    return [n for n in range(plan.chunk_steps, limit + 1, plan.chunk_steps) if plan.eval_due(n)]


def lost_eval_steps(store: Any, doc: dict[str, Any]) -> list[int]:
    """Eval-due steps, at or before the session's step, whose checkpoint is stored but
    whose result is not: Evals lost with the process that was to run them (a `ptutils
    run` or search driver killed between a chunk's commit and its Eval). Running them
    again is safe: an Eval is idempotent and its result is a function of the checkpoint."""
    plan = plan_of(doc)
    stored = {int(c["step"]) for c in store.list_checkpoints(doc["_id"])}
    done = {int(p["step"]) for p in store.query_statistics(doc["_id"], phase="eval")}
    return sorted(n for n in stored
                  if 0 < n <= int(doc["step"]) and plan.eval_due(n) and n not in done)
