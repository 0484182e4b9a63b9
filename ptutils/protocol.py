"""The task protocol: task names, queues and message fields (both sides import this).

A message carries ids, a step range and a fencing token; never tensors or configs
(DESIGN §4.1): the store is the source of truth.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

TRAIN, EVAL, SAVE = "train", "eval", "save"
KINDS = (TRAIN, EVAL, SAVE)

TASK_NAMES = {TRAIN: "ptutils.train", EVAL: "ptutils.eval", SAVE: "ptutils.save"}
"""Celery task name of each kind."""

QUEUES = {TRAIN: "train", EVAL: "eval", SAVE: "save"}
"""Default queue of each kind (a session may route train tasks to its own queue)."""


def queue_of(doc: dict[str, Any], kind: str) -> str:
    """The queue of a session's `kind` tasks: Train goes to the session's own train queue
    (`meta.queue`, chosen at submit), Eval and Save to their default queues."""
    if kind == TRAIN:
        return str((doc.get("meta") or {}).get("queue") or QUEUES[TRAIN])
    return QUEUES[kind]


@dataclass(frozen=True)
class Task:
    """One unit of work of a session. `start`/`stop` for train, `step` for eval/save."""

    kind: str
    session: str
    token: str = ""
    start: int = 0
    stop: int = 0
    step: int = 0

    def to_message(self) -> dict[str, Any]:
        """Plain dict for the queue (msgpack/json)."""
        return asdict(self)

    @classmethod
    def from_message(cls, msg: dict[str, Any]) -> Task:
        kind = msg.get("kind")
        if kind not in KINDS:
            raise ValueError(f"unknown task kind {kind!r}")
        return cls(
            kind=str(kind),
            session=str(msg["session"]),
            token=str(msg.get("token", "")),
            start=int(msg.get("start", 0)),
            stop=int(msg.get("stop", 0)),
            step=int(msg.get("step", 0)),
        )

    def __str__(self) -> str:
        if self.kind == TRAIN:
            return f"Train[{self.start},{self.stop}) of {self.session[:8]}"
        return f"{self.kind.capitalize()}({self.step}) of {self.session[:8]}"
