"""A session's `summary`: what a listing shows of its statistics, kept on the session.

`write_statistics` keeps it up to date (one extra update per batch of points), so that
`ptutils status` (and the dashboard) list sessions with one indexed query instead of
two statistics queries per session:

    summary: {
      train: {step, loss},              the train `loss` at the highest step written
      eval:  {step, metrics: [[name, value], ...]},  the metrics of the highest eval step
      time:  t,                          the newest point's time (MongoDB `$max`)
      complete: true,                    set at creation (`new_session_doc`): every
    }                                    point ever written went through the summary

Each part moves forward only: a batch whose step is below the stored one leaves it
alone (a late Eval of an earlier step). At equal steps the later write wins (a
redelivered chunk rewrites the same points). `delete_statistics(after_step=s)` drops a
part whose step is above `s`, since those points are gone, and clears `complete`: a
reader then queries the statistics for that part until a new write brings it back. Values are stored as
`mongo_fields.encode_number` spells them (NaN as "nan"). A session written by an older
ptutils has no summary, or one without `complete` (started before, resumed after): a
reader queries its statistics for the parts it lacks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ptutils.store.mongo_fields import decode_number, encode_number, plain

TRAIN_METRIC = "loss"
"""The train statistic a listing shows."""


@dataclass(frozen=True)
class BatchSummary:
    """What one batch of points contributes to a session's summary."""

    train: dict[str, Any] | None  # {"step", "loss"}
    eval: dict[str, Any] | None  # {"step", "metrics": [[name, value], ...]}
    time: float | None

    @property
    def empty(self) -> bool:
        return self.train is None and self.eval is None and self.time is None


def summarize(points: Iterable[Any]) -> BatchSummary:
    """The train loss at the batch's highest train step, the eval metrics at its highest
    eval step (in name order), and its newest time."""
    train: tuple[int, float] | None = None
    evals: dict[int, dict[str, float]] = {}
    newest: float | None = None
    for p in points:  # hundreds per chunk, in the checkpoint writer's thread: kept lean
        phase, step = p.phase if type(p.phase) is str else str(plain(p.phase)), int(p.step)
        if phase == "train" and p.name == TRAIN_METRIC and (train is None or step >= train[0]):
            train = (step, float(p.value))
        elif phase == "eval":
            evals.setdefault(step, {})[str(p.name)] = float(p.value)
        at = float(p.time)
        if newest is None or at > newest:
            newest = at
    eval_part = None
    if evals:
        step = max(evals)
        metrics = [[k, encode_number(v)] for k, v in sorted(evals[step].items())]
        eval_part = {"step": step, "metrics": metrics}
    train_part = None if train is None else {"step": train[0], "loss": encode_number(train[1])}
    return BatchSummary(train_part, eval_part, newest)


def apply(doc: dict[str, Any], batch: BatchSummary) -> bool:
    """Fold `batch` into `doc["summary"]` in place (the local store's update); whether it
    changed. The same rules as the MongoDB update in mongo_stats.summary_ops."""
    summary = doc.get("summary")
    if not isinstance(summary, dict):
        summary = {}
    before = repr(summary)
    for part in ("train", "eval"):
        new = getattr(batch, part)
        old = summary.get(part) or {}
        if new is not None and int(old.get("step", -1)) <= new["step"]:
            summary[part] = new
    if batch.time is not None:
        summary["time"] = max(float(summary.get("time") or batch.time), batch.time)
    doc["summary"] = summary
    return repr(summary) != before


def trim(doc: dict[str, Any], after_step: int) -> bool:
    """Drop the parts of `doc["summary"]` above `after_step`; whether any was dropped."""
    summary = doc.get("summary")
    if not isinstance(summary, dict):
        return False
    gone = [k for k in ("train", "eval")
            if isinstance(summary.get(k), dict) and int(summary[k]["step"]) > after_step]
    for k in gone:
        del summary[k]
    if gone:
        summary["complete"] = False  # the points at or below the step still exist
    return bool(gone)


def read(doc: dict[str, Any]) -> dict[str, Any] | None:
    """{loss, loss_step, eval_step, eval, time, complete} of a session's summary, values
    decoded; None for a session without one (written by an older ptutils)."""
    summary = doc.get("summary")
    if not isinstance(summary, dict):
        return None
    train = summary.get("train") or {}
    ev = summary.get("eval") or {}
    loss = train.get("loss")
    return {
        "loss": None if loss is None else float(decode_number(loss)),
        "loss_step": train.get("step"),
        "eval_step": ev.get("step") if ev.get("metrics") else None,
        "eval": {str(k): float(decode_number(v)) for k, v in ev.get("metrics") or []},
        "time": summary.get("time"),
        "complete": bool(summary.get("complete")),
    }


def fresh() -> dict[str, Any]:
    """The summary of a new session: nothing written yet, and nothing missed."""
    return {"complete": True}
