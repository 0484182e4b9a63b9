"""`ptutils search` on the Celery cluster: real workers, redis-server, MongoDB (nx-27017).

The same search (6 trials, ASHA with rungs 20 and 60, tiny digits MLPs, seed 7) runs
in-process (`--local`: Driver + LocalExecutor) and as a `ptutils search` process whose
trials are sessions on 2 real `ptutils worker`s; both must record the same decisions
and end with the same best trial, its weights bit-identical. A worker SIGKILLed in the
middle of a trial's chunk must change nothing: its lease expires, reconcile on the
other worker requeues the chunk, the search ends the same.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import tests.test_workers as cluster
from ptutils.search import best_trial, decisions
from ptutils.store.local import LocalStore
from ptutils.store.mongo import MongoStore
from tests.helpers import assert_bit_identical, digits_config
from tests.test_search import SPACE
from tests.test_workers import FIXTURES, LEASE_TTL, PY, ROOT, Worker, wait_for

redis_db = cluster.redis_db  # fixtures: a fresh redis database, MongoDB, worker processes
store_uri = cluster.store_uri
workers = cluster.workers

NAME = "hp"
TRIALS = 6
OPTIONS = ["--algo", "tpe", "--scheduler", "asha", "--trials", str(TRIALS), "--parallel",
           "3", "--seed", "7"]
STEP_SECONDS = 0.04
"""Step time on the workers (SlowSteps): a 20-step chunk lasts about a second."""


def search_config() -> dict[str, Any]:
    """The digits MLP of tests/test_search.py, slowed down on the workers (SlowSteps
    draws no random number: the in-process reference computes the same numbers)."""
    cfg = digits_config(imports=[FIXTURES], callbacks=[{"type": "worker_fixtures.SlowSteps"}])
    cfg["name"] = NAME
    return cfg


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("search")
    cfg, space = folder / "exp.yaml", folder / "space.yaml"
    cfg.write_text(yaml.safe_dump(search_config()))
    space.write_text(yaml.safe_dump(SPACE))
    return cfg, space


def run_local(files: tuple[Path, Path], folder: Path, **options: Any) -> dict[str, Any]:
    """The search run in-process, as `ptutils search --local` runs it: body, states."""
    from orchestrator.search_cli import _spec
    from ptutils.search import Driver, create_search
    from ptutils.search.local import LocalExecutor

    cfg, space = files
    kw = {"algo": "tpe", "scheduler": "asha", "trials": TRIALS, "metric": "test/accuracy",
          "mode": "max", "parallel": 3, "seed": 7, "eta": 3, "min_steps": 0,
          "pbt_interval": 0, "pbt_fraction": 0.25, **options}
    spec = _spec(str(cfg), str(space), (), None, **kw)
    with LocalStore(folder / "runs") as store:
        create_search(store, spec)
        body = Driver(store, NAME, LocalExecutor(store)).run(poll=0.0, timeout=120)
        states = {t["name"]: final_state(store, t["name"]) for t in body["trials"]}
    return {"body": body, "states": states}


@pytest.fixture(scope="module")
def reference(files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, Any]:
    """The ASHA search of OPTIONS, in-process."""
    ref = run_local(files, tmp_path_factory.mktemp("ref"))
    kinds = [d[0] for d in decisions(ref["body"])]
    assert "stop" in kinds and "promote" in kinds, "the reference search decides both ways"
    return ref


def final_state(store: Any, name: str) -> dict[str, Any]:
    doc = store.get_session(name)
    return store.load_state(store.get_checkpoint(doc["_id"]))


def start_search(files: tuple[Path, Path], broker: str, store: str, log: Path,
                 options: list[str] = OPTIONS) -> subprocess.Popen[bytes]:
    cfg, space = files
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as out:
        return subprocess.Popen(
            [PY, "-m", "orchestrator.cli", "search", str(cfg), "--space", str(space),
             *options, "--broker", broker, "--store", store, "--poll", "0.2"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen[bytes], log: Path, timeout: float,
           running: tuple[Worker, ...]) -> str:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = None
    out = log.read_text(errors="replace")
    if rc != 0:
        for w in running:
            print(f"--- {w.name} log ---\n{w.log[-6000:]}")
        raise AssertionError(f"ptutils search exited {rc}:\n{out[-6000:]}")
    return out


def two_workers(workers: Any, broker: str, store: str, step_seconds: float = STEP_SECONDS
                ) -> tuple[Any, Any]:
    """Workers a and b with slow steps, both ready (started together, then waited on)."""
    a = workers("a", broker, store, step_seconds=step_seconds)
    b = workers("b", broker, store, step_seconds=step_seconds)
    return a.wait_ready(), b.wait_ready()


def assert_same_search(store: MongoStore, reference: dict[str, Any]) -> None:
    """Same decisions, same best trial, every trial's last checkpoint bit-identical,
    every trial session routed like a submitted one, each metric point written once."""
    body = store.get_document("search", NAME)["body"]
    ref = reference["body"]
    assert body["done"]
    assert decisions(body) == decisions(ref)
    assert [(t["n"], t["state"], t["rungs"], t["lineage"]) for t in body["trials"]] == [
        (t["n"], t["state"], t["rungs"], t["lineage"]) for t in ref["trials"]]
    best = best_trial(body)
    assert best is not None and best == best_trial(ref)
    for t in body["trials"]:
        assert_bit_identical(final_state(store, t["name"]), reference["states"][t["name"]])
        doc = store.get_session(t["name"])
        assert (doc["meta"]["queue"], doc["meta"]["world_size"], doc["meta"]["priority"]) \
            == ("train", 1, 5)
        keys = [(p["phase"], p["step"], p["name"]) for p in store.query_statistics(doc["_id"])]
        assert len(keys) == len(set(keys)), f"{t['name']}: a statistic was written twice"


def test_search_on_two_workers_decides_as_in_process(
        files, reference, tmp_path, redis_db, store_uri, workers):
    a, b = two_workers(workers, redis_db, store_uri)
    started = time.monotonic()
    proc = start_search(files, redis_db, store_uri, tmp_path / "search.log")
    out = finish(proc, tmp_path / "search.log", 120, (a, b))
    print(f"search on 2 workers: {time.monotonic() - started:.1f}s")
    assert f"search {NAME}: {TRIALS} trials" in out and "best: trial" in out
    with MongoStore(store_uri) as store:
        assert_same_search(store, reference)
    assert "Train[" in a.log and "Train[" in b.log, "both workers trained trials"
    status = subprocess.run([PY, "-m", "orchestrator.cli", "search", "status", NAME, "--json",
                             "--store", store_uri], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert status.returncode == 0, status.stderr
    assert decisions(json.loads(status.stdout)) == decisions(reference["body"])


def test_worker_sigkilled_mid_search_changes_nothing(
        files, reference, tmp_path, redis_db, store_uri, workers):
    a, b = two_workers(workers, redis_db, store_uri)
    proc = start_search(files, redis_db, store_uri, tmp_path / "search.log")
    with MongoStore(store_uri) as store:

        def mid_chunk() -> tuple[Worker, str] | None:
            """A worker 5+ steps into a chunk of a trial after the first decision."""
            doc = store.get_document("search", NAME)
            if doc is None or not any(e["kind"] in ("stop", "promote")
                                      for e in doc["body"]["log"]):
                return None
            for t in doc["body"]["trials"]:
                try:
                    s = store.get_session(t["name"])
                except Exception:  # noqa: BLE001 - not created yet
                    continue
                for w in (a, b):
                    if w.owns(s.get("lease")) and w.last_step() >= int(s["step"]) + 5:
                        return w, t["name"]
            return None

        victim, trial = wait_for(mid_chunk, 90, "a worker in the middle of a trial's chunk",
                                 interval=0.1)
        other = b if victim is a else a
        victim.kill(signal.SIGKILL)
        victim.proc.wait(timeout=10)
        killed = time.monotonic()
        wait_for(lambda: other.owns(store.get_session(trial).get("lease"))
                 or store.get_session(trial)["status"] == "completed",
                 LEASE_TTL + 10, f"the other worker to take {trial} over")
        print(f"{trial} taken over {time.monotonic() - killed:.1f}s after the SIGKILL")
        finish(proc, tmp_path / "search.log", 120, (other,))
        assert_same_search(store, reference)
    assert "expired" in other.log, "reconcile requeued the killed worker's chunk"


def test_pbt_on_two_workers_exploits_as_in_process(
        files, tmp_path, redis_db, store_uri, workers):
    """PBT on the cluster: the same exploits (a member's checkpoint replaced by its
    donor's State under the workers' feet, in MongoDB), lineage and final weights."""
    options = ["--algo", "random", "--scheduler", "pbt", "--trials", "4", "--seed", "3"]
    ref = run_local(files, tmp_path / "ref", algo="random", scheduler="pbt", trials=4,
                    seed=3)
    assert sum(e["kind"] == "exploit" for e in ref["body"]["log"]) == 2
    a, b = two_workers(workers, redis_db, store_uri, STEP_SECONDS / 4)
    proc = start_search(files, redis_db, store_uri, tmp_path / "search.log", options)
    finish(proc, tmp_path / "search.log", 120, (a, b))
    with MongoStore(store_uri) as store:
        assert_same_search(store, ref)
        lineage = [e for t in store.get_document("search", NAME)["body"]["trials"]
                   for e in t["lineage"]]
        assert len(lineage) == 2 and all(e["bytes_written"] == 0 for e in lineage)


@pytest.mark.parametrize("world_size", [1, 2])
def test_trials_are_routed_as_submit_routes_sessions(redis_db, store_uri, world_size):
    """A trial is queued on `--queue` (`QUEUE-xN` for world_size N > 1) with its route in
    `meta`, so the workers' successors and reconcile send its tasks there too."""
    from orchestrator.search_cli import CeleryExecutor
    from ptutils.errors import ConfigError
    from ptutils.plan import Plan
    from ptutils.search import Driver, SearchSpec, create_search
    from workers.app import make_app
    from workers.dispatch import Route, queue_depth

    session = {} if world_size == 1 else {"world_size": world_size}
    if session:
        try:
            Plan.from_config({"total_steps": 60, **session})
        except ConfigError:
            pytest.skip("session.world_size is not a Plan key on this branch yet")
    cfg = digits_config(imports=[], callbacks=[], **session)
    del cfg["imports"]
    queue = "big" if world_size == 1 else f"big-x{world_size}"
    app = make_app(redis_db)
    with MongoStore(store_uri) as store:
        create_search(store, SearchSpec(name="ws", config=cfg, space=SPACE, trials=3,
                                        parallel=2, queue="big", priority=7))
        body = Driver(store, "ws", CeleryExecutor(store, app, poll=0.0)).tick()
        assert [t["n"] for t in body["trials"]] == [0, 1]
        for t in body["trials"]:
            doc = store.get_session(t["name"])
            assert (doc["meta"]["queue"], doc["meta"]["world_size"]) == (queue, world_size)
            assert Route.of(doc) == Route(queue, 7)
    assert queue_depth(app, queue) == 2 and queue_depth(app, "train") == 0
