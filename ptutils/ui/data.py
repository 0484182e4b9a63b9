"""Every store access of the dashboard: lists, details, curves, workers, actions.

One small module of functions over today's `Store` API, so that a faster listing API can
replace their insides without touching the pages. What the orchestrator decides (how a
row is shown, how a session is cancelled) comes in as `Hooks` from the caller
(orchestrator/cli.py): `ptutils/` never imports the layers above it (DESIGN §2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from ptutils.errors import PtutilsError
from ptutils.store import summary as summaries
from ptutils.store.base import SESSION_SORTS, SessionQuery, SessionStatus, Store

PAGE_SIZES = (10, 25, 50, 100, 200)
"""Rows per page the sessions table offers; anything else is refused."""

SORT_KEYS = ("created", "updated", "name", "status", "step", "sweep")
"""Columns the sessions table sorts on (stored fields, so a listing index can serve them)."""

FILTER_KEYS = ("status", "name", "tag", "sweep", "q")
"""Filters of the sessions table: stored status, name (substring), tag, sweep or search
id, and free text over name, id, tags, sweep and error message."""

MAX_BUCKETS = 4000
"""Most pixel buckets a curve request may ask for (two points each)."""

Row = Callable[[Store, dict[str, Any], float], dict[str, Any]]
State = Callable[[Store, dict[str, Any], float], tuple[str, "int | None"]]
Action = Callable[[Store, str], dict[str, Any]]


class BadRequest(PtutilsError):
    """A dashboard request with a bad parameter (the message names it)."""


def stored_state(store: Store, doc: dict[str, Any], now: float) -> tuple[str, int | None]:
    """The stored status as the state shown (the CLI lends the orchestrator's richer one:
    running, lost, waiting, preempted, ...)."""
    return str(doc["status"]), None


def basic_row(store: Store, doc: dict[str, Any], now: float) -> dict[str, Any]:
    """One session's row (the CLI lends the orchestrator's `status` row instead)."""
    return table_rows(store, [doc], now, stored_state)[0]


@dataclass
class Hooks:
    """What the layer above lends the dashboard: its row builder and its actions."""

    row: Row = basic_row
    state: State = stored_state
    actions: dict[str, Action] = field(default_factory=dict)


# --- sessions table -----------------------------------------------------------------------
def parse_query(params: dict[str, str]) -> tuple[dict[str, str], str, bool, int, int]:
    """(filters, sort key, descending, page, per page) from a request's query string."""
    filters = {k: params[k].strip() for k in FILTER_KEYS if params.get(k, "").strip()}
    sort = params.get("sort") or "created"
    if sort not in SORT_KEYS:
        raise BadRequest(f"sort={sort!r}: sort on one of {', '.join(SORT_KEYS)}")
    if filters.get("status") and filters["status"] not in {s.value for s in SessionStatus}:
        raise BadRequest(f"status={filters['status']!r}: one of "
                         f"{', '.join(s.value for s in SessionStatus)}")
    try:
        page = max(1, int(params.get("page") or 1))
        per_page = int(params.get("per_page") or 25)
    except ValueError as exc:
        raise BadRequest(f"page and per_page are whole numbers ({exc})") from exc
    if per_page not in PAGE_SIZES:
        raise BadRequest(f"per_page={per_page}: one of {', '.join(map(str, PAGE_SIZES))}")
    return filters, sort, params.get("order", "desc") != "asc", page, per_page


def list_sessions(store: Store, filters: dict[str, str], sort: str, descending: bool,
                  page: int, per_page: int, hooks: Hooks) -> dict[str, Any]:
    """One page of the sessions table: {total, page, per_page, rows}.

    Name (a prefix, as `ptutils status --name`), status, tag and sweep are the store's
    indexed `SessionQuery`; sorted by created or updated, the page itself comes from the
    store (`list_sessions` with limit and offset) and a short first page needs no count.
    Free text, or a sort on another column, reads every match and sorts here. Rows (with
    their last metrics) are built for the page only.
    """
    status, tag = filters.get("status"), filters.get("tag")
    query = SessionQuery(name=filters.get("name") or None, tags=(tag,) if tag else (),
                         sweep=filters.get("sweep"), status=(status,) if status else None)
    start = (page - 1) * per_page
    text = filters.get("q", "").lower()
    if sort in SESSION_SORTS and not text:
        docs = store.list_sessions(query, sort=sort, descending=descending, limit=per_page,
                                   offset=start)
        short = len(docs) < per_page and (docs or start == 0)
        total = start + len(docs) if short else store.count_sessions(query)
    else:
        docs = store.list_sessions(query)
        if text:
            docs = [d for d in docs if text in _haystack(d)]
        docs.sort(key=lambda d: _sort_value(d, sort), reverse=descending)
        total, docs = len(docs), docs[start:start + per_page]
    rows = table_rows(store, docs, store.now(), hooks.state)
    return {"total": total, "page": page, "per_page": per_page, "rows": rows}


def table_rows(store: Store, docs: list[dict[str, Any]], now: float, state: State
               ) -> list[dict[str, Any]]:
    """Rows of the sessions table: the documents plus their last metrics, from each
    session's `summary` (no query), or for sessions of an older ptutils in a few batched
    queries (one for eval points, one per cluster of nearby steps for the train loss)."""
    evals: dict[str, dict[int, dict[str, float]]] = {}
    loss: dict[str, float] = {}
    missing = []  # sessions whose `summary` does not hold every point (older ptutils)
    for d in docs:
        known = summaries.read(d)
        if known is None or not known["complete"]:
            missing.append(d)
            continue
        if known["loss"] is not None:
            loss[d["_id"]] = known["loss"]
        if known["eval_step"] is not None:
            evals[d["_id"]] = {known["eval_step"]: known["eval"]}
    ids = [d["_id"] for d in missing]
    for p in store.query_statistics(ids, phase="eval") if ids else []:
        evals.setdefault(p["session"], {}).setdefault(p["step"], {})[p["name"]] = p["value"]
    for lo, hi, group in _step_groups(missing):
        wanted = {d["_id"]: int(d["step"]) for d in group}
        for p in store.query_statistics(list(wanted), phase="train", name="loss",
                                        step_min=lo, step_max=hi):
            if p["step"] == wanted[p["session"]]:
                loss[p["session"]] = p["value"]
    rows = []
    for d in docs:
        shown, waiting = state(store, d, now)
        lease = d.get("lease") or {}
        error = d.get("error") or {}
        last = max(evals.get(d["_id"], {}), default=None)
        rows.append({
            "id": d["_id"], "name": d["name"], "status": d["status"], "state": shown,
            "waiting_for": waiting, "step": int(d["step"]), "total_steps": int(d["total_steps"]),
            "loss": loss.get(d["_id"]), "eval_step": last,
            "eval": evals[d["_id"]][last] if last is not None else {},
            "worker": lease.get("worker") if shown == "running" else None,
            "sweep": d.get("sweep"), "tags": d.get("tags") or [],
            "created": float(d.get("created") or 0),
            "updated_ago": now - float(d.get("updated") or now),
            "error": error.get("message") if isinstance(error, dict) else str(error),
        })
    return rows


STEP_SPAN = 1024
"""Steps apart that two sessions of a page may be and still share one loss query."""


def _step_groups(docs: list[dict[str, Any]]) -> list[tuple[int, int, list[dict[str, Any]]]]:
    """(lowest step, highest step, documents) of sessions whose steps lie close together."""
    groups: list[tuple[int, int, list[dict[str, Any]]]] = []
    for d in sorted((d for d in docs if int(d["step"])), key=lambda d: int(d["step"])):
        step = int(d["step"])
        if groups and step - groups[-1][0] <= STEP_SPAN:
            groups[-1] = (groups[-1][0], step, [*groups[-1][2], d])
        else:
            groups.append((step, step, [d]))
    return groups


def _haystack(doc: dict[str, Any]) -> str:
    error = doc.get("error") or {}
    parts = [doc["name"], doc["_id"], doc.get("sweep") or "", *(doc.get("tags") or []),
             error.get("message") or "" if isinstance(error, dict) else str(error)]
    return " ".join(map(str, parts)).lower()


def _sort_value(doc: dict[str, Any], key: str) -> Any:
    value = doc.get(key)
    if key in ("created", "updated", "step"):
        return float(value or 0)
    return str(value or "")


# --- one session ----------------------------------------------------------------------------
def session_detail(store: Store, ref: str, hooks: Hooks, store_arg: str) -> dict[str, Any]:
    """Everything the session page shows but its curves."""
    doc = store.get_session(ref)
    row = hooks.row(store, doc, store.now())
    checkpoints = [
        {k: c.get(k) for k in ("step", "kind", "size", "metrics", "created", "corrupt")}
        for c in store.list_checkpoints(doc["_id"])
    ]
    name = doc["name"]
    return {
        "row": row,
        "config_yaml": yaml.safe_dump(doc.get("config") or {}, sort_keys=False),
        "events": doc.get("events") or [],
        "error": doc.get("error"),
        "checkpoints": checkpoints,
        "tags": doc.get("tags") or [],
        "created": doc.get("created"),
        "updated": doc.get("updated"),
        "attempts": doc.get("attempts"),
        "commands": {
            "resume": resume_command(doc, store_arg),
            "export": f"ptutils export {name} -o {name}.safetensors --store {store_arg}",
            "stats": f"ptutils stats {name} --store {store_arg}",
        },
        "series": series_names(store, doc),
    }


def resume_command(doc: dict[str, Any], store_arg: str) -> str:
    """How to continue the session: `ptutils run --resume` for one `ptutils run` started;
    for one submitted to the cluster (it records a train queue), `ptutils requeue` once
    failed or cancelled, else `ptutils resume` (of a paused session)."""
    name = doc["name"]
    if not (doc.get("meta") or {}).get("queue"):
        return f"ptutils run --resume {name} --store {store_arg}"
    ended = doc["status"] in (str(SessionStatus.FAILED), str(SessionStatus.CANCELLED))
    return f"ptutils {'requeue' if ended else 'resume'} {name} --store {store_arg}"


def series_names(store: Store, doc: dict[str, Any]) -> list[str]:
    """`phase/name` of the curves a session has (from the store's per-series summaries),
    train/loss first."""
    names = {f"{phase}/{name}" for phase, name in store.statistic_series(doc["_id"])}
    return sorted(names, key=lambda n: (n != "train/loss", n))


# --- curves -----------------------------------------------------------------------------------
def curve(store: Store, ref: str, series: str, buckets: int,
          start: int | None = None, end: int | None = None) -> dict[str, Any]:
    """One curve (`phase/name`), min/max-downsampled by the store to `buckets` buckets
    between steps `start` and `end` (ptutils.store.curves).

    {series, name (the session's), steps, values, points (stored), nonfinite (steps of
    NaN/inf values, which a chart cannot draw), last_step, bucket_steps}.
    """
    phase, sep, name = series.partition("/")
    if not sep or phase not in ("train", "eval") or not name:
        raise BadRequest(f"series={series!r}: give it as train/NAME or eval/NAME")
    if not 1 <= buckets <= MAX_BUCKETS:
        raise BadRequest(f"buckets={buckets}: between 1 and {MAX_BUCKETS}")
    doc = store.get_session(ref)
    got = store.statistic_buckets(doc["_id"], phase, name, buckets, start=start, end=end)
    return {"series": series, "name": doc["name"], "steps": got.steps, "values": got.values,
            "points": got.points, "nonfinite": got.nonfinite, "last_step": got.last,
            "bucket_steps": got.bucket_steps}


# --- a sweep or search -------------------------------------------------------------------------
def sweep_points(store: Store, sweep: str, metric: str | None) -> dict[str, Any]:
    """The sessions of a sweep or search as points: the config values that differ between
    them (numbers only) and their last value of `metric` (`eval/NAME`; default: the first
    eval metric found)."""
    docs = store.find_sessions(sweep=sweep)
    ids = [d["_id"] for d in docs]
    last: dict[str, dict[str, tuple[int, float]]] = {}
    for p in store.query_statistics(ids, phase="eval") if ids else []:
        seen = last.setdefault(p["session"], {})
        if p["name"] not in seen or p["step"] >= seen[p["name"]][0]:
            seen[p["name"]] = (p["step"], p["value"])
    metrics = sorted({n for s in last.values() for n in s})
    name = metric.removeprefix("eval/") if metric else (metrics[0] if metrics else "")
    flat = {d["_id"]: _numbers(d.get("config") or {}) for d in docs}
    keys = sorted({k for f in flat.values() for k in f})
    params = [k for k in keys if len({f.get(k) for f in flat.values()}) > 1]
    rows = [{"id": d["_id"], "name": d["name"], "params": {k: flat[d["_id"]].get(k)
                                                          for k in params},
             "value": last.get(d["_id"], {}).get(name, (None, None))[1]} for d in docs]
    return {"sweep": sweep, "metric": f"eval/{name}" if name else None,
            "metrics": [f"eval/{m}" for m in metrics], "params": params, "sessions": rows}


def _numbers(config: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_numbers(value, path + "."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[path] = float(value)
    return out


# --- workers and actions ----------------------------------------------------------------------
def workers(store: Store) -> list[dict[str, Any]]:
    """Workers seen through the leases of queued/running sessions: what each runs, on
    which devices, and when its lease (renewed by heartbeat) expires."""
    now = store.now()
    found: dict[str, dict[str, Any]] = {}
    for doc in store.find_sessions(status=["queued", "running"]):
        lease = doc.get("lease") or {}
        if not lease.get("worker"):
            continue
        w = found.setdefault(lease["worker"], {"worker": lease["worker"], "sessions": [],
                                               "devices": [], "expires_in": None})
        expires_in = float(lease.get("expires", 0)) - now
        w["sessions"].append({"id": doc["_id"], "name": doc["name"], "step": doc["step"],
                              "total_steps": doc["total_steps"]})
        w["devices"] += [d for d in lease.get("devices") or [] if d not in w["devices"]]
        w["expires_in"] = max(expires_in, w["expires_in"] or expires_in)
    for w in found.values():
        w["alive"] = w["expires_in"] > 0
    return sorted(found.values(), key=lambda w: w["worker"])


def act(store: Store, ref: str, action: str, hooks: Hooks) -> dict[str, Any]:
    """Run one of the lent actions (cancel, pause, resume, requeue) on a session; the new
    row. The action's own errors (a refusal, a broker down) go to the caller."""
    if action not in hooks.actions:
        raise BadRequest(f"action {action!r}: this server offers "
                         f"{', '.join(sorted(hooks.actions)) or 'none'}")
    doc = hooks.actions[action](store, ref)
    return hooks.row(store, doc, store.now())
