"""`ptutils pause|resume|requeue` on the Celery cluster: a real `ptutils worker`,
redis-server and MongoDB (nx-27017 unless $PTUTILS_TEST_MONGO_URI names a mongod).

A session paused mid-chunk stops advancing (its chunk is discarded, a queued message of
it is a no-op), and once resumed ends bit-identical to an uninterrupted `ptutils run` of
the same config; so does a cancelled session once requeued. The CLI refuses what does
not apply (finished, unknown, `ptutils run` sessions, a dead broker) and says why.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
from typing import Any

import pytest

from orchestrator.actions import ActionRefused, pause, requeue
from orchestrator.status import cancel
from ptutils.plan import train_task
from ptutils.store import open_store
from ptutils.store.base import new_session_doc
from ptutils.store.mongo import MongoStore
from tests import test_workers as cluster
from tests.test_workers import (
    PY,
    ROOT,
    assert_matches_reference,
    ptutils,
    series,
    submit_configs,
    wait_done,
    wait_for,
    write_config,
)
from workers.app import make_app
from workers.dispatch import Route, queue_depth, send

redis_db = cluster.redis_db  # fixtures: a fresh redis database, MongoDB, worker processes
store_uri = cluster.store_uri
workers = cluster.workers
DEAD_BROKER = "redis://:s3cret@127.0.0.1:1/0"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Any, list]]:
    """Seed 1 -> (final state, statistics) of an uninterrupted `ptutils run` of the
    workers' config (tests/test_workers.py compares the same way)."""
    folder = tmp_path_factory.mktemp("reference")
    path = write_config(folder, cluster.config())
    out = subprocess.run(
        [PY, "-m", "orchestrator.cli", "run", str(path), "--set", "session.seed=1", "--name",
         "ref", "--store", str(folder / "runs"), "-q"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
        text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    with open_store(folder / "runs") as store:
        doc = store.get_session("ref")
        return {1: (store.load_state(store.get_checkpoint(doc["_id"])),
                    series(store.query_statistics(doc["_id"])))}


def mid_chunk(store: MongoStore, sid: str, worker: cluster.Worker) -> dict[str, Any]:
    """The session once its worker is a few steps into a chunk after the first commit."""
    def ready() -> dict[str, Any] | None:
        doc = store.get_session(sid)
        step = int(doc["step"])
        inside = step >= 20 and step + 3 <= worker.last_step() < step + 15
        return doc if inside and worker.owns(doc.get("lease")) and step < 60 else None

    return wait_for(ready, 90, "the worker to be mid-chunk", alive=worker, interval=0.02)


def test_paused_session_stops_then_resumes_and_a_cancelled_one_requeues_bit_identical(
        tmp_path, redis_db, store_uri, workers, reference):
    # Slow steps after step 20 only: a session is paused or cancelled mid-chunk after its
    # first commit; Train[0,20) goes at full speed.
    worker = workers("w1", redis_db, store_uri, step_seconds=0.1,
                     env={"PTUTILS_TEST_SLOW_FROM": "20"})
    app = make_app(redis_db)
    with MongoStore(store_uri) as store:
        [sid] = submit_configs(store, redis_db, tmp_path / "cfg", 1, name="pausing")
        worker.wait_ready()
        running = mid_chunk(store, sid, worker)
        paused = pause(store, "pausing-1")  # the CLI's output: the test below
        assert (paused["status"], paused["lease"]) == ("paused", None)
        assert paused["step"] in (running["step"], running["step"] + 20)  # a commit raced
        assert paused["token"] != running["token"] and paused["step"] < 60
        # The chunk in flight is dropped at the worker's next lease renewal, and a
        # message of the paused session that would otherwise be due runs nothing.
        wait_for(lambda: f"of {sid[:8]}: no-op" in worker.log, 30,
                 "the worker to discard the running chunk", alive=worker)
        send(app, train_task(paused), Route.of(paused))
        wait_for(lambda: f"of {sid[:8]}: no-op (session is paused)" in worker.log, 30,
                 "the worker to skip the paused session's message", alive=worker)
        stopped = worker.last_step()
        still = store.get_session(sid)
        assert (still["status"], still["step"], still["lease"]) == ("paused", paused["step"],
                                                                    None)
        assert ptutils("status", "pausing-1", "--json", "--store", store_uri
                       ).stdout.count('"state": "paused"') == 1
        assert worker.last_step() == stopped, "the paused session trained on"

        out = ptutils("resume", "pausing-1", "--store", store_uri, "--broker", redis_db)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"pausing-1: queued (step {paused['step']}/60)"
        wait_done(store, [sid], 120, (worker,))
        assert_matches_reference(store, sid, reference, 1)
        kinds = [e["kind"] for e in store.get_session(sid)["events"]]
        assert kinds.index("paused") < kinds.index("resumed")

        # Cancelled mid-chunk, then requeued: goes on from its last checkpoint.
        [other] = submit_configs(store, redis_db, tmp_path / "cfg", 1, name="requeueing")
        mid_chunk(store, other, worker)
        cancelled = cancel(store, other)
        wait_for(lambda: f"of {other[:8]}: no-op" in worker.log, 30,
                 "the worker to discard the cancelled chunk", alive=worker)
        done = requeue(store, "requeueing-1", app)
        assert (done["status"], done["step"]) == ("queued", cancelled["step"])
        wait_done(store, [other], 120, (worker,))
        assert_matches_reference(store, other, reference, 1)


def test_requeue_resume_pause_refuse_what_does_not_apply_and_say_why(
        tmp_path, redis_db, store_uri):
    cfg = cluster.config()
    cluster_meta = {"queue": "train", "priority": 5}
    with MongoStore(store_uri) as store:
        def session(name: str, status: str, meta: dict[str, Any] | None = cluster_meta,
                    **fields: Any) -> dict[str, Any]:
            doc = store.create_session(new_session_doc(name, cfg, "h", 60, meta=meta))
            return store.cas_session(doc["_id"], {}, {"status": status, **fields})

        failed = session("failed-one", "failed", step=0, attempts=3,
                         error={"message": "CUDA out of memory"})
        session("done-one", "completed", step=60)
        session("queued-one", "queued")
        session("run-paused", "paused", meta={"torch": "x"})  # `ptutils run` made it
        out = ptutils("requeue", "failed-one", "done-one", "nosuch", "--store", store_uri,
                      "--broker", redis_db)
        assert out.returncode == 2, out.stderr
        assert out.stdout.strip() == "failed-one: queued (step 0/60)"
        assert "'done-one' is completed: nothing to run again" in out.stderr
        assert "nosuch" in out.stderr and "Traceback" not in out.stderr
        again = store.get_session("failed-one")
        assert (again["status"], again["attempts"], again["error"]) == ("queued", 0, None)
        assert again["token"] != failed["token"] and again["events"][-1]["kind"] == "requeued"
        app = make_app(redis_db)
        wait_for(lambda: queue_depth(app, "train") == 1, 10, "the requeued Train message")

        out = ptutils("resume", "queued-one", "run-paused", "--store", store_uri, "--broker",
                      redis_db)
        assert out.returncode == 2 and out.stdout == ""
        assert "'queued-one' is queued, not paused: nothing to resume" in out.stderr
        assert (f"`ptutils run --resume run-paused --store {store.url}`"
                in " ".join(out.stderr.split()))
        assert store.get_session("run-paused")["status"] == "paused"

        out = ptutils("pause", "queued-one", "done-one", "run-paused", "--store", store_uri)
        assert out.returncode == 2
        assert out.stdout.strip() == "queued-one: paused (step 0/60)"
        assert "'done-one' is completed: only a queued or running session" in out.stderr
        assert ("'run-paused' is paused already: `ptutils run --resume run-paused"
                in " ".join(out.stderr.split()))
        out = ptutils("resume", "queued-one", "--store", store_uri, "--broker", DEAD_BROKER)
        assert out.returncode == 3, out.stderr
        assert "127.0.0.1:1" in out.stderr and "s3cret" not in out.stderr
        assert store.get_session("queued-one")["status"] == "paused"  # nothing changed
        with pytest.raises(ActionRefused, match="is paused: `ptutils resume queued-one`"):
            requeue(store, "queued-one", app)
        assert queue_depth(app, "train") == 1



def test_sessions_table_pauses_the_ticked_sessions_and_shows_each_refusal(tmp_path,
                                                                         monkeypatch):
    """The dashboard's table (headless Chromium, a local store): "pause" on the ticked
    sessions pauses the cluster one and says why the finished one is refused; a resume
    through a dead broker is a 503 that names it (without its password)."""
    monkeypatch.setenv("PTUTILS_BROKER", DEAD_BROKER)
    from selenium.webdriver.common.by import By

    from tests.ui_browser import UiServer, chromium, click, screenshot, wait_render, wait_until

    cfg = cluster.config()
    with open_store(tmp_path / "runs") as store:
        queued = store.create_session(new_session_doc("cl-queued", cfg, "h", 60,
                                                      meta={"queue": "train"}))
        done = store.create_session(new_session_doc("done", cfg, "h", 60))
        store.cas_session(done["_id"], {}, {"status": "completed"})
    browser = chromium()  # first: a machine without Chromium leaves no server running
    server = UiServer(str(tmp_path / "runs"), tmp_path)
    try:
        browser.get(server.url + "/")
        wait_render(browser, 0)
        pause = "#bulk button[data-action=pause]"
        wait_until(lambda: browser.find_element(By.CSS_SELECTOR, pause).is_displayed(), 30,
                   "the pause button of the table")
        for box in browser.find_elements(By.CSS_SELECTOR, "#sessions input.pick"):
            box.click()
        click(browser, pause)
        result = browser.find_element(By.ID, "bulk-result")
        wait_until(lambda: ";" in result.text, 30, "the result of each pause")
        assert "cl-queued: paused" in result.text
        assert "'done' is completed: only a queued or running session" in result.text
        screenshot(browser, "sessions-actions")
        with pytest.raises(urllib.error.HTTPError) as refused:
            server.api(f"/api/sessions/{queued['_id']}/resume", method="POST",
                       headers={"X-Ptutils-Action": "1"})
        assert refused.value.code == 503
        message = json.loads(refused.value.read())["error"]
        assert "127.0.0.1:1" in message and "s3cret" not in message
    finally:
        browser.quit()
        server.stop()
    with open_store(tmp_path / "runs") as store:
        assert store.get_session(queued["_id"])["status"] == "paused"
        assert store.get_session(done["_id"])["status"] == "completed"
