"""The Celery orchestration: per-chunk cost, recovery time, throughput (real servers).

Starts a redis-server and an nx-27017 of its own, then:

(a) Orchestration cost per Train chunk: the lease, compare-and-set and enqueue calls
    the real task body makes (store and broker round trips, timed inside an in-process
    WorkerContext running a 1-step-per-chunk session), next to a raw Celery no-op
    round trip (a chain of no-op tasks through a real worker) and the end-to-end time
    per chunk of the same session on that worker (goal: orchestration <= 20 ms/chunk).
(b) Recovery: two `ptutils worker`s (lease TTL 3 s); the one running a session is
    SIGKILLed; time until the other holds the lease, and until the session's next
    checkpoint (goal: takeover <= TTL + 5 s).
(c) Load: 50 short sessions (10 in --quick) on 2 worker processes: all complete;
    sessions/s and chunks/s.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from bench.bench_store import nx_server
from bench.harness import Goal, report
from workers.app import app

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = str(ROOT / "tests" / "worker_fixtures.py")
LEASE_TTL = 3.0
FULL = {"chunks": 60, "hops": 200, "sessions": 50, "kill_repeat": 2}
QUICK = {"chunks": 20, "hops": 50, "sessions": 10, "kill_repeat": 1}
TIMED = ("acquire_lease", "renew_lease", "release_lease", "cas_session", "get_session")
"""Store calls that make up the orchestration of a chunk (with `send`)."""


@app.task(name="bench.hop")
def hop(remaining: int, key: str, redis_url: str) -> None:
    """A no-op task that sends itself `remaining` more times, then stamps `key`."""
    if remaining > 0:
        app.send_task("bench.hop", args=(remaining - 1, key, redis_url), queue="bench")
        return
    import redis

    client = redis.Redis.from_url(redis_url)
    client.set(key, "done")
    client.close()


def config(total: int, chunk: int, *, log_every: int = 1) -> dict[str, Any]:
    """A tiny digits session: compute per step is a fraction of a millisecond."""
    return {
        "name": "bench",
        "imports": [FIXTURES],
        "session": {"total_steps": total, "chunk_steps": chunk, "eval_every": 0,
                    "log_every": log_every, "seed": 0, "retention": {"keep_last": 1}},
        "model": {"network": {"type": "ptutils.nets.MLP", "in_features": 64, "hidden": [16],
                              "out_features": 10},
                  "optimizer": {"type": "torch.optim.SGD", "lr": 0.05}},
        "data": {"batch_size": 8, "seed": 0, "datasets": {
            "train": {"type": "ptutils.data.DigitsReader",
                      "split": {"fraction": 0.8, "part": "train"}},
            "test": {"type": "ptutils.data.DigitsReader",
                     "split": {"fraction": 0.8, "part": "test"}}}},
        "eval": {"targets": {"test": {"data": "test", "metrics": ["accuracy"]}}},
        "callbacks": [{"type": "worker_fixtures.SlowSteps"}],
    }


# --- servers and workers -------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """A redis-server without persistence on a free loopback port."""
    import redis

    port = _free_port()
    binary = shutil.which("redis-server") or "redis-server"
    with open(folder / "redis.log", "wb") as log:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no", "--dir", str(folder)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Proc:
    """A worker process (a `ptutils worker` or a bare `celery worker`) with its log."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str]) -> None:
        self.log_path = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> Proc:
        _wait(lambda: " ready." in self.log_path.read_text(errors="replace"), timeout,
              f"{self.log_path.name} ready")
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            self.proc.wait()


def _wait(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _env(broker: str, store: str, step_seconds: float = 0.0) -> dict[str, str]:
    return {"PYTHONPATH": str(ROOT), "PTUTILS_BROKER": broker, "PTUTILS_STORE": store,
            "PTUTILS_TEST_STEP_SECONDS": str(step_seconds),
            "PTUTILS_TRUST_SESSION_CODE": "1"}  # the configs ship worker_fixtures.py


def ptutils_worker(name: str, broker: str, store: str, folder: Path, *args: str,
                   step_seconds: float = 0.0) -> Proc:
    cmd = [sys.executable, "-m", "orchestrator.cli", "worker", "--gpus", "none", "--name",
           name, "--lease-ttl", str(LEASE_TTL), "--reconcile-every", "0.5", *args]
    return Proc(cmd, folder / f"{name}.log", _env(broker, store, step_seconds))


# --- (a) orchestration cost per chunk ----------------------------------------------------
class TimedStore:
    """A Store proxy that adds up the time spent in the orchestration calls."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.spent = 0.0
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._store, name)
        if name not in TIMED:
            return target

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return target(*args, **kwargs)
            finally:
                self.spent += time.perf_counter() - start
                self.calls += 1

        return timed


def _submit(store: Any, broker: str, path: Path, names: list[str]) -> list[str]:
    from orchestrator.submit import prepare, submit
    from workers.app import make_app

    (base,) = prepare(path)
    prepared = []
    for name in names:
        item = copy.deepcopy(base)
        item.name = name
        prepared.append(item)
    return [s.session for s in submit(store, make_app(broker), prepared)]


def orchestration_cost(store: Any, broker: str, folder: Path, p: dict[str, Any]) -> dict:
    """Time the real task body's lease/CAS/enqueue calls over `chunks` 1-step chunks."""
    import workers.dispatch as dispatch
    from ptutils.plan import train_task
    from workers.tasks import WorkerContext

    path = folder / "chunks.yaml"
    path.write_text(yaml.safe_dump(config(p["chunks"], 1)))
    (sid,) = _submit(store, broker, path, ["cost"])
    timed = TimedStore(store)
    ctx = WorkerContext(timed, "bench:0", lease_ttl=60.0)
    sending = {"spent": 0.0, "calls": 0}
    real_send = dispatch.send

    def timed_send(*args: Any, **kwargs: Any) -> str:
        start = time.perf_counter()
        try:
            return real_send(*args, **kwargs)
        finally:
            sending["spent"] += time.perf_counter() - start
            sending["calls"] += 1

    import workers.tasks as tasks

    tasks.send = timed_send
    try:
        task = train_task(store.get_session(sid))
        ctx.execute(task)  # first chunk builds the session: not counted
        timed.spent = timed.calls = 0
        sending.update(spent=0.0, calls=0)
        start = time.perf_counter()
        chunks = 0
        while (task := train_task(store.get_session(sid))) is not None:
            ctx.execute(task)
            chunks += 1
        wall = time.perf_counter() - start
    finally:
        tasks.send = real_send
        _purge(broker)
    return {"chunks": chunks, "store_s": timed.spent / chunks, "store_calls": timed.calls / chunks,
            "send_s": sending["spent"] / chunks, "sends": sending["calls"] / chunks,
            "wall_s": wall / chunks}


def raw_hop(broker: str, store_url: str, folder: Path, hops: int) -> tuple[float, Proc]:
    """Seconds per hop of a chain of no-op tasks through a real worker of the app."""
    import redis

    env = _env(broker, store_url)
    worker = Proc([sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q",
                   "bench,train,eval,save", "-n", "hop@%h", "--include",
                   "bench.bench_orchestration", "--without-gossip", "--without-mingle",
                   "-l", "warning"], folder / "hop.log", env)
    _wait(lambda: _ping(broker), 120, "the no-op worker")
    client = redis.Redis.from_url(broker)
    results = []
    for n in (10, hops):  # the first chain warms the worker up
        key = f"bench-hop-{n}"
        client.delete(key)
        start = time.perf_counter()
        app.send_task("bench.hop", args=(n - 1, key, broker), queue="bench")
        _wait(lambda k=key: client.get(k), 120, "the no-op chain", interval=0.001)
        results.append((time.perf_counter() - start) / n)
    client.close()
    return results[-1], worker


def _ping(broker: str) -> bool:
    from workers.app import make_app

    try:
        return bool(make_app(broker).control.ping(timeout=0.5))
    except Exception:  # noqa: BLE001 - not up yet
        return False


def chain_on_worker(store: Any, broker: str, folder: Path, chunks: int) -> float:
    """Seconds per chunk of a 1-step-per-chunk session run by the worker end to end."""
    path = folder / "chain.yaml"
    path.write_text(yaml.safe_dump(config(chunks, 1)))
    (sid,) = _submit(store, broker, path, ["chain"])
    _wait(lambda: store.get_session(sid)["step"] >= 1, 120, "the chain's first chunk")
    start, step0 = time.perf_counter(), store.get_session(sid)["step"]
    _wait(lambda: store.get_session(sid)["status"] == "completed", 300, "the chain")
    return (time.perf_counter() - start) / max(1, chunks - step0)


def _purge(broker: str) -> None:
    from workers.app import make_app

    with make_app(broker).connection_for_write() as conn:
        for q in ("train", "eval", "save", "bench"):
            with contextlib.suppress(Exception):
                conn.default_channel.queue_purge(q)


# --- (b) recovery, (c) load --------------------------------------------------------------
def load_test(store: Any, broker: str, folder: Path, n: int) -> dict[str, float]:
    path = folder / "load.yaml"
    path.write_text(yaml.safe_dump(config(20, 10, log_every=10)))
    start = time.perf_counter()
    ids = _submit(store, broker, path, [f"load-{i}" for i in range(n)])

    def done() -> bool:
        return all(store.get_session(i)["status"] == "completed" for i in ids)

    _wait(done, 600, f"{n} sessions", interval=0.2)
    wall = time.perf_counter() - start
    completed = sum(store.get_session(i)["status"] == "completed" for i in ids)
    return {"sessions": n, "completed": completed, "wall_s": wall,
            "sessions_per_s": n / wall, "chunks_per_s": 2 * n / wall}


def kill_recovery(store: Any, broker: str, workers: list[Proc], folder: Path,
                  name: str) -> dict[str, float]:
    """SIGKILL the worker running a session: seconds to takeover and to progress."""
    path = folder / "kill.yaml"
    path.write_text(yaml.safe_dump(config(200, 50)))  # 1.5 s chunks
    (sid,) = _submit(store, broker, path, [name])
    lease = _wait(lambda: (store.get_session(sid).get("lease") or {}).get("worker"), 60,
                  "a lease")
    victim = next(w for w in workers if lease.startswith(_name_of(w)))
    time.sleep(0.5)  # in the middle of the chunk
    step = store.get_session(sid)["step"]
    victim.kill(signal.SIGKILL)
    killed = time.perf_counter()
    _wait(lambda: (store.get_session(sid).get("lease") or {}).get("worker", lease) != lease,
          60, "the takeover")
    takeover = time.perf_counter() - killed
    _wait(lambda: store.get_session(sid)["step"] > step, 60, "progress")
    progress = time.perf_counter() - killed
    victim.proc.wait()
    return {"takeover_s": takeover, "progress_s": progress, "victim": workers.index(victim)}


@contextlib.contextmanager
def worker_pair(broker: str, store_url: str, folder: Path, name: str,
                step_seconds: float) -> Iterator[list[Proc]]:
    """Two `ptutils worker`s, stopped (SIGTERM) on the way out."""
    workers = [ptutils_worker(f"{name}{i}", broker, store_url, folder,
                              step_seconds=step_seconds) for i in range(2)]
    try:
        for w in workers:
            w.wait_ready()
        yield workers
    finally:
        for w in workers:
            w.stop()


def _name_of(worker: Proc) -> str:
    return worker.log_path.stem + "-"


def run(quick: bool = False) -> dict[str, Any]:
    """Measure (a), (b), (c); check the goals; print and save the report."""
    from ptutils.store.mongo import MongoStore

    p = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="bench-orch-") as tmp:
        folder = Path(tmp)
        (folder / "nx").mkdir()
        with redis_server(folder) as broker, nx_server(folder / "nx") as mongo:
            app.conf.update(broker_url=broker)
            store_url = f"{mongo}/bench"
            store = MongoStore(store_url)
            cost = orchestration_cost(store, broker, folder, p)
            hop_s, hop_worker = raw_hop(broker, store_url, folder, p["hops"])
            try:
                chain_s = chain_on_worker(store, broker, folder, p["chunks"])
            finally:
                hop_worker.stop()
            with worker_pair(broker, store_url, folder, "load", 0.0) as workers:
                load = load_test(store, broker, folder, p["sessions"])
            with worker_pair(broker, store_url, folder, "kill", 0.03) as workers:
                kills = []
                for i in range(p["kill_repeat"]):
                    kills.append(kill_recovery(store, broker, workers, folder, f"kill-{i}"))
                    j = kills[-1]["victim"]
                    workers[j] = ptutils_worker(f"kill{j}r{i}", broker, store_url, folder,
                                                step_seconds=0.03).wait_ready()
            store.close()
    orch_ms = 1000 * (cost["store_s"] + cost["send_s"])
    rows = [
        {"measure": "orchestration per chunk (lease + CAS + enqueue)", "value": orch_ms,
         "unit": "ms"},
        {"measure": "  of which store calls", "value": 1000 * cost["store_s"],
         "unit": f"ms ({cost['store_calls']:.1f} calls)"},
        {"measure": "  of which sends", "value": 1000 * cost["send_s"],
         "unit": f"ms ({cost['sends']:.1f} messages)"},
        {"measure": "in-process chunk, all included (1 step)", "value": 1000 * cost["wall_s"],
         "unit": "ms"},
        {"measure": "raw Celery no-op round trip", "value": 1000 * hop_s, "unit": "ms"},
        {"measure": "chunk end to end on a worker (1 step)", "value": 1000 * chain_s,
         "unit": "ms"},
        {"measure": "SIGKILL -> other worker holds the lease",
         "value": max(k["takeover_s"] for k in kills), "unit": "s (worst)"},
        {"measure": "SIGKILL -> next checkpoint", "value": max(k["progress_s"] for k in kills),
         "unit": "s (worst)"},
        {"measure": f"load: {load['sessions']} sessions on 2 workers",
         "value": load["wall_s"], "unit": "s"},
        {"measure": "load: throughput", "value": load["sessions_per_s"], "unit": "sessions/s"},
        {"measure": "load: throughput", "value": load["chunks_per_s"], "unit": "chunks/s"},
    ]
    goals = [
        Goal("orchestration ms per chunk", orch_ms, 20.0, "<="),
        Goal("takeover after SIGKILL (s)", max(k["takeover_s"] for k in kills),
             LEASE_TTL + 5, "<="),
        Goal("load sessions completed", load["completed"], load["sessions"]),
    ]
    return report("orchestration", rows, goals, quick=quick, params=p, lease_ttl=LEASE_TTL,
                  cost=cost, kills=kills, load=load)
