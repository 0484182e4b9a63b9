"""`ptutils status` over many sessions: the session summary, the listing API, the options.

Every test runs against both stores: a folder (LocalStore) and a real MongoDB wire
server (nx-27017, tests/servers.py). Sessions are made through the store API; the
command runs in a subprocess, as a user runs it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ptutils.store import StatPoint, new_session_doc, open_store
from ptutils.store.base import SessionQuery
from tests.helpers import digits_config

ROOT = Path(__file__).resolve().parents[1]
HOUR = 3600.0


def ptutils(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PTUTILS_STORE", "FORCE_COLOR")}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT,
                          env={**env, "PYTHONPATH": str(ROOT), "COLUMNS": "120"},
                          capture_output=True, text=True, timeout=timeout)


def status_json(url: str, *args: str) -> list[dict]:
    out = ptutils("status", "--json", "--store", url, *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(params=["local", "mongo"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "runs")
    return request.getfixturevalue("mongo_uri")


def make(store, name: str, *, age_h: float, status: str = "completed", tags=(),
         sweep=None, step: int = 0) -> dict:
    """A session created `age_h` hours ago (and last updated then)."""
    doc = new_session_doc(name, {"session": {"total_steps": 100}}, "h", 100, tags=tags,
                          sweep=sweep)
    doc.update(status=status, step=step, created=time.time() - age_h * HOUR)
    doc["updated"] = doc["created"]
    return store.create_session(doc)


@pytest.fixture
def lab(url: str) -> str:
    """Eight sessions, oldest first: an old queued one, a sweep of three, a search's two
    (tagged), and two recent ones (one with a tag)."""
    with open_store(url) as store:
        make(store, "old-queued", age_h=50, status="queued")
        for i in range(3):
            make(store, f"sweep-lr{i}", age_h=40 - i, sweep="sw1")
        make(store, "search-a", age_h=30, tags=["search:hpo"])
        make(store, "search-b", age_h=29, tags=["search:hpo", "best"])
        make(store, "recent-1", age_h=0.5, tags=["best"])
        make(store, "recent-2", age_h=0.2, status="failed")
    return url


def names(rows: list[dict]) -> list[str]:
    return [r["name"] for r in rows]


def test_default_shows_the_active_then_the_newest_oldest_first_with_a_count(lab):
    rows = status_json(lab, "--limit", "3")
    assert names(rows) == ["old-queued", "recent-1", "recent-2"], "active first, then newest"
    out = ptutils("status", "--store", lab, "--limit", "3")
    assert out.returncode == 0, out.stderr
    assert "the active and newest 3 sessions shown; --page 2" in out.stdout
    assert "--all" in out.stdout
    assert "sweep-lr0" not in out.stdout


def test_pages_all_and_the_default_limit(lab):
    assert names(status_json(lab, "--limit", "2", "--page", "2")) == ["search-a", "search-b"]
    assert names(status_json(lab, "--limit", "2", "--page", "5")) == []
    every = names(status_json(lab, "--all"))
    assert every == ["old-queued", "sweep-lr0", "sweep-lr1", "sweep-lr2", "search-a",
                     "search-b", "recent-1", "recent-2"]
    assert names(status_json(lab)) == every, "8 sessions fit the default limit of 50"
    out = ptutils("status", "--store", lab)
    assert "sessions shown" not in out.stdout, "no line when every session is shown"
    last = ptutils("status", "--store", lab, "--limit", "3", "--page", "3").stdout
    assert "page 3: 2 sessions shown" in last and "--page 4" not in last


@pytest.mark.parametrize("args,expected", [
    (("--name", "sweep-"), ["sweep-lr0", "sweep-lr1", "sweep-lr2"]),
    (("--sweep", "sw1", "--limit", "2"), ["sweep-lr1", "sweep-lr2"]),
    (("--search", "hpo"), ["search-a", "search-b"]),
    (("--tag", "best"), ["search-b", "recent-1"]),
    (("--tag", "best", "--search", "hpo"), ["search-b"]),
    (("--status", "failed"), ["recent-2"]),
    (("--status", "queued", "--all"), ["old-queued"]),
    (("--since", "2h"), ["recent-1", "recent-2"]),
    (("--since", "29.5h", "--name", "search"), ["search-b"]),
])
def test_filters_run_in_the_store(lab, args, expected):
    assert names(status_json(lab, *args)) == expected


def test_json_is_one_array_streamed_a_row_per_line(lab):
    out = ptutils("status", "--json", "--all", "--store", lab)
    lines = out.stdout.splitlines()
    assert lines[0] == "[" and lines[-1] == "]" and len(lines) == 10, out.stdout
    assert [json.loads(line.rstrip(","))["name"] for line in lines[1:-1]][:2] == [
        "old-queued", "sweep-lr0"]
    empty = ptutils("status", "--json", "--name", "nothing", "--store", lab)
    assert json.loads(empty.stdout) == []


def test_a_bad_since_is_bad_input_naming_the_option(lab):
    out = ptutils("status", "--since", "yesterday", "--store", lab)
    assert out.returncode == 2 and "--since" in out.stderr and "2h" in out.stderr


def test_the_listing_api_pages_sorts_and_omits_what_a_listing_never_shows(lab):
    with open_store(lab) as store:
        first = store.list_sessions(SessionQuery(), limit=3)
        assert names(first) == ["recent-2", "recent-1", "search-b"]
        assert "events" not in first[0] and "config" in first[0]
        assert names(store.list_sessions(SessionQuery(), limit=3, offset=3)) == [
            "search-a", "sweep-lr2", "sweep-lr1"]
        assert store.count_sessions(SessionQuery(tags=("best",))) == 2
        assert store.count_sessions(SessionQuery(status=())) == 0
        doc = store.get_session("sweep-lr0")
        store.cas_session(doc["_id"], {"token": doc["token"]}, {"status": "running"})
        by_update = store.list_sessions(SessionQuery(), sort="updated", limit=1)
        assert names(by_update) == ["sweep-lr0"], "a session that just changed is newest"


# --- the summary ---------------------------------------------------------------------------
def test_summary_after_a_real_run_matches_the_statistics(url, tmp_path):
    cfg = digits_config(imports=[], callbacks=[])
    del cfg["imports"]
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = ptutils("run", str(path), "--name", "real", "--store", url, "-q")
    assert run.returncode == 0, run.stderr
    with open_store(url) as store:
        doc = store.get_session("real")
        stats = store.query_statistics(doc["_id"])
    loss = [p for p in stats if p["phase"] == "train" and p["name"] == "loss"]
    last_eval = max(p["step"] for p in stats if p["phase"] == "eval")
    evals = {p["name"]: p["value"] for p in stats
             if p["phase"] == "eval" and p["step"] == last_eval}
    summary = doc["summary"]
    assert summary["complete"] is True
    assert summary["train"] == {"step": loss[-1]["step"], "loss": loss[-1]["value"]}
    assert summary["eval"]["step"] == last_eval == 60
    assert dict(summary["eval"]["metrics"]) == evals and evals
    # (nx-27017 keeps 15 significant digits of a `$max`ed double; MongoDB all of them)
    assert summary["time"] == pytest.approx(max(p["time"] for p in stats), abs=1e-3)
    (row,) = status_json(url, "real")
    assert (row["loss"], row["loss_step"], row["eval_step"], row["eval"]) == (
        loss[-1]["value"], loss[-1]["step"], 60, evals)
    table = ptutils("status", "--store", url)
    assert f"{loss[-1]['value']:.4g}" in table.stdout


def test_a_late_or_replayed_batch_never_moves_the_summary_back(url):
    with open_store(url) as store:
        sid = make(store, "s", age_h=1)["_id"]
        store.write_statistics(sid, [StatPoint("train", s, "loss", 1.0 / s, time=100.0 + s)
                                     for s in range(1, 41)])
        store.write_statistics(sid, [StatPoint("eval", 40, "acc", 0.9, time=50.0)])
        store.write_statistics(sid, [StatPoint("eval", 20, "acc", 0.5, time=60.0),
                                     StatPoint("train", 10, "loss", 7.0, time=60.0)])
        summary = store.get_session(sid)["summary"]
        assert summary["train"] == {"step": 40, "loss": 1 / 40}
        assert summary["eval"] == {"step": 40, "metrics": [["acc", 0.9]]}
        assert summary["time"] == 140.0, "$max: an older batch leaves the newest time"
        store.write_statistics(sid, [StatPoint("train", 40, "loss", float("nan"))])
        assert store.get_session(sid)["summary"]["train"]["loss"] == "nan"
        store.delete_statistics(sid, after_step=30)  # a chunk restarted from step 30
        summary = store.get_session(sid)["summary"]
        assert "train" not in summary and "eval" not in summary and not summary["complete"]
    (row,) = status_json(url, "s")
    assert (row["loss"], row["eval_step"], row["eval"]) == (None, 20, {"acc": 0.5}), (
        "a dropped part is read from the statistics that remain")


def _strip_summary(url: str, sid: str) -> None:
    """Make a session look as an older ptutils wrote it: no `summary` field at all."""
    if url.startswith("mongodb://"):
        import pymongo

        client = pymongo.MongoClient(url)
        client.get_default_database()["sessions"].update_one({"_id": sid},
                                                             {"$unset": {"summary": ""}})
        client.close()
        return
    with sqlite3.connect(Path(url) / "ptutils.db") as conn:
        (text,) = conn.execute("SELECT doc FROM sessions WHERE id = ?", (sid,)).fetchone()
        doc = json.loads(text)
        del doc["summary"]
        conn.execute("UPDATE sessions SET doc = ? WHERE id = ?", (json.dumps(doc), sid))


def test_sessions_without_a_summary_still_show_their_statistics(url):
    with open_store(url) as store:
        old = make(store, "old", age_h=2, status="completed", step=20)
        partial = make(store, "partial", age_h=1, status="completed", step=20)
        for doc in (old, partial):
            store.write_statistics(doc["_id"], [
                *(StatPoint("train", s, "loss", 10.0 - s / 10) for s in range(1, 21)),
                StatPoint("eval", 20, "test/accuracy", 0.75)])
            _strip_summary(url, doc["_id"])
        assert "summary" not in store.get_session("old")
        # resumed by this ptutils: its summary starts mid-way, without `complete`
        store.write_statistics(partial["_id"], [StatPoint("train", 21, "loss", 5.0)])
    rows = {r["name"]: r for r in status_json(url)}
    assert (rows["old"]["loss"], rows["old"]["eval"]) == (8.0, {"test/accuracy": 0.75})
    assert (rows["partial"]["loss"], rows["partial"]["loss_step"]) == (5.0, 21)
    assert rows["partial"]["eval"] == {"test/accuracy": 0.75}, "from the statistics"
    table = ptutils("status", "--store", url)
    assert "0.75 @20" in table.stdout and "old" in table.stdout
