"""The search driver: reads finished evals from the store, decides, records, applies.

Every pass (`Driver.tick`) is: observe (each live trial's rung value, once its session
completed at its budget and its Eval wrote the metric) -> decide, in a fixed order
(rung decisions in trial-number order, then asks in trial-number order) -> record the
whole search document with a compare-and-set -> apply to the sessions (create, extend,
mark stopped, exploit), each application idempotent. A driver killed at any point
starts again, re-applies what was recorded, and goes on: no trial is asked twice, run
twice or lost. Trials are ordinary sessions `<search>-<n>` tagged `search:<search>`.

A trial's session has `total_steps` = its current budget (a rung), so it completes at
the rung with its checkpoint and never trains past a decision; a promotion raises the
budget (config and document) and starts the next Train chunk from that checkpoint,
which is the same arithmetic as an uninterrupted run (exact resume).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from ptutils.config import config_hash
from ptutils.errors import ConfigError, PtutilsError, SessionNotFound
from ptutils.plan import Plan, lost_eval_steps
from ptutils.protocol import EVAL, Task
from ptutils.search import pbt as pbt_mod
from ptutils.search.sampler import ALGOS, ask
from ptutils.search.schedulers import (
    FINISHED,
    SCHEDULERS,
    asha_decision,
    brackets,
    pbt_exploits,
    rank_key,
    rungs,
)
from ptutils.search.space import Space, apply_params
from ptutils.slots import train_queue, world_size_of
from ptutils.store.base import SessionStatus, Store, new_id, new_session_doc

log = logging.getLogger("ptutils.search")

KIND = "search"
"""The store document kind of a search's state (`Store.get_document(KIND, name)`)."""


PARTIAL_EVAL_SECONDS = 30.0
"""How long a trial's eval statistics at a rung may lack the search's metric (an Eval
still writing them) before `--metric` is taken to name no statistic of the config."""


class SearchError(PtutilsError):
    """A search cannot go on (another driver changed it, or nothing can run)."""


@dataclass
class SearchSpec:
    """What `ptutils search` was asked for; stored with the search, fixed at creation."""

    name: str
    config: dict[str, Any]
    space: dict[str, Any]
    algo: str = "random"
    scheduler: str = "none"
    trials: int = 16
    metric: str = "test/accuracy"
    mode: str = "max"
    parallel: int = 4
    seed: int = 0
    eta: int = 3
    min_steps: int = 0
    pbt_fraction: float = 0.25
    pbt_interval: int = 0
    code: list[dict[str, Any]] = field(default_factory=list)
    queue: str = "train"
    """Train queue of the trials on Celery (world size N > 1: `QUEUE-xN`, as submit)."""
    priority: int = 5
    """Priority (0..9) of the trials' messages on Celery."""

    def check(self) -> tuple[Space, Plan, list[list[int]]]:
        """Validate everything a bad command line could get wrong; (space, plan, rungs of
        each bracket). ConfigError names the option or key."""
        space = Space.parse(self.space)
        plan = Plan.from_config(self.config.get("session"))
        if self.algo not in ALGOS:
            raise ConfigError(f"--algo: {self.algo!r} is not one of {', '.join(ALGOS)}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"--scheduler: {self.scheduler!r} is not one of "
                              f"{', '.join(SCHEDULERS)}")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"--mode: must be min or max, got {self.mode!r}")
        if not self.queue or not 0 <= self.priority <= 9:
            raise ConfigError("--queue must be a name and --priority within 0..9")
        if self.trials < 1 or self.parallel < 1:
            raise ConfigError("--trials and --parallel must be >= 1")
        if "/" not in self.metric:
            raise ConfigError(f"--metric: expected TARGET/NAME of an eval statistic, e.g. "
                              f"test/accuracy (got {self.metric!r})")
        unit = plan.eval_every or plan.total_steps
        if self.scheduler in ("asha", "hyperband"):
            lo = self.min_steps or unit
            return space, plan, brackets(rungs(lo, plan.total_steps, self.eta, unit),
                                         self.scheduler)
        if self.scheduler == "pbt":
            every = self.pbt_interval or unit
            if every % unit or every >= plan.total_steps:
                raise ConfigError(f"--pbt-interval: must be a multiple of session.eval_every="
                                  f"{unit} below session.total_steps, got {every}")
            if not 0 < self.pbt_fraction <= 0.5:
                raise ConfigError("--pbt-fraction: must be within (0, 0.5]")
            return space, plan, [[*range(every, plan.total_steps, every), plan.total_steps]]
        return space, plan, [[plan.total_steps]]

    def live_limit(self) -> int:
        """How many trials may be live at once (PBT: the whole population)."""
        return self.trials if self.scheduler == "pbt" else self.parallel


class Executor(Protocol):
    """Runs trial sessions: in-process (LocalExecutor) or on Celery (orchestrator)."""

    def start(self, doc: dict[str, Any]) -> None:
        """Start (or continue) the session's Train chunks from its current step."""

    def evaluate(self, doc: dict[str, Any], step: int) -> None:
        """Make sure Eval(step) of the session runs (after a driver restart)."""

    def pump(self) -> bool:
        """Let work progress (run a task, or wait a poll interval); False if idle."""


def create_search(store: Store, spec: SearchSpec) -> dict[str, Any]:
    """Store a new search (after `spec.check()`); SearchError if the name is taken."""
    spec.check()
    body = {"spec": asdict(spec), "trials": [], "log": [], "done": False,
            "created": time.time()}
    doc = store.put_document(KIND, spec.name, body, version=None)
    if doc is None:
        raise SearchError(f"a search named {spec.name!r} already exists in {store.url}: "
                          "resume it with `ptutils search --resume NAME`, or pick --name")
    return doc


def load_search(store: Store, name: str) -> dict[str, Any]:
    doc = store.get_document(KIND, name)
    if doc is None:
        names = ", ".join(store.list_documents(KIND)) or "none"
        raise SearchError(f"no search named {name!r} in {store.url} (searches: {names})")
    return doc


class Driver:
    """Drives one search to its end against a store and an executor."""

    def __init__(self, store: Store, name: str, executor: Executor) -> None:
        self.store, self.name, self.executor = store, name, executor
        doc = load_search(store, name)
        self.spec = SearchSpec(**doc["body"]["spec"])
        self.space, self.plan, self.brackets = self.spec.check()
        self._partial: dict[tuple[str, int], float] = {}

    # --- the loop -------------------------------------------------------------------
    def run(self, *, poll: float = 0.5, timeout: float | None = None) -> dict[str, Any]:
        """Resume, then tick until every trial is finished; the final search body."""
        deadline = None if timeout is None else time.monotonic() + timeout
        body = self.resume()
        while not body["done"]:
            body = self.tick()
            if body["done"]:
                break
            if not self.executor.pump():
                time.sleep(poll)
            if deadline is not None and time.monotonic() > deadline:
                raise SearchError(f"search {self.name!r} did not finish in {timeout} s")
        return body

    def resume(self) -> dict[str, Any]:
        """After a (killed) driver: re-apply the recorded state and restart live trials."""
        body = load_search(self.store, self.name)["body"]
        self._apply(body)
        for t in body["trials"]:
            doc = self._session(t)
            if doc is None:
                continue
            lost = lost_eval_steps(self.store, doc)
            for n in lost:  # the driver was killed before they ran
                self.executor.evaluate(doc, n)
            if t["state"] in FINISHED:
                continue
            doc = self._clear_dead_lease(doc)
            if not SessionStatus(doc["status"]).finished:
                self.executor.start(doc)
            elif doc["step"] == t["budget"] and doc["step"] not in lost \
                    and self._metric(doc, doc["step"]) is None:
                self.executor.evaluate(doc, doc["step"])
        return body

    def tick(self) -> dict[str, Any]:
        """One pass: observe, decide, record (CAS), apply; the new body."""
        for _ in range(20):
            cur = load_search(self.store, self.name)
            body = cur["body"]
            changed = self._observe(body)
            changed |= self._decide(body)
            if not changed:
                return body
            if self.store.put_document(KIND, self.name, body, version=cur["version"]):
                self._apply(body)
                return body
        raise SearchError(f"search {self.name!r} keeps changing under this driver: is "
                          "another `ptutils search` driving it?")

    # --- observe --------------------------------------------------------------------
    def _observe(self, body: dict[str, Any]) -> bool:
        changed = False
        for t in body["trials"]:
            if t["state"] in FINISHED:
                continue
            doc = self._session(t)
            if doc is None:
                continue
            if t.get("pending"):  # a PBT exploit: done once the member was extended
                if int(doc["total_steps"]) <= int(t["pending"]["step"]):
                    continue
                t["lineage"] = list((doc.get("meta") or {}).get("lineage") or [])
                t["params"] = (doc.get("meta") or {}).get("params") or t["params"]
                del t["pending"]
                changed = True
            if doc["status"] in (str(SessionStatus.FAILED), str(SessionStatus.CANCELLED)):
                t["state"], t["reason"] = "failed", (doc.get("error") or {}).get(
                    "message", doc["status"])
                changed = True
                continue
            at = {int(s) for s, _ in t["rungs"]}
            step = int(doc["step"])
            if doc["status"] == str(SessionStatus.COMPLETED) and step == t["budget"] \
                    and step not in at:
                value = self._metric(doc, step)
                if value is not None:
                    t["rungs"].append([step, value])
                    changed = True
        return changed

    def _metric(self, doc: dict[str, Any], step: int) -> float | None:
        pts = self.store.query_statistics(doc["_id"], phase="eval", name=self.spec.metric,
                                          step_min=step, step_max=step)
        if pts:
            return float(pts[0]["value"])
        if self.store.query_statistics(doc["_id"], phase="eval", step_min=step, step_max=step):
            # An Eval on a worker writes its statistics while this driver reads: only a
            # metric still missing a while after the others is a wrong --metric.
            first = self._partial.setdefault((doc["_id"], step), time.monotonic())
            if time.monotonic() - first < PARTIAL_EVAL_SECONDS:
                return None
            raise SearchError(f"--metric {self.spec.metric}: trial {doc['name']} has eval "
                              "statistics but not this one; see `ptutils stats "
                              f"{doc['name']}` for the names")
        return None

    # --- decide ---------------------------------------------------------------------
    def _decide(self, body: dict[str, Any]) -> bool:
        changed = self._decide_rungs(body)
        changed |= self._ask(body)
        if not body["done"] and len(body["trials"]) == self.spec.trials and all(
            t["state"] in FINISHED for t in body["trials"]
        ):
            body["done"] = True
            best = best_trial(body)
            self._log(body, "done", best["n"] if best else None, None,
                      "best " + (f"{best['value']:.6g}" if best else "none"))
            changed = True
        return changed

    def _decide_rungs(self, body: dict[str, Any]) -> bool:
        if self.spec.scheduler == "pbt":
            return self._decide_pbt(body)
        changed = False
        trials = body["trials"]
        for i, t in enumerate(trials):
            if t["state"] != "running" or not t["rungs"] or t["rungs"][-1][0] != t["budget"]:
                continue
            step, value = int(t["rungs"][-1][0]), float(t["rungs"][-1][1])
            ladder = self.brackets[t["bracket"]]
            if step == ladder[-1]:
                t["state"], t["value"] = "complete", value
                self._log(body, "complete", t["n"], step, f"{self.spec.metric}={value:.6g}")
                changed = True
                continue
            verdict = asha_decision(trials, i, step, self.spec.eta, self.spec.mode)
            if verdict is None:
                continue
            kind, why = verdict
            if kind == "promote":
                t["budget"] = ladder[ladder.index(step) + 1]
                why += f"; budget {t['budget']}"
            else:
                t["state"], t["value"], t["reason"] = "stopped", value, f"{self.spec.scheduler}: {why}"
            self._log(body, kind, t["n"], step, why)
            changed = True
        return changed

    def _decide_pbt(self, body: dict[str, Any]) -> bool:
        members = [t for t in body["trials"] if t["state"] not in FINISHED]
        if len(body["trials"]) < self.spec.trials or not members:
            return False
        step = members[0]["budget"]
        if any(t["budget"] != step or not t["rungs"] or t["rungs"][-1][0] != step
               for t in members):
            return False
        ladder = self.brackets[0]
        if step == ladder[-1]:
            for t in members:
                t["state"], t["value"] = "complete", float(t["rungs"][-1][1])
                self._log(body, "complete", t["n"], step, f"{self.spec.metric}={t['value']:.6g}")
            return True
        nxt = ladder[ladder.index(step) + 1]
        plans = pbt_exploits(members, step, self.spec.pbt_fraction, self.spec.mode,
                             self.spec.seed, pbt_mod.PERTURBED, pbt_mod.FACTORS)
        by_n = {t["n"]: t for t in members}
        for p in plans:
            t = by_n[p["member"]]
            t["pending"] = {"step": step, "donor": p["donor"], "factors": p["factors"]}
            self._log(body, "exploit", t["n"], step,
                      f"copies trial {p['donor']}, factors {p['factors']}")
        for t in members:
            t["budget"] = nxt
        return True

    def _ask(self, body: dict[str, Any]) -> bool:
        trials = body["trials"]
        limit = self.spec.live_limit()
        changed = False
        while len(trials) < self.spec.trials:
            n = len(trials)
            if any(t["state"] not in FINISHED for t in trials[: max(0, n - limit + 1)]):
                break
            known = n - limit + 1  # trials before it are finished: their records are final
            history = [_told(t) if t["n"] < known else _running(t) for t in trials]
            values = ask(self.spec.algo, self.space, self.spec.seed, n, history, self.spec.mode)
            bracket = n % len(self.brackets)
            trials.append({"n": n, "name": f"{self.name}-{n}", "params": [[k, v] for k, v in
                                                                          values.items()],
                           "bracket": bracket, "budget": self.brackets[bracket][0],
                           "rungs": [], "state": "running", "value": None, "reason": None,
                           "lineage": []})
            self._log(body, "ask", n, None, ", ".join(f"{k}={v}" for k, v in values.items()))
            changed = True
        return changed

    def _log(self, body: dict[str, Any], kind: str, n: int | None, step: int | None,
             detail: str) -> None:
        body["log"].append({"seq": len(body["log"]), "kind": kind, "trial": n, "step": step,
                            "detail": detail})

    # --- apply ----------------------------------------------------------------------
    def _apply(self, body: dict[str, Any]) -> None:
        """Make every trial's session match its record (idempotent)."""
        for t in body["trials"]:
            if t.get("pending"):
                self._write_exploit(body, t)
        for t in body["trials"]:
            doc = self._session(t)
            if doc is None:
                doc = self._create(t)
                if doc is None:
                    continue
                self.executor.start(doc)
                continue
            if t["state"] == "stopped" and not (doc.get("meta") or {}).get("stopped"):
                self._cas(doc, {"meta": {**(doc.get("meta") or {}), "stopped": t["reason"]}})
            elif t["state"] == "running" and int(doc["total_steps"]) < t["budget"] \
                    and doc["status"] == str(SessionStatus.COMPLETED):
                new = self._extend(doc, t)
                if new is not None:
                    self.executor.start(new)

    def _create(self, t: dict[str, Any]) -> dict[str, Any] | None:
        values = dict(t["params"])
        cfg = apply_params(self.spec.config, values)
        cfg.setdefault("session", {})["total_steps"] = t["budget"]
        cfg["name"] = t["name"]
        import torch

        size = world_size_of(cfg)  # routed as `ptutils submit` routes a session
        meta = {"torch": torch.__version__, "threads": self.plan.threads,
                "queue": train_queue(self.spec.queue, size), "world_size": size,
                "priority": self.spec.priority, "search": self.name, "trial": t["n"],
                "params": t["params"]}
        doc = new_session_doc(t["name"], cfg, config_hash(cfg), t["budget"],
                              tags=[*(cfg.get("tags") or []), f"search:{self.name}"],
                              status=SessionStatus.QUEUED, meta=meta)
        doc = {**doc, "code": self.spec.code}
        try:
            return self.store.create_session(doc)
        except PtutilsError:
            return self._session(t)  # created by a driver killed before it recorded it

    def _extend(self, doc: dict[str, Any], t: dict[str, Any]) -> dict[str, Any] | None:
        """Raise a completed trial's budget: the next Train continues from its checkpoint."""
        cfg = dict(doc["config"])
        cfg["session"] = {**(cfg.get("session") or {}), "total_steps": t["budget"]}
        update: dict[str, Any] = {
            "config": cfg, "config_hash": config_hash(cfg), "total_steps": t["budget"],
            "status": str(SessionStatus.QUEUED), "token": new_id(), "lease": None,
            "attempts": 0,
        }
        return self._cas(doc, update)

    def _write_exploit(self, body: dict[str, Any], t: dict[str, Any]) -> None:
        """PBT: the member's checkpoint at the ready step becomes the donor's State with
        perturbed hyperparameters (the same segments: no tensor bytes written)."""
        p = t["pending"]
        doc = self._session(t)
        if doc is None or int(doc["step"]) != p["step"] or int(doc["total_steps"]) != p["step"]:
            return  # applied already (the member moved on)
        donor = next(d for d in body["trials"] if d["n"] == p["donor"])
        ddoc = self._session(donor)
        assert ddoc is not None
        src = self.store.get_checkpoint(ddoc["_id"], p["step"])
        state, hp = pbt_mod.perturb(self.store.load_state(src), p["factors"])
        mine = self.store.get_checkpoint(doc["_id"], p["step"])
        written = self.store.put_checkpoint(doc["_id"], p["step"], mine["kind"], state,
                                            metrics=src.get("metrics") or {})
        entry = {"step": p["step"], "donor": p["donor"], "factors": p["factors"],
                 "hparams": hp, "bytes_written": int(written.get("bytes_written", 0))}
        lineage = [e for e in (doc.get("meta") or {}).get("lineage") or []
                   if e["step"] != p["step"]]
        cfg = {**ddoc["config"], "name": doc["config"].get("name", t["name"]),
               "session": {**ddoc["config"]["session"], "total_steps": p["step"]}}
        route = {k: v for k, v in (ddoc.get("meta") or {}).items()
                 if k in ("queue", "world_size", "priority")}  # the donor's config, its route
        self._cas(doc, {  # PBT: the member takes the donor's whole config, then perturbs
            "config": cfg, "config_hash": config_hash(cfg), "code": ddoc.get("code") or [],
            "meta": {**(doc.get("meta") or {}), **route, "lineage": [*lineage, entry],
                     "params": donor["params"]},
        })

    # --- sessions -------------------------------------------------------------------
    def _session(self, t: Mapping[str, Any]) -> dict[str, Any] | None:
        try:
            return self.store.get_session(t["name"])
        except SessionNotFound:
            return None

    def _cas(self, doc: dict[str, Any], update: dict[str, Any]) -> dict[str, Any] | None:
        for _ in range(20):
            new = self.store.cas_session(doc["_id"], {"token": doc["token"],
                                                      "updated": doc.get("updated")}, update)
            if new is not None:
                return new
            doc = self.store.get_session(doc["_id"])
        raise SearchError(f"session {doc['name']} keeps changing; cannot record the search")

    def _clear_dead_lease(self, doc: dict[str, Any]) -> dict[str, Any]:
        from ptutils.runner import lease_is_dead

        lease = doc.get("lease")
        if lease and lease_is_dead(lease, self.store.now()):
            return self.store.cas_session(doc["_id"], {"token": doc["token"]},
                                          {"lease": None}) or doc
        return doc


def _told(t: Mapping[str, Any]) -> dict[str, Any]:
    """A trial record as the sampler sees it (running | pruned | complete | failed)."""
    state = {"running": "running", "stopped": "pruned", "complete": "complete",
             "failed": "failed"}[t["state"]]
    return {"params": t["params"], "state": state, "value": t["value"], "rungs": t["rungs"]}


def _running(t: Mapping[str, Any]) -> dict[str, Any]:
    """A trial that may be live when trial n is asked, as the sampler sees it: running,
    nothing reported (what it reported so far depends on timing)."""
    return {"params": t["params"], "state": "running", "value": None, "rungs": []}


def best_trial(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The best trial that trained to the end (value at the last rung)."""
    mode = body["spec"]["mode"]
    done = [t for t in body["trials"] if t["state"] == "complete" and t["value"] is not None]
    if not done:
        return None
    return min(done, key=lambda t: rank_key(mode)((t["value"], t["n"])))


def steps_spent(body: Mapping[str, Any]) -> int:
    """Training steps of every trial (the furthest rung each reached)."""
    return sum(max((int(s) for s, _ in t["rungs"]), default=0) for t in body["trials"])


def decisions(body: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """The decisions (kind, trial, step, detail), each trial's in the order taken, trial
    by trial, then `done`: what a search decided, whatever the worker timing (the log
    interleaves trials as their evals happened to arrive)."""
    return [(e["kind"], e["trial"], e["step"], e["detail"]) for e in sorted(
        body["log"], key=lambda e: (e["kind"] == "done", e["trial"] or 0, e["seq"]))]


def eval_task(doc: dict[str, Any], step: int) -> Task:
    return Task(EVAL, doc["_id"], doc["token"], step=step)
