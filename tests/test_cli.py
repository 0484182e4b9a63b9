"""The `ptutils` command tells the truth: states, widths, pipes, signals, missing things.

Every test runs the real command in a subprocess against real stores (a folder, or a
MongoDB URL whose port nothing listens on) and, where a broker is needed, the test
session's redis-server.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ptutils.store import open_store
from tests.helpers import assert_bit_identical, digits_config, series
from tests.servers import RedisProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SWEEP = ("model.optimizer.lr=0.1,0.01,0.001", "data.batch_size=32,64")
MEMBERS = [f"lr={lr},batch_size={bs}" for lr in ("0.1", "0.01", "0.001") for bs in (32, 64)]
BROKER_DB = 14
"""Redis database of this module's submits (flushed before and after)."""


def env_with(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("FORCE_COLOR", "PTUTILS_STORE", "PTUTILS_BROKER")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def ptutils(*args: str, env: dict[str, str] | None = None, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "orchestrator.cli", *args], cwd=ROOT,
                          env=env or env_with(), capture_output=True, text=True,
                          timeout=timeout)


def write_config(folder: Path, **session) -> Path:
    cfg = digits_config(imports=[], callbacks=[], **session)
    del cfg["imports"]
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# --- status: states and widths -----------------------------------------------------------
@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory: pytest.TempPathFactory,
                redis_server: RedisProcess) -> Iterator[Path]:
    """A folder store holding a submitted 3x2 sweep (queued; no worker ever runs it)."""
    import redis

    if not redis_server.alive:
        redis_server.start()
    broker = f"redis://127.0.0.1:{redis_server.port}/{BROKER_DB}"
    client = redis.Redis.from_url(broker)
    client.flushdb()
    folder = tmp_path_factory.mktemp("sweep")
    args = ["submit", str(write_config(folder)), "--name", "resnet18-cifar10-augmented",
            "--store", str(folder / "runs"), "--broker", broker]
    for sweep in SWEEP:
        args += ["--sweep", sweep]
    out = ptutils(*args)
    assert out.returncode == 0, out.stderr
    yield folder / "runs"
    client.flushdb()
    client.close()


def test_status_at_80_columns_keeps_sweep_members_apart_and_says_queued(sweep_store):
    out = ptutils("status", "--store", str(sweep_store), env=env_with(COLUMNS="80"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert max(map(len, lines)) <= 80, out.stdout
    rows = [line for line in lines if line.startswith("resnet18")]
    assert len(rows) == 6, out.stdout
    shown = [row.split()[0] for row in rows]
    assert len(set(shown)) == 6, f"names that cannot be told apart: {shown}"
    for member in MEMBERS:  # each member's values are visible, in one row each
        assert sum(name.endswith(member) for name in shown) == 1, (member, shown)
    assert all(row.split()[1] == "queued" for row in rows), out.stdout
    assert "running" not in out.stdout


def test_status_json_has_the_shown_state_beside_the_stored_status(sweep_store):
    with open_store(sweep_store) as store:  # as a worker leaves it between two chunks
        doc = store.find_sessions()[0]
        store.cas_session(doc["_id"], {"token": doc["token"]}, {"status": "running"})
    rows = json.loads(ptutils("status", "--json", "--store", str(sweep_store)).stdout)
    states = {(r["status"], r["state"]) for r in rows}
    assert states == {("running", "queued"), ("queued", "queued")}, states
    only = json.loads(ptutils("status", "--json", "--status", "running", "--store",
                              str(sweep_store)).stdout)
    assert only == [], "no worker holds any of them"


def test_watch_into_a_pipe_prints_plain_tables_and_sigterm_prints_the_last(sweep_store):
    proc = subprocess.Popen(
        [PY, "-m", "orchestrator.cli", "watch", "--store", str(sweep_store), "--every", "0.2"],
        cwd=ROOT, env=env_with(COLUMNS="80"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        first = [proc.stdout.readline() for _ in range(9)]  # header, 2 table heads, 6 rows
        assert first[0].startswith("--- ") and "6 queued" in first[0], first
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    text = "".join(first) + rest
    assert proc.returncode == 0, err
    assert "\x1b" not in text and "\r" not in text, "no control codes in a pipe"
    assert max(map(len, text.splitlines())) <= 80
    last = text[text.rindex("--- "):]
    assert "(stopped)" in last.splitlines()[0]
    assert sum(line.startswith("resnet18") for line in last.splitlines()) == 6


# --- stores that are down, invalid, or missing ---------------------------------------------
def test_a_store_that_is_down_fails_fast_in_one_line_without_the_password():
    port = free_port()
    url = f"mongodb://alice:s3cret@127.0.0.1:{port}/lab"
    started = time.monotonic()
    out = ptutils("status", "--store", url)
    took = time.monotonic() - started
    assert out.returncode == 3, out.stderr
    assert took < 10, f"took {took:.1f}s"
    message = out.stderr.strip()
    assert len(message.splitlines()) == 1 and len(message) < 400, message
    assert f"mongodb://alice:***@127.0.0.1:{port}/lab" in message
    assert "s3cret" not in out.stderr + out.stdout
    assert "Invalid value" not in message and "Topology" not in message


def test_only_a_malformed_store_url_is_an_invalid_value():
    out = ptutils("status", "--store", "mongodb://alice:s3cret@:notaport/lab")
    assert out.returncode == 2
    assert "Invalid value for --store" in out.stderr and "s3cret" not in out.stderr


def test_reading_commands_do_not_create_a_missing_store_folder(tmp_path):
    missing = tmp_path / "no-such-runs"
    out = ptutils("status", "--store", str(missing))
    assert out.returncode == 0 and f"no sessions at {missing}" in out.stdout, out.stderr
    assert ptutils("status", "--json", "--store", str(missing)).stdout.strip() == "[]"
    named = ptutils("status", "some-run", "--store", str(missing))
    assert named.returncode == 2 and str(missing) in named.stderr
    watched = ptutils("watch", "--store", str(missing))
    assert watched.returncode == 0 and "no sessions" in watched.stdout
    resumed = ptutils("run", "--resume", "some-run", "--store", str(missing))
    assert resumed.returncode == 2 and str(missing) in resumed.stderr
    assert not missing.exists()


def test_stats_plot_without_matplotlib_names_the_extra(tmp_path):
    hidden = tmp_path / "site"
    (hidden / "matplotlib").mkdir(parents=True)
    (hidden / "matplotlib" / "__init__.py").write_text(
        "raise ImportError(\"No module named 'matplotlib'\")\n")  # a user without the extra
    png = tmp_path / "curves.png"
    out = ptutils("stats", "small", "--plot", str(png), "--store", str(tmp_path / "runs"),
                  env=env_with(PYTHONPATH=f"{hidden}{os.pathsep}{ROOT}"))
    assert out.returncode == 2, out.stderr
    assert "pip install 'ptutils[plot]'" in out.stderr
    assert "Traceback" not in out.stderr and not png.exists()


# --- run --resume NAME -------------------------------------------------------------------
def _command_line(printed: str) -> tuple[list[str] | str, bool]:
    """The printed command as run from a shell, if `ptutils` is installed beside python."""
    script = Path(PY).parent / "ptutils"
    if script.exists():
        return printed, True
    words = shlex.split(printed)
    return [PY, "-m", "orchestrator.cli", *words[1:]], False


def test_resume_needs_only_the_name_and_the_stop_hint_works_as_printed(tmp_path):
    path = write_config(tmp_path, total_steps=300, chunk_steps=50, eval_every=150)
    store = tmp_path / "my runs"
    sets = ["--set", "model.optimizer.lr=0.01", "--set", "data.batch_size=16"]
    proc = subprocess.Popen(
        [PY, "-m", "orchestrator.cli", "run", str(path), *sets, "--name", "lr 0.01",
         "--store", str(store), "-q"], cwd=tmp_path, env=env_with(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (store / "ptutils.db").exists() or _step(store, "lr 0.01") < 50:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    printed = re.search(r"continue with: (.+)", out).group(1)
    state = json.loads(ptutils("status", "lr 0.01", "--json", "--store", str(store)).stdout)
    assert state[0]["state"] == "paused" and state[0]["step"] < 300

    command, shell = _command_line(printed)
    path_env = f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    resumed = subprocess.run(command, shell=shell, cwd=tmp_path / "..",
                             env=env_with(PATH=path_env), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr

    ptutils("run", str(path), *sets, "--name", "straight", "--store", str(store), "-q")
    with open_store(store) as s:
        docs = {n: s.get_session(n) for n in ("lr 0.01", "straight")}
        assert docs["lr 0.01"]["status"] == "completed"
        assert docs["lr 0.01"]["config"]["model"]["optimizer"]["lr"] == 0.01
        a, b = (s.get_checkpoint(d["_id"]) for d in docs.values())
        assert a["step"] == b["step"] == 300
        assert_bit_identical(s.load_state(a), s.load_state(b))
        assert series(s.query_statistics(docs["lr 0.01"]["_id"])) == series(
            s.query_statistics(docs["straight"]["_id"]))


def _step(store: Path, name: str) -> int:
    with open_store(store) as s:
        try:
            return int(s.get_session(name)["step"])
        except Exception:  # noqa: BLE001 - not created yet
            return 0


def test_resume_of_a_session_that_does_not_exist_is_an_error(tmp_path):
    path = write_config(tmp_path, total_steps=20)
    store = tmp_path / "runs"
    assert ptutils("run", str(path), "--store", str(store), "-q").returncode == 0
    for args in (["run", "--resume", "nope"], ["run", str(path), "--name", "nope", "--resume"]):
        out = ptutils(*args, "--store", str(store))
        assert out.returncode == 2, out.stderr
        assert "'nope'" in out.stderr and str(store) in out.stderr
        assert "ptutils status" in out.stderr, "says how to list the sessions"
    with open_store(store) as s:
        assert [d["name"] for d in s.find_sessions()] == ["small"], "nothing was created"


# --- worker node names -----------------------------------------------------------------------
def test_two_workers_on_one_host_get_distinct_node_names(tmp_path, redis_server):
    import redis

    if not redis_server.alive:
        redis_server.start()
    broker = f"redis://127.0.0.1:{redis_server.port}/{BROKER_DB + 1}"
    redis.Redis.from_url(broker).flushdb()
    logs = [tmp_path / f"w{i}.log" for i in range(2)]
    procs = []
    for log in logs:
        with open(log, "wb") as f:
            procs.append(subprocess.Popen(
                [PY, "-m", "orchestrator.cli", "worker", "--gpus", "none", "--broker", broker,
                 "--store", str(tmp_path / "runs"), "--reconcile-every", "0", "--grace", "5"],
                cwd=ROOT, env=env_with(), stdout=f, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True))
    try:
        deadline = time.monotonic() + 120
        while not all(" ready." in log.read_text(errors="replace") for log in logs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                "\n".join(log.read_text(errors="replace")[-3000:] for log in logs)
            time.sleep(0.2)
        out = subprocess.run([PY, "-m", "celery", "-A", "workers.app", "inspect", "ping",
                              "--json", "--timeout", "5"], cwd=ROOT,
                             env=env_with(PTUTILS_BROKER=broker), capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        nodes = set(json.loads(out.stdout))
        host = socket.gethostname()
        assert nodes == {f"ptutils-{p.pid}-cpu0@{host}" for p in procs}, nodes
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        redis.Redis.from_url(broker).flushdb()


# --- what a row says, and how a name is cut ------------------------------------------------
def test_shown_state_follows_lease_checkpoint_and_awaited_eval(tmp_path):
    from orchestrator.status import status_rows
    from ptutils.store.base import StatPoint, new_session_doc

    cfg = digits_config(imports=[], callbacks=[])  # chunks of 20, an Eval every 20 steps
    cases = {  # name: (fields set on the stored session, state shown)
        "between-chunks": ({"status": "running", "step": 20}, "queued"),
        "held": ({"status": "running", "lease": {"worker": "w-cpu0@h:1", "expires": 1e12}},
                 "running"),
        "dead-worker": ({"status": "running", "lease": {"worker": "w-cpu0@h:1", "expires": 1}},
                        "lost"),
        "preempted": ({"status": "queued", "step": 27,
                       "checkpoint": {"step": 27, "kind": "preempt"}}, "preempted"),
        "waits-for-eval": ({"status": "queued", "step": 40}, "waiting"),
        "evaluated": ({"status": "queued", "step": 40}, "queued"),
        "done": ({"status": "completed", "step": 60}, "completed"),
    }
    with open_store(tmp_path / "runs") as store:
        for name, (fields, _) in cases.items():
            doc = store.create_session(new_session_doc(name, cfg, "h", 60))
            store.cas_session(doc["_id"], {}, fields)
            if name == "evaluated":
                store.write_statistics(doc["_id"], [StatPoint("eval", 20, "test/loss", 0.5)])
        rows = {r["name"]: r for r in status_rows(store)}
    assert {n: r["state"] for n, r in rows.items()} == {n: c[1] for n, c in cases.items()}
    assert rows["waits-for-eval"]["waiting_for"] == 20
    assert rows["held"]["worker"] == "w-cpu0@h:1" and rows["dead-worker"]["worker"] is None


@pytest.mark.parametrize("names", [
    [f"exp-{m}" for m in MEMBERS],
    [f"a-very-long-experiment-base-name-{m}" for m in MEMBERS],
    [f"run-{'x' * 40}-{i}" for i in range(12)],  # no sweep: the differing end is kept
    [f"{'y' * 30}-alpha-{'z' * 30}", f"{'y' * 30}-beta-{'z' * 30}"],  # differ in the middle
])
def test_names_fit_the_column_and_stay_distinct(names):
    from orchestrator.table import fitted_names

    rows = [{"name": n, "sweep": "s" if "=" in n else None} for n in names]
    shown = fitted_names(rows, 24)
    assert len(set(shown)) == len(names)
    if "=" in names[0]:
        assert all(s.endswith(m) for s, m in zip(shown, MEMBERS)), shown
        assert max(map(len, shown)) <= max(24, max(map(len, MEMBERS)) + 2)
