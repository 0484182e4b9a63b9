"""The Celery cluster end to end: real `ptutils worker` processes, redis-server, MongoDB.

Every session here runs the same small digits config (60 steps, chunks of 20) that a
reference `ptutils run` trains in one process; whatever happens to the workers (SIGKILL,
SIGTERM, a broker that restarts empty, duplicated messages) the final checkpoint must
be bit-identical to that reference, with every statistic written once.

Steps are slowed down on the workers only (tests/worker_fixtures.SlowSteps reads
$PTUTILS_TEST_STEP_SECONDS), so a chunk lasts long enough to be interrupted.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kombu import Queue

from orchestrator.submit import prepare, submit
from ptutils.errors import BrokerUnavailable, SessionNotFound
from ptutils.protocol import TRAIN, Task
from ptutils.store import open_store
from ptutils.store.mongo import MongoStore
from tests.helpers import assert_bit_identical, digits_config
from tests.servers import REDIS_DATABASES, RedisProcess, uri_with_db
from workers.app import make_app
from workers.dispatch import Route, queue_depth, send

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = str(ROOT / "tests" / "worker_fixtures.py")
PY = sys.executable
LEASE_TTL = 3.0
SEEDS = (1, 2, 3)
_redis_dbs = itertools.count(0)
_live: list[Worker] = []


# --- configs and reference runs --------------------------------------------------------
def config(seed: int = 1, **session: Any) -> dict[str, Any]:
    cfg = digits_config(imports=[FIXTURES], callbacks=[{"type": "worker_fixtures.SlowSteps"}],
                        seed=seed, retention={"keep_last": 10}, **session)
    cfg["name"] = "digits"
    return cfg


def write_config(folder: Path, cfg: dict[str, Any], name: str = "exp.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def ptutils(*args: str, env: dict[str, str] | None = None, timeout: float = 180
            ) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([PY, "-m", "orchestrator.cli", *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Any, list]]:
    """Seed -> (final state, statistics) of `ptutils run` of the config, uninterrupted."""
    folder = tmp_path_factory.mktemp("reference")
    path = write_config(folder, config())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {
        seed: subprocess.Popen(
            [PY, "-m", "orchestrator.cli", "run", str(path), "--set", f"session.seed={seed}",
             "--name", f"ref{seed}", "--store", str(folder / "runs"), "-q"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for seed in SEEDS
    }
    for proc in procs.values():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    refs = {}
    with open_store(folder / "runs") as store:
        for seed in SEEDS:
            doc = store.get_session(f"ref{seed}")
            refs[seed] = (store.load_state(store.get_checkpoint(doc["_id"])),
                          series(store.query_statistics(doc["_id"])))
    return refs


def series(points: list[dict[str, Any]]) -> list[tuple[str, int, str, float]]:
    return [(p["phase"], p["step"], p["name"], p["value"]) for p in points]


def assert_matches_reference(store: MongoStore, ref: str, reference: dict, seed: int) -> None:
    """Completed, final checkpoint bit-identical to `ptutils run`, every point once."""
    doc = store.get_session(ref)
    assert doc["status"] == "completed", doc.get("error")
    ckpt = store.get_checkpoint(doc["_id"])
    assert ckpt["step"] == 60
    state, stats = reference[seed]
    assert_bit_identical(state, store.load_state(ckpt))
    got = series(store.query_statistics(doc["_id"]))
    keys = [p[:3] for p in got]
    assert len(keys) == len(set(keys)), "a statistic was written twice"
    assert got == stats
    assert [p[1] for p in got if p[0] == "train" and p[2] == "loss"] == list(range(1, 61))


# --- servers and workers ---------------------------------------------------------------
@pytest.fixture
def redis_db(redis_server: RedisProcess) -> str:
    """A broker URL on a database of the session's redis-server no other test uses."""
    import redis

    if not redis_server.alive:
        redis_server.start()
    db = next(_redis_dbs) % (REDIS_DATABASES - 1) + 1  # 1.., never 0; was 17 once
    url = f"redis://127.0.0.1:{redis_server.port}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


def new_store_uri(mongo_server: Any) -> str:
    return uri_with_db(mongo_server.uri, f"w_{uuid.uuid4().hex[:10]}")


@pytest.fixture
def store_uri(mongo_server: Any) -> Iterator[str]:
    uri = new_store_uri(mongo_server)
    yield uri
    _drop(uri)


def _drop(uri: str) -> None:
    import pymongo

    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=3000)
    try:
        client.drop_database(client.get_default_database().name)
    except pymongo.errors.PyMongoError:
        pass
    finally:
        client.close()


class Worker:
    """A `ptutils worker` (the launcher and its child) with its log file: with short
    lease and reconcile times, or with every default (`defaults=True`)."""

    def __init__(self, name: str, broker: str, store: str, folder: Path, *args: str,
                 step_seconds: float = 0.0, env: dict[str, str] | None = None,
                 defaults: bool = False) -> None:
        self.name = name
        self.folder = folder
        self.progress = folder / f"progress-{name}"
        self.progress.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / f"{name}.log"
        fast = [] if defaults else ["--lease-ttl", str(LEASE_TTL), "--reconcile-every", "0.5",
                                    "--stall-after", "3", "--grace", "20"]
        cmd = [PY, "-m", "orchestrator.cli", "worker", "--gpus", "none", "--name", name,
               "--broker", broker, "--store", store, *fast, "--loglevel", "info", *args]
        full = {**os.environ, "PYTHONPATH": str(ROOT), "PTUTILS_TEST_PROGRESS": str(self.progress),
                "PTUTILS_TEST_STEP_SECONDS": str(step_seconds),
                "PTUTILS_TRUST_SESSION_CODE": "1",  # the configs ship worker_fixtures.py
                **(env or {})}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        _live.append(self)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90) -> Worker:
        wait_for(lambda: " ready." in self.log, timeout, f"worker {self.name} ready",
                 alive=self)
        return self

    def owns(self, lease: dict[str, Any] | None) -> bool:
        return bool(lease) and str(lease.get("worker", "")).startswith(f"{self.name}-")

    def last_step(self) -> int:
        """The last step a process of this worker logged (SlowSteps progress files)."""
        steps = [int(p.read_text()) for p in self.progress.iterdir() if p.suffix != ".tmp"]
        return max(steps, default=0)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """`sig` to the launcher (its children follow: forwarded, or PDEATHSIG)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        stop_all([self])


def stop_all(workers: list[Worker]) -> None:
    """SIGTERM every worker still running, then wait for each (SIGKILL after 30 s): the
    warm shutdowns of several workers go on at the same time."""
    running = [w for w in workers if w.proc.poll() is None]
    for w in running:
        w.kill(signal.SIGTERM)
    for w in running:
        try:
            w.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            w.kill(signal.SIGKILL)
            w.proc.wait(timeout=10)
    for w in workers:
        if w in _live:
            _live.remove(w)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Factory of Worker processes, all stopped at the end of the test (even on failure)."""
    started: list[Worker] = []

    def make(name: str, broker: str, store: str, *args: str, **kwargs: Any) -> Worker:
        w = Worker(name, broker, store, tmp_path / "workers", *args, **kwargs)
        started.append(w)
        return w

    yield make
    stop_all(started)


def wait_for(pred: Callable[[], Any], timeout: float, what: str, *,
             alive: Worker | None = None, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        if alive is not None and alive.proc.poll() is not None:
            raise AssertionError(f"{alive.name} exited ({alive.proc.returncode}):\n"
                                 f"{alive.log[-4000:]}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def submit_configs(store: MongoStore, broker: str, folder: Path, *seeds: int,
                   name: str = "digits", **session: Any) -> list[str]:
    """Submit one session per seed through the Python API (prepare + submit)."""
    path = write_config(folder, config(**session))
    ids = []
    for seed in seeds:
        prepared = prepare(path, [f"session.seed={seed}"], name=f"{name}-{seed}")
        ids += [s.session for s in submit(store, make_app(broker), prepared)]
    return ids


def wait_done(store: MongoStore, ids: list[str], timeout: float,
              workers: tuple[Worker, ...] = ()) -> None:
    def finished(sid: str) -> bool:
        doc = store.get_session(sid)
        if doc["status"] != "completed":
            return doc["status"] in ("failed", "cancelled")
        return bool(store.query_statistics(sid, phase="eval", step_min=doc["step"]))

    def all_finished() -> bool:
        return all(finished(i) for i in ids)

    try:
        wait_for(all_finished, timeout, "the sessions to finish (and their final Eval)")
    except AssertionError:
        for w in workers:
            print(f"--- {w.name} log ---\n{w.log[-6000:]}")
        raise


def holder(store: MongoStore, sid: str, candidates: tuple[Worker, ...]) -> Worker | None:
    lease = store.get_session(sid).get("lease")
    return next((w for w in candidates if w.owns(lease)), None)


# --- tests -------------------------------------------------------------------------------
def test_sweep_of_three_sessions_on_two_workers_matches_ptutils_run(
        tmp_path, redis_db, store_uri, workers, reference):
    a = workers("a", redis_db, store_uri)
    b = workers("b", redis_db, store_uri)
    path = write_config(tmp_path, config())
    out = ptutils("submit", str(path), "--sweep", "session.seed=1,2,3", "--name", "grid",
                  "--store", store_uri, "--broker", redis_db, "--json")
    assert out.returncode == 0, out.stderr
    submitted = json.loads(out.stdout)
    assert [s["name"] for s in submitted] == ["grid-seed=1", "grid-seed=2", "grid-seed=3"]
    assert len({s["sweep"] for s in submitted}) == 1 and submitted[0]["sweep"]
    a.wait_ready()
    b.wait_ready()
    with MongoStore(store_uri) as store:
        ids = [s["session"] for s in submitted]
        wait_done(store, ids, 120, (a, b))
        for seed, sid in zip(SEEDS, ids):
            assert_matches_reference(store, sid, reference, seed)
        assert {d["sweep"] for d in store.find_sessions(sweep=submitted[0]["sweep"])} == {
            submitted[0]["sweep"]}
    assert "Train[" in a.log and "Train[" in b.log, "both workers took chunks"
    rows = json.loads(ptutils("status", "--json", "--sweep", submitted[0]["sweep"],
                              "--store", store_uri).stdout)
    assert [(r["name"], r["status"], r["step"]) for r in rows] == [
        (f"grid-seed={s}", "completed", 60) for s in SEEDS]
    assert all(r["loss"] is not None and "test/accuracy" in r["eval"] for r in rows)
    table = ptutils("status", "--store", store_uri, env={"COLUMNS": "200"}).stdout
    assert "grid-seed=2" in table and "60/60" in table


def test_sigkill_mid_chunk_continues_on_the_other_worker(
        tmp_path, redis_db, store_uri, workers, reference):
    # Slow steps in Train[20,40) only, and only until the victim is killed: the chunk
    # before it and the continuation on the other worker go at full speed.
    hold = tmp_path / "slow-steps"
    hold.touch()
    slow = {"PTUTILS_TEST_SLOW_FROM": "20", "PTUTILS_TEST_SLOW_WHILE": str(hold)}
    a = workers("a", redis_db, store_uri, step_seconds=0.1, env=slow).wait_ready()
    b = workers("b", redis_db, store_uri, step_seconds=0.1, env=slow).wait_ready()
    with MongoStore(store_uri) as store:
        (sid,) = submit_configs(store, redis_db, tmp_path, 1)

        def mid_chunk() -> Worker | None:
            doc = store.get_session(sid)
            w = holder(store, sid, (a, b))
            return w if doc["step"] == 20 and w and w.last_step() >= 25 else None

        victim = wait_for(mid_chunk, 60, "a worker in the middle of Train[20,40)")
        other = b if victim is a else a
        victim.kill(signal.SIGKILL)
        killed = time.monotonic()
        victim.proc.wait(timeout=10)
        hold.unlink()
        taken = wait_for(lambda: other.owns(store.get_session(sid).get("lease")),
                         LEASE_TTL + 5, "the other worker to take the session over")
        assert taken and time.monotonic() - killed <= LEASE_TTL + 5
        wait_done(store, [sid], 60, (other,))
        assert_matches_reference(store, sid, reference, 1)
        assert store.get_session(sid)["attempts"] == 0
    assert "expired" in other.log, "reconcile requeued the session after its lease expired"


def test_sigterm_checkpoints_the_current_step_and_requeues(
        tmp_path, redis_db, store_uri, workers, reference):
    a = workers("a", redis_db, store_uri, step_seconds=0.1,  # slow from Train[20,40) on
                env={"PTUTILS_TEST_SLOW_FROM": "20"}).wait_ready()
    with MongoStore(store_uri) as store:
        (sid,) = submit_configs(store, redis_db, tmp_path, 2)
        wait_for(lambda: store.get_session(sid)["step"] == 20 and a.last_step() >= 25, 60,
                 "Train[20,40) under way", alive=a)
        before = a.last_step()
        a.kill(signal.SIGTERM)
        stopped = time.monotonic()
        assert a.proc.wait(timeout=25) == 0
        assert time.monotonic() - stopped < 20, "exited within the grace period"
        reached = a.last_step()
        doc = store.get_session(sid)
        assert doc["checkpoint"] == {"step": reached, "kind": "preempt"}
        assert before <= reached <= before + 2, "stopped at the next step boundary"
        assert doc["step"] == reached and doc["lease"] is None
        store.load_state(store.get_checkpoint(sid, reached, "preempt"))
        b = workers("b", redis_db, store_uri).wait_ready()
        wait_done(store, [sid], 60, (b,))
        assert f"Train[{reached},40)" in b.log, "the continuation was requeued"
        assert_matches_reference(store, sid, reference, 2)
    assert "Warm shutdown" in a.log


def test_grace_running_out_or_a_second_sigterm_exits_at_once(
        tmp_path, redis_db, store_uri, workers):
    # a step takes 20 s here: no step boundary comes within the grace period
    a = workers("a", redis_db, store_uri, "--grace", "2", step_seconds=20)
    b = workers("b", redis_db, store_uri, "--grace", "60", step_seconds=20)
    a.wait_ready()
    b.wait_ready()
    with MongoStore(store_uri) as store:
        ids = submit_configs(store, redis_db, tmp_path, 1, 2)
        wait_for(lambda: a.last_step() >= 1 and b.last_step() >= 1, 60,
                 "each worker in the middle of a step")
        start = time.monotonic()
        a.kill(signal.SIGTERM)
        b.kill(signal.SIGTERM)
        time.sleep(1.5)
        b.kill(signal.SIGTERM)  # the second one: exit now
        assert b.proc.wait(timeout=10) == 1
        assert time.monotonic() - start < 6
        assert a.proc.wait(timeout=10) == 1
        assert time.monotonic() - start < 8, "grace 2 s"
        for sid in ids:  # nothing was committed: the leases will expire instead
            assert store.get_session(sid)["lease"] is not None
            assert store.get_session(sid)["step"] == 0
    assert "grace period of 2s over" in a.log
    assert "second SIGTERM" in b.log


def test_duplicated_train_message_does_the_work_once(
        tmp_path, redis_db, store_uri, workers, reference):
    a = workers("a", redis_db, store_uri, step_seconds=0.02)
    b = workers("b", redis_db, store_uri, step_seconds=0.02)
    with MongoStore(store_uri) as store:
        (sid,) = submit_configs(store, redis_db, tmp_path, 3)
        doc = store.get_session(sid)
        first = Task(TRAIN, sid, doc["token"], start=0, stop=20)
        send(make_app(redis_db), first, Route.of(doc))  # the same message, twice
        a.wait_ready()
        b.wait_ready()
        wait_done(store, [sid], 90, (a, b))
        assert_matches_reference(store, sid, reference, 3)
        assert store.get_session(sid)["attempts"] == 0
        kinds = [(c["step"], c["kind"]) for c in store.list_checkpoints(sid)]
        assert kinds == [(20, "chunk"), (40, "chunk"), (60, "final")]
    logs = a.log + b.log
    assert logs.count(f"Train[0,20) of {sid[:8]}: done") == 1
    assert logs.count(f"Train[0,20) of {sid[:8]}: no-op") == 1


def test_config_failing_on_the_worker_fails_the_session_and_the_worker_goes_on(
        tmp_path, redis_db, store_uri, workers, reference):
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    data = tmp_path / "digits.npz"
    np.savez(data, x=(digits.data / 16).astype("float32"), y=digits.target.astype("int64"))
    cfg = config()
    cfg["data"]["datasets"]["train"] = {"type": "ptutils.data.NpzReader", "path": str(data)}
    path = write_config(tmp_path, cfg, "npz.yaml")
    a = workers("a", redis_db, store_uri).wait_ready()
    with MongoStore(store_uri) as store:
        prepared = prepare(path, name="needs-file")  # validated with the file present
        data.unlink()  # ... which this worker's machine does not have
        (bad,) = [s.session for s in submit(store, make_app(redis_db), prepared)]
        (good,) = submit_configs(store, redis_db, tmp_path, 1)
        wait_done(store, [bad, good], 90, (a,))
        doc = store.get_session(bad)
        assert doc["status"] == "failed"
        assert "digits.npz" in doc["error"]["message"]
        assert doc["error"]["worker"].startswith("a-cpu0@")
        assert a.proc.poll() is None and "exited unexpectedly" not in a.log
        assert_matches_reference(store, good, reference, 1)


def test_a_task_that_keeps_killing_its_worker_fails_after_max_attempts(
        tmp_path, redis_db, store_uri, workers):
    cfg = config(max_attempts=2)
    cfg["callbacks"].append({"type": "worker_fixtures.KillWorkerAt", "step": 25})
    path = write_config(tmp_path, cfg, "poison.yaml")
    # Reconcile runs as the Celery beat task here (on the worker), not in the worker.
    a = workers("a", redis_db, store_uri, "--reconcile-every", "0").wait_ready()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PTUTILS_BROKER": redis_db,
           "PTUTILS_RECONCILE_EVERY": "0.5"}
    with open(tmp_path / "beat.log", "wb") as log:
        beat = subprocess.Popen([PY, "-m", "celery", "-A", "workers.app", "beat", "-l", "info"],
                                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        with MongoStore(store_uri) as store:
            prepared = prepare(path, name="poison")
            (sid,) = [s.session for s in submit(store, make_app(redis_db), prepared)]
            wait_done(store, [sid], 120, (a,))
            doc = store.get_session(sid)
            assert doc["status"] == "failed"
            assert "max_attempts=2" in doc["error"]["message"]
            assert doc["step"] == 20, "the checkpoint before the poison step is kept"
            store.load_state(store.get_checkpoint(sid, 20))
    finally:
        os.killpg(beat.pid, signal.SIGTERM)
        beat.wait(timeout=30)
    assert a.log.count("exited unexpectedly (killed by SIGKILL)") == 2
    assert a.log.count("expired") >= 2, "the beat task requeued the session twice"
    assert a.proc.poll() is None, "the launcher stays up"
    assert not list(tmp_path.glob("celerybeat-schedule*")), "beat keeps no pickled schedule"


def seconds_to_train_again(store: MongoStore, ids: list[str], since: float,
                           timeout: float) -> dict[str, float]:
    """Seconds from `since` (monotonic) until each session completed the chunk it was in
    (or waited to start) at that moment: an upper bound of when it trained again."""
    targets = {sid: min(60, (store.get_session(sid)["step"] // 20 + 1) * 20) for sid in ids}
    reached: dict[str, float] = {}

    def all_reached() -> bool:
        for sid in set(ids) - set(reached):
            if store.get_session(sid)["step"] >= targets[sid]:
                reached[sid] = time.monotonic() - since
        return len(reached) == len(ids)

    wait_for(all_reached, timeout, "every session to train again", interval=0.2)
    return reached


def test_broker_restarted_empty_with_default_settings_all_train_again_within_60s(
        tmp_path, redis_process, store_uri, workers, reference):
    redis = redis_process()
    broker = redis.url
    # Default settings: lease TTL 60 s, each worker reconciles every 5 s with the
    # default thresholds. Three sessions on two workers: one always waits in the queue.
    a = workers("a", broker, store_uri, step_seconds=0.05, defaults=True)
    b = workers("b", broker, store_uri, step_seconds=0.05, defaults=True)
    a.wait_ready()
    b.wait_ready()
    with MongoStore(store_uri) as store:
        ids = submit_configs(store, broker, tmp_path, 1, 2, 3)
        wait_for(lambda: any(store.get_session(i)["step"] >= 20 for i in ids), 60,
                 "a first chunk")
        redis.kill()
        time.sleep(1.0)
        redis.start()  # no persistence: every queued message is gone
        restarted = time.monotonic()
        took = seconds_to_train_again(store, ids, restarted, 60)
        print(f"trained again after the broker restart: {sorted(took.values())}")
        wait_done(store, ids, 120, (a, b))
        for seed, sid in zip(SEEDS, ids):
            assert_matches_reference(store, sid, reference, seed)
    assert max(took.values()) <= 60
    assert "reconcile:" in a.log + b.log, "a lost message was requeued by reconcile"


def test_lost_eval_message_is_sent_again_within_60s(
        tmp_path, redis_process, store_uri, workers, reference):
    redis = redis_process()
    broker = redis.url
    # This worker takes no Eval: Eval(20) waits in the eval queue until the broker
    # restarts empty; reconcile (the CLI, default thresholds) must send it again.
    a = workers("a", broker, store_uri, "-Q", "train,save", "--reconcile-every", "0",
                step_seconds=0.05, defaults=True).wait_ready()
    reconciler = subprocess.Popen(
        [PY, "-m", "orchestrator.cli", "reconcile", "--every", "5", "--store", store_uri,
         "--broker", broker, "--json"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        with MongoStore(store_uri) as store:
            (sid,) = submit_configs(store, broker, tmp_path, 1)
            app = make_app(broker)
            wait_for(lambda: queue_depth(app, "eval") and a.owns(store.get_session(sid)["lease"]),
                     60, "Eval(20) queued, Train[20,40) running", alive=a)
            redis.kill()
            redis.start()
            restarted = time.monotonic()
            b = workers("b", broker, store_uri, "-Q", "eval", "--reconcile-every", "0",
                        defaults=True)
            wait_for(lambda: store.query_statistics(sid, phase="eval", step_max=20), 60,
                     "Eval(20) to be sent again and run", alive=b)
            took = time.monotonic() - restarted
            print(f"Eval(20) ran {took:.1f}s after the broker restart")
            wait_done(store, [sid], 90, (a, b))
            assert_matches_reference(store, sid, reference, 1)
    finally:
        os.killpg(reconciler.pid, signal.SIGTERM)
        out, _ = reconciler.communicate(timeout=30)
    requeued = [r for line in out.splitlines() if line.startswith("[")
                for r in json.loads(line)]
    evals = [t for r in requeued for t in r["tasks"] if t.startswith("Eval")]
    assert evals == [f"Eval(20) of {sid[:8]}"], out
    assert took <= 60
    assert b.log.count(f"Eval(20) of {sid[:8]}: done") == 1


def test_mongodb_killed_and_restarted_mid_run_all_complete_bit_identical(
        tmp_path, redis_db, mongo_process, workers, reference):
    mongo = mongo_process()  # file-backed: a restart keeps every document
    uri = f"{mongo.uri}/faults"
    a = workers("a", redis_db, uri, step_seconds=0.05)
    b = workers("b", redis_db, uri, step_seconds=0.05)
    a.wait_ready()
    b.wait_ready()
    with MongoStore(uri) as store:
        ids = submit_configs(store, redis_db, tmp_path, 1, 2)
        wait_for(lambda: any(store.get_session(i)["step"] >= 20 for i in ids)
                 and a.last_step() + b.last_step() > 25, 60, "chunks under way")
    mongo.kill()  # SIGKILL, mid-chunk: heartbeats, statistics and commits all fail
    time.sleep(3.0)
    mongo.start()
    with MongoStore(uri) as store:
        wait_done(store, ids, 120, (a, b))
        for seed, sid in zip((1, 2), ids):
            assert_matches_reference(store, sid, reference, seed)  # every point once
    assert a.proc.poll() is None and b.proc.poll() is None, "the workers stay up"


def test_celery_inspect_active_lists_the_running_train_task(
        tmp_path, redis_db, store_uri, workers):
    a = workers("a", redis_db, store_uri, step_seconds=0.5).wait_ready()
    with MongoStore(store_uri) as store:
        (sid,) = submit_configs(store, redis_db, tmp_path, 1)
        wait_for(lambda: a.owns(store.get_session(sid).get("lease")), 60, "a running chunk",
                 alive=a)  # Train[0,20) takes 10 s
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PTUTILS_BROKER": redis_db}
        node = f"a-cpu0@{socket.gethostname()}"
        # Asked of this node only: the command returns with its reply, not after --timeout.
        out = subprocess.run([PY, "-m", "celery", "-A", "workers.app", "inspect", "active",
                              "--json", "--timeout", "5", "--destination", node], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        replies = json.loads(out.stdout)
        active = replies[node]
        assert [t["name"] for t in active] == ["ptutils.train"]
        assert active[0]["kwargs"]["session"] == sid and active[0]["kwargs"]["start"] == 0
        # cancel: the running chunk stops at its next lease renewal, nothing more is done
        cancelled = ptutils("cancel", sid, "--store", store_uri)
        assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
        wait_for(lambda: "work discarded" in a.log, LEASE_TTL + 5, "the chunk to stop",
                 alive=a)
        doc = store.get_session(sid)
        assert doc["status"] == "cancelled" and doc["step"] == 0
        assert store.list_checkpoints(sid) == []


def test_submit_refuses_bad_input_and_unreachable_broker_storing_nothing(
        tmp_path, redis_db, store_uri):
    cfg = config()
    cfg["model"]["network"]["in_features"] = 63
    bad = write_config(tmp_path, cfg, "bad.yaml")
    out = ptutils("submit", str(bad), "--store", store_uri, "--broker", redis_db)
    assert out.returncode == 2 and "in_features" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr

    good = write_config(tmp_path, config(), "good.yaml")
    dead = "redis://:s3cret@127.0.0.1:1/0"
    out = ptutils("submit", str(good), "--store", store_uri, "--broker", dead)
    assert out.returncode == 3, out.stderr
    assert "127.0.0.1:1" in out.stderr and "s3cret" not in out.stderr
    with MongoStore(store_uri) as store:
        assert store.find_sessions() == []


def test_rabbitmq_broker_runs_a_session_end_to_end(request, tmp_path, store_uri, workers,
                                                  reference):
    url = (os.environ.get("PTUTILS_TEST_AMQP_URL")
           or request.getfixturevalue("rabbit_server").url)  # a private node, else
    app = make_app(url)
    from workers.dispatch import check_broker

    check_broker(app, timeout=10)
    queues = ("train", "eval", "save")
    _purge(app, queues)
    a = workers("a", url, store_uri).wait_ready()
    legacy = f"legacy-{uuid.uuid4().hex[:6]}"
    try:
        with MongoStore(store_uri) as store:
            (sid,) = submit_configs(store, url, tmp_path, 2)
            # A queue declared elsewhere without priorities refuses our messages: the
            # submit fails as a whole and leaves no session behind.
            with app.connection_for_write() as conn:
                Queue(legacy, durable=True)(conn.default_channel).declare()
            prepared = prepare(write_config(tmp_path, config()), name="refused")
            with pytest.raises(BrokerUnavailable, match="x-max-priority"):
                submit(store, app, prepared, queue=legacy)
            with pytest.raises(SessionNotFound):
                store.get_session("refused")
            wait_done(store, [sid], 90, (a,))
            assert_matches_reference(store, sid, reference, 2)
    finally:
        a.stop()
        _purge(app, queues)
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(legacy)


def test_rabbitmq_chunks_longer_than_the_consumer_timeout_run_once(
        tmp_path, rabbit_server, store_uri, workers, reference):
    # This RabbitMQ cancels a consumer whose delivery stays unacknowledged for 2 s; every
    # chunk takes 3 s, and the second session's tasks wait for the only worker meanwhile.
    url = rabbit_server.url
    a = workers("a", url, store_uri, step_seconds=0.15).wait_ready()
    with MongoStore(store_uri) as store:
        ids = submit_configs(store, url, tmp_path, 1, 2)
        wait_done(store, ids, 90, (a,))
        for seed, sid in zip(SEEDS, ids):
            assert_matches_reference(store, sid, reference, seed)
    log = a.log
    assert "PRECONDITION_FAILED" not in log, "the broker cancelled the consumer"
    assert "Connection to broker lost" not in log
    for sid in ids:
        for start, stop in ((0, 20), (20, 40), (40, 60)):
            assert log.count(f"Train[{start},{stop}) of {sid[:8]}: done") == 1
    assert "lease held by another worker" not in log and "stale" not in log, "a redelivery"
    assert "reconcile:" not in log, "nothing was lost, nothing requeued"


def test_rabbitmq_a_busy_worker_holds_no_message_that_is_due_later(
        tmp_path, rabbit_server, store_uri, workers):
    # Celery keeps a message with a countdown, unacknowledged, in the worker until it is
    # due. This one is due in 2.5 s and a 3 s chunk starts right after it arrives: held
    # behind the chunk it would outlive this broker's 2 s consumer_timeout.
    url = rabbit_server.url
    a = workers("a", url, store_uri, step_seconds=0.15).wait_ready()
    app = make_app(url)
    later = Task(TRAIN, f"gone-{uuid.uuid4().hex[:8]}", "token", start=0, stop=20)
    mid = send(app, later, Route(), countdown=2.5)
    wait_for(lambda: f"[{mid}] received" in a.log, 30,
             "the countdown message reaches the idle worker", alive=a)
    with MongoStore(store_uri) as store:
        ids = submit_configs(store, url, tmp_path, 1)
        wait_done(store, ids, 60, (a,))
    wait_for(lambda: "session not found" in a.log, 30, "the message due later ran", alive=a)
    log = a.log
    assert "PRECONDITION_FAILED" not in log, "the broker cancelled the consumer"
    assert "waits in its queue, not in a busy worker" in log
    assert log.count("session not found") == 1


def _purge(app: Any, queues: tuple[str, ...]) -> None:
    with app.connection_for_write() as conn:
        for q in queues:
            try:
                conn.default_channel.queue_purge(q)
            except Exception:  # noqa: BLE001 - a queue that does not exist yet
                conn.close()
                conn.connect()
