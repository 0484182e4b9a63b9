"""Prometheus metrics (workers/metrics.py) read over HTTP from a real `ptutils worker
--metrics-port` and a real `ptutils reconcile --metrics-port`, while sessions train."""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ptutils.store.mongo import MongoStore
from tests import test_workers as cluster
from tests.servers import free_port
from tests.test_workers import PY, ROOT, submit_configs, wait_done, wait_for

redis_db = cluster.redis_db  # fixtures: a fresh redis database, MongoDB, worker processes
store_uri = cluster.store_uri
workers = cluster.workers

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """GET /metrics: (sample name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def answers(port: int) -> Samples | None:
    try:
        return scrape(port)
    except (urllib.error.URLError, ConnectionError):
        return None


def test_worker_metrics_move_while_a_session_trains(tmp_path, redis_db, store_uri, workers):
    port = free_port()
    w = workers("m", redis_db, store_uri, "--metrics-port", str(port), step_seconds=0.05,
                env={"PTUTILS_METRICS_SESSIONS_EVERY": "0"}).wait_ready()
    wait_for(lambda: answers(port), 30, "the metrics port to answer", alive=w)
    with MongoStore(store_uri) as store:
        (sid,) = submit_configs(store, redis_db, tmp_path, 1)
        wait_for(lambda: store.get_session(sid)["step"] >= 20, 60, "the first chunk", alive=w)
        first = scrape(port)
        wait_for(lambda: store.get_session(sid)["step"] >= 40, 60, "the second chunk", alive=w)
        second = scrape(port)
        assert store.get_session(sid)["status"] != "completed", "read while it trains"
        wait_done(store, [sid], 60, (w,))
        last = wait_for(lambda: (s := scrape(port)) and value(
            s, "ptutils_sessions", status="completed") == 1 and s, 30,
            "the reconcile loop to count the completed session")

    for name in ("ptutils_chunk_seconds_count", "ptutils_checkpoint_seconds_count"):
        assert 1 <= value(first, name) < value(second, name) < value(last, name), name
    assert value(last, "ptutils_chunk_seconds_count") == 3  # Train[0,20) [20,40) [40,60)
    assert 0 < value(first, "ptutils_checkpoint_bytes_total") < value(
        second, "ptutils_checkpoint_bytes_total")
    assert value(last, "ptutils_tasks_total", kind="train", outcome="ran") == 3
    assert value(last, "ptutils_tasks_total", kind="eval", outcome="ran") >= 3
    assert value(first, "ptutils_sessions", status="running") + value(
        first, "ptutils_sessions", status="queued") == 1
    assert value(last, "ptutils_requeues_total") == 0
    assert not any(n == "ptutils_gpu_memory_bytes" for n, _ in last), "no CUDA here"


def test_reconcile_metrics_count_sessions_and_a_lease_expiry(tmp_path, redis_db, store_uri,
                                                             workers):
    """A worker SIGKILLed mid-chunk: `ptutils reconcile` finds its lease expired, counts
    it and the requeue; its gauges count the sessions by status."""
    w = workers("k", redis_db, store_uri, "--reconcile-every", "0", step_seconds=0.1,
                ).wait_ready()
    port = free_port()
    with MongoStore(store_uri) as store:
        (sid,) = submit_configs(store, redis_db, tmp_path, 1)
        wait_for(lambda: (store.get_session(sid).get("lease") or {}).get("worker"), 60,
                 "the session leased", alive=w)
        w.kill()
        w.proc.wait(timeout=10)
        log = open(tmp_path / "reconcile.log", "wb")
        proc = subprocess.Popen(
            [PY, "-m", "orchestrator.cli", "reconcile", "--every", "0.5", "--store", store_uri,
             "--broker", redis_db, "--metrics-port", str(port)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log, stderr=subprocess.STDOUT)
        try:
            got = wait_for(lambda: (s := answers(port)) and value(
                s, "ptutils_lease_expiries_total") == 1 and s, 60 + cluster.LEASE_TTL,
                "reconcile to find the expired lease")
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            log.close()
    assert value(got, "ptutils_requeues_total", reason="lease_expired") == 1
    assert value(got, "ptutils_sessions", status="running") + value(
        got, "ptutils_sessions", status="queued") == 1


@pytest.mark.parametrize("bad", ["-1", "70000", "http"])
def test_a_bad_metrics_port_is_refused_before_anything_starts(bad):
    out = cluster.ptutils("worker", "--gpus", "none", "--metrics-port", bad)
    assert out.returncode == 2 and "--metrics-port" in out.stderr, out.stderr
