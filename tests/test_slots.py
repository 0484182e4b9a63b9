"""Slots of a node (ptutils.slots), the queue per world size, and the status column.

The allocator is raced by real processes (forked, each with its own pid), one of them
SIGKILLed while it holds slots; the routing runs against a real redis-server and real
`ptutils worker` processes; the status column is read from real session documents.
The end-to-end tests with 2-rank sessions need ptutils.group (issue 10's core) and skip
cleanly without it.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.submit import Prepared, prepare, submit
from ptutils.plan import Plan
from ptutils.protocol import TRAIN, Task
from ptutils.slots import (
    NodeSlots,
    WorkerSlots,
    cpu_slots,
    describe_devices,
    gpu_slots,
    parse_spec,
    spec_of,
    train_queue,
    train_queues,
)
from ptutils.store import open_store
from ptutils.store.base import new_session_doc
from tests.helpers import digits_config
from tests.test_workers import FIXTURES, PY, ROOT, Worker, ptutils, stop_all, wait_for
from workers.app import make_app
from workers.dispatch import queue_depth, reconciler
from workers.launcher import WorkerOptions, child_command, child_env, node_slots, plan_slots

FORK = mp.get_context("fork")

needs_world_size = pytest.mark.skipif(
    "world_size" not in {f.name for f in fields(Plan)},
    reason="session.world_size comes with issue 10's core (ptutils/plan.py)")  # the allocator only: no CUDA, no threads of torch's here


# --- the allocator: real processes --------------------------------------------------------
def _racer(directory: str, index: int, rounds: int, errors: Any, counts: Any) -> None:
    """Acquire 1 or 2 of the node's 4 slots, hold them a moment, release; every held slot
    name is claimed with O_EXCL under `check/`, so two holders of a slot collide."""
    rng = random.Random(index)
    node = NodeSlots(cpu_slots(4), directory)
    owner = f"s{index}"
    for _ in range(rounds):
        n = rng.choice((1, 2))
        devices = node.acquire(n, owner)
        if devices is None:
            time.sleep(0.001)
            continue
        names = [k for k, v in node.holders().items()
                 if v["owner"] == owner and v["pid"] == os.getpid()]
        if len(names) != n or devices != [""] * n:
            errors.put(f"{owner}: asked {n}, holds {names}, devices {devices}")
        claimed = []
        for name in names:
            try:
                os.close(os.open(Path(directory, "check", name), os.O_CREAT | os.O_EXCL))
                claimed.append(name)
            except FileExistsError:
                errors.put(f"{owner}: slot {name} is held by someone else too")
        time.sleep(rng.random() * 0.002)
        for name in claimed:
            os.unlink(Path(directory, "check", name))
        node.release(owner)
        with counts.get_lock():
            counts.value += 1


def test_racing_processes_never_share_a_slot(tmp_path):
    (tmp_path / "check").mkdir()
    errors, counts = FORK.Queue(), FORK.Value("i", 0)
    procs = [FORK.Process(target=_racer, args=(str(tmp_path), i, 60, errors, counts))
             for i in range(8)]
    start = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert found == []
    assert counts.value >= 8 * 60 // 4, "the processes did get slots"
    assert NodeSlots(cpu_slots(4), tmp_path).holders() == {}, "every slot was given back"
    print(f"8 processes, {counts.value} acquisitions in {time.monotonic() - start:.1f}s")


def _hold(directory: str, n: int, ready: Any) -> None:
    NodeSlots(cpu_slots(4), directory).acquire(n, "victim")
    ready.set()
    time.sleep(600)


def test_slots_of_a_sigkilled_holder_are_free_at_the_next_acquire(tmp_path):
    node = NodeSlots(cpu_slots(4), tmp_path)
    ready = FORK.Event()
    victim = FORK.Process(target=_hold, args=(str(tmp_path), 3, ready))
    victim.start()
    try:
        assert ready.wait(30)
        assert node.acquire(2, "mine") is None, "3 of 4 are held"
        assert [v["pid"] for v in node.holders().values()] == [victim.pid] * 3
        os.kill(victim.pid, signal.SIGKILL)
        wait_for(lambda: _state(victim.pid) == "Z", 10, "the victim to be a zombie")
        # not reaped yet: a zombie holds nothing
        assert node.acquire(2, "mine") == ["", ""]
        assert sorted(v["owner"] for v in node.holders().values()) == ["mine", "mine"]
    finally:
        victim.kill()
        victim.join()


def _state(pid: int) -> str:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rfind(")") + 2]


def _acquire_in_child(directory: str, n: int, owner: str, out: Any) -> None:
    out.put(NodeSlots(cpu_slots(4), directory).acquire(n, owner))


def test_full_node_refuses_release_frees_and_reentry_is_per_process(tmp_path):
    node = NodeSlots(cpu_slots(4), tmp_path)
    assert node.acquire(3, "a") == ["", "", ""]
    assert node.acquire(3, "a") == ["", "", ""], "the same owner gets its slots back"
    assert len(node.holders()) == 3
    assert node.acquire(2, "b") is None
    out = FORK.Queue()
    # the same session id in another process (a duplicate message on a second worker
    # process) does not get the first one's slots
    child = FORK.Process(target=_acquire_in_child, args=(str(tmp_path), 3, "a", out))
    child.start()
    child.join(30)
    assert out.get(timeout=5) is None
    assert node.acquire(1, "b") == [""]
    assert node.acquire(1, "c") is None
    node.release("a")
    assert node.acquire(2, "c") == ["", ""]
    node.release("nobody")
    assert {v["owner"] for v in node.holders().values()} == {"b", "c"}
    with pytest.raises(ValueError, match="n must be >= 1"):
        node.acquire(0, "d")


def test_a_reused_pid_does_not_keep_a_dead_holders_slots(tmp_path):
    node = NodeSlots(cpu_slots(2), tmp_path)
    table = {"cpu0": {"owner": "old", "pid": os.getpid(), "start": 1, "since": 0},
             "cpu1": {"owner": "old", "pid": 2**22 + 7, "start": None, "since": 0}}
    (tmp_path / "slots.json").write_text(json.dumps({"held": table}))
    assert node.acquire(2, "new") == ["", ""]


def test_gpu_slots_home_gpu_for_one_rank_whole_gpus_for_several(tmp_path):
    slots = gpu_slots(["0", "1", "2"], per_device=2)  # two worker processes per GPU
    assert spec_of(slots) == "gpu:0,0,1,1,2,2" and parse_spec(spec_of(slots)) == slots
    on1 = NodeSlots(slots, tmp_path, home="1")
    on0 = NodeSlots(slots, tmp_path, home="0")
    assert on1.capacity == 3
    assert on1.acquire(1, "x") == ["1"] and on1.acquire(1, "y") == ["1"]
    assert on1.acquire(1, "z") is None, "a 1-rank session trains on its worker's own GPU"
    assert on0.acquire(1, "w") == ["0"]
    assert on1.acquire(2, "big") is None, "GPU 0 is half used: only GPU 2 is whole"
    on0.release("w")
    assert on1.acquire(2, "big") == ["0", "2"]
    assert describe_devices(["0", "2"]) == "gpu0,2"
    assert describe_devices(["", ""]) == "cpu×2" and describe_devices([""]) == "cpu"
    with pytest.raises(ValueError, match="cpu:N"):
        parse_spec("cpu:zero")


def test_launchers_share_gpus_but_not_cpu_slots(tmp_path):
    first, second = NodeSlots(cpu_slots(1, "l1"), tmp_path), NodeSlots(cpu_slots(1, "l2"),
                                                                       tmp_path)
    assert first.acquire(1, "a") == [""] and second.acquire(1, "b") == [""]
    gpu_a, gpu_b = (NodeSlots(gpu_slots(["0"]), tmp_path, home="0") for _ in range(2))
    assert gpu_a.acquire(1, "a") == ["0"]
    assert gpu_b.acquire(1, "b") is None, "one GPU, whichever launcher asks"


def test_worker_slots_hand_the_reserved_slots_to_the_engine(tmp_path):
    node = NodeSlots(cpu_slots(3), tmp_path)
    view = WorkerSlots(node)
    assert view.reserve(2, "session") == ["", ""]
    assert view.acquire(2, "Train[0,20) of session") == ["", ""], "whatever owner name"
    view.release("Train[0,20) of session")
    assert len(node.holders()) == 2, "freed by the worker after the task, not before"
    assert view.acquire(1, "other") == [""]
    view.release("other")
    view.end()
    assert node.holders() == {}


# --- the worker side: launcher plan, queues, waiting for slots ----------------------------
def test_launcher_offers_its_slots_and_consumes_every_size_up_to_them(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    opts = WorkerOptions(queues=["train", "eval", "save", "train-big"], slots=4, name="n")
    children = plan_slots(opts)
    assert [c.name for c in children] == ["n-cpu0", "n-cpu1", "n-cpu2", "n-cpu3"]
    node = node_slots(opts, children, "launcher-7")
    assert [s.name for s in node] == [f"launcher-7/cpu{i}" for i in range(4)]
    assert parse_spec(spec_of(node)) == node
    cmd = child_command(opts, children[0], 4)
    assert cmd[cmd.index("--queues") + 1].split(",") == [
        "train", "train-x2", "train-x3", "train-x4", "eval", "save",
        "train-big", "train-big-x2", "train-big-x3", "train-big-x4"]
    env = child_env(WorkerOptions(slots_dir="/var/run/x"), children[1], node)
    assert (env["PTUTILS_SLOTS"], env["PTUTILS_HOME_DEVICE"], env["PTUTILS_SLOTS_DIR"]) == (
        "cpu:4@launcher-7", "", "/var/run/x")
    two = WorkerOptions(concurrency=2, slots=4, name="n")  # 2 processes, 4 slots
    assert len(plan_slots(two)) == 2 and len(node_slots(two, plan_slots(two))) == 4
    gpus = WorkerOptions(gpus="0,1", name="g")
    gchildren = plan_slots(gpus)
    genv = child_env(gpus, gchildren[1], node_slots(gpus, gchildren))
    assert (genv["PTUTILS_SLOTS"], genv["PTUTILS_HOME_DEVICE"]) == ("gpu:0,1", "1")
    assert genv["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    with pytest.raises(ValueError, match="GPU node"):
        plan_slots(WorkerOptions(gpus="0,1", slots=4))
    assert train_queue("train", 1) == "train" and train_queues("q", 2) == ["q", "q-x2"]


def _config(tmp_path: Path, world_size: int = 1, **session: Any) -> Path:
    """A digits config whose steps sleep $PTUTILS_TEST_STEP_SECONDS in the processes of
    a test's worker (`step_seconds`) and nowhere else (SlowSteps: no state, no RNG)."""
    cfg = digits_config(imports=[FIXTURES], callbacks=[{"type": "worker_fixtures.SlowSteps"}],
                        **session)
    path = tmp_path / f"ws{world_size}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def prepared(tmp_path: Path, world_size: int, name: str, **session: Any) -> list[Prepared]:
    """A validated config of `world_size`."""
    return prepare(_config(tmp_path, **session), [f"session.world_size={world_size}"],
                   name=name)


def test_a_train_task_without_free_slots_goes_back_without_a_lease(tmp_path):
    from workers.tasks import SLOTS_RETRY_S, WorkerContext

    store = open_store(tmp_path / "runs")
    doc = store.create_session(new_session_doc(
        "two", {"session": {"world_size": 2, "total_steps": 60, "chunk_steps": 20}},
        "h", 60, meta={"queue": "train-x2"}))
    node = NodeSlots(cpu_slots(2), tmp_path / "slots")
    ctx = WorkerContext(store, "w", lease_ttl=5, slots=node)
    other = NodeSlots(cpu_slots(2), tmp_path / "slots")
    assert other.acquire(1, "someone") == [""]
    task = Task(TRAIN, doc["_id"], doc["token"], start=0, stop=20)
    outcome = ctx._train(task)
    assert (outcome.ran, outcome.retry_after) == (False, SLOTS_RETRY_S), outcome.reason
    assert "waiting for 2 free slot(s)" in outcome.reason
    after = store.get_session(doc["_id"])
    assert after["lease"] is None and after["attempts"] == 0
    assert after["meta"]["slot_wait"]["slots"] == 2 and after["updated"] > doc["updated"]
    assert list(node.holders()) == ["cpu0"], "nothing held after the wait"
    assert ctx.route(doc["_id"]).queue == "train-x2"
    stale = ctx._train(Task(TRAIN, doc["_id"], "old-token", start=0, stop=20))
    assert stale.retry_after is None and "stale" in stale.reason, "dropped, not re-sent"
    small = NodeSlots(cpu_slots(1), tmp_path / "small")
    assert "for a larger node" in WorkerContext(store, "v", lease_ttl=5, slots=small)._train(
        task).reason


@needs_world_size
def test_submit_routes_by_world_size_and_reconcile_requeues_to_the_same_queue(
        tmp_path, redis_url):
    app = make_app(redis_url)
    store = open_store(tmp_path / "runs")
    (two,) = submit(store, app, prepared(tmp_path, 2, "two"))
    (one,) = submit(store, app, prepared(tmp_path, 1, "one"))
    assert (two.queue, one.queue) == ("train-x2", "train")
    doc = store.get_session(two.session)
    assert doc["meta"]["queue"] == "train-x2" and doc["meta"]["world_size"] == 2
    assert (queue_depth(app, "train-x2"), queue_depth(app, "train")) == (1, 1)
    with app.connection_for_write() as conn:  # the broker lost both messages
        conn.default_channel.queue_purge("train-x2")
        conn.default_channel.queue_purge("train")
    done = reconciler(store, app, stall_after=0).run()
    assert sorted(r.name for r in done) == ["one", "two"]
    assert (queue_depth(app, "train-x2"), queue_depth(app, "train")) == (1, 1)


def test_reconcile_requeues_an_expired_lease_that_lists_devices_on_its_queue(
        mongo_store, redis_url):
    app = make_app(redis_url)
    cfg = {"session": {"total_steps": 60, "chunk_steps": 20}}  # routed by meta.queue
    doc = mongo_store.create_session(new_session_doc("pair", cfg, "h", 60,
                                                     meta={"queue": "train-x2"}))
    past = mongo_store.now() - 30
    mongo_store.cas_session(doc["_id"], {}, {"lease": {"worker": "dead@host:1",
                                                       "expires": past, "devices": ["", ""]}})
    (done,) = reconciler(mongo_store, app).run()
    assert "expired" in done.reason and [t.start for t in done.tasks] == [0]
    assert queue_depth(app, "train-x2") == 1 and queue_depth(app, "train") == 0
    assert mongo_store.get_session(doc["_id"])["lease"] is None


@needs_world_size
def test_a_one_slot_worker_leaves_a_two_rank_session_to_a_two_slot_worker(
        tmp_path, redis_url):
    app = make_app(redis_url)
    runs = str(tmp_path / "runs")
    store = open_store(runs)
    (two,) = submit(store, app, prepared(tmp_path, 2, "two"))
    env = {"PTUTILS_SLOTS_DIR": str(tmp_path / "node-a")}
    small = Worker("small", redis_url, runs, tmp_path / "w", "--slots", "1",
                   "--reconcile-every", "0", env=env).wait_ready()
    big = None
    try:
        time.sleep(2.0)
        assert queue_depth(app, "train-x2") == 1, "a 1-slot node does not take it"
        assert "ptutils.train[" not in small.log
        assert " train-x2 " not in small.log and ".> train " in small.log  # its queues
        big = Worker("big", redis_url, runs, tmp_path / "w", "-c", "1", "--slots", "2",
                     "--reconcile-every", "0",
                     env={"PTUTILS_SLOTS_DIR": str(tmp_path / "node-b")}).wait_ready()
        wait_for(lambda: "ptutils.train[" in big.log, 30, "the 2-slot node to take it",
                 alive=big)
        assert ".> train-x2 " in big.log
        wait_for(lambda: queue_depth(app, "train-x2") == 0, 10, "the message taken")
        assert "ptutils.train[" not in small.log
    finally:
        stop_all([small] + ([big] if big is not None else []))


# --- status -----------------------------------------------------------------------------
def test_status_shows_the_devices_a_session_holds_and_the_size_of_queued_ones(tmp_path):
    store = open_store(tmp_path / "runs")
    far = time.time() + 3600

    def session(name: str, world_size: int, devices: list[str] | None) -> None:
        cfg = {"session": {"world_size": world_size, "total_steps": 60, "chunk_steps": 20}}
        doc = store.create_session(new_session_doc(name, cfg, "h", 60))
        if devices is not None:
            store.cas_session(doc["_id"], {}, {"lease": {"worker": "n-cpu0@host:1",
                                                         "expires": far, "devices": devices}})

    session("pair-on-cpu", 2, ["", ""])
    session("pair-on-gpus", 2, ["0", "1"])
    session("pair-queued", 2, None)
    session("single", 1, None)
    out = ptutils("status", "--store", str(tmp_path / "runs"), env={"COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert max(map(len, lines)) <= 80, out.stdout
    assert "devices" in lines[0]
    row = {line.split()[0]: line.split() for line in lines[2:] if line.strip()}
    assert row["pair-on-cpu"][1:3] == ["running", "cpu×2"]
    assert row["pair-on-gpus"][1:3] == ["running", "gpu0,1"]
    assert row["pair-queued"][1:3] == ["queued", "2×"]
    assert row["single"][1:3] == ["queued", "0/60"]
    rows = {r["name"]: r for r in json.loads(
        ptutils("status", "--json", "--store", str(tmp_path / "runs")).stdout)}
    assert rows["pair-on-cpu"]["devices"] == ["", ""]
    assert rows["pair-on-gpus"]["devices"] == ["0", "1"]
    assert rows["pair-queued"]["devices"] is None and rows["pair-queued"]["world_size"] == 2
    assert rows["single"]["world_size"] == 1
    wide = ptutils("status", "--store", str(tmp_path / "runs"), env={"COLUMNS": "200"})
    assert "cpu×2" in wide.stdout and "gpu0,1" in wide.stdout


# --- end to end with 2-rank sessions (needs ptutils.group: issue 10's core) -------------
def test_a_four_slot_node_runs_one_two_rank_and_two_one_rank_sessions_at_once(
        tmp_path, redis_url):
    pytest.importorskip("ptutils.group")
    app = make_app(redis_url)
    runs = str(tmp_path / "runs")
    store = open_store(runs)
    slot_dir = tmp_path / "node"
    hold = tmp_path / "slow-steps"  # steps are slow while it exists (SlowSteps)
    hold.touch()
    node = Worker("node", redis_url, runs, tmp_path / "w", "--slots", "4",
                  env={"PTUTILS_SLOTS_DIR": str(slot_dir), "PTUTILS_TEST_SLOW_WHILE": str(hold)},
                  step_seconds=0.05).wait_ready()
    # One chunk per session, so no session lets go of its slots between chunks; the
    # one-rank sessions train 15 s, over the whole life of the pair (5 s + its start),
    # until the three were seen running at once: then the steps go at full speed.
    sizes = {"pair": (2, 100), "one": (1, 300), "two": (1, 300)}
    try:
        ids = {}
        for name, (size, steps) in sizes.items():
            (s,) = submit(store, app, prepared(tmp_path, size, name, total_steps=steps,
                                               chunk_steps=steps, eval_every=steps))
            ids[name] = s.session
        seen: dict[str, Any] = {}

        def all_running() -> bool:
            try:
                held = json.loads((slot_dir / "slots.json").read_text())["held"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                return False
            owners = [v["owner"] for v in held.values()]
            for name, i in ids.items():  # at every look: nobody holds more than it asked
                assert owners.count(i) <= sizes[name][0], (name, held)
            assert set(owners) <= set(ids.values()), held
            leases = {n: store.get_session(i).get("lease") or {} for n, i in ids.items()}
            if len(held) == 4 and all(v.get("devices") for v in leases.values()):
                seen.update(held=held, devices={n: v["devices"] for n, v in leases.items()})
                return True
            return False

        wait_for(all_running, 120, "the three sessions to run at once", alive=node)
        hold.unlink()
        held = seen["held"]
        assert sorted(k.rpartition("/")[2] for k in held) == ["cpu0", "cpu1", "cpu2", "cpu3"]
        owners = sorted(v["owner"] for v in held.values())
        assert owners == sorted([ids["pair"], ids["pair"], ids["one"], ids["two"]])
        assert seen["devices"] == {"pair": ["", ""], "one": [""], "two": [""]}
        table = ptutils("status", "--store", runs, env={"COLUMNS": "100"}).stdout
        assert "cpu×2" in table
        wait_for(lambda: all(store.get_session(i)["status"] == "completed"
                             for i in ids.values()), 180, "the sessions to finish", alive=node)
    finally:
        node.stop()


def test_two_rank_session_preempted_on_one_worker_ends_bit_identical_on_another(
        tmp_path, redis_url):
    pytest.importorskip("ptutils.group")
    # Chunks of 60 steps at 0.1 s: SIGTERM lands mid-chunk even on a loaded machine.
    steps = {"total_steps": 120, "chunk_steps": 60, "eval_every": 60}
    path = _config(tmp_path, **steps)
    # The reference `ptutils run` (its own store, no slow steps) runs meanwhile.
    ref = subprocess.Popen(
        [PY, "-m", "orchestrator.cli", "run", str(path), "--set", "session.world_size=2",
         "--name", "ref", "--store", str(tmp_path / "ref"), "-q"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        _preempt_on_a_then_finish_on_b(tmp_path, redis_url, steps, ref)
    finally:
        if ref.poll() is None:
            ref.kill()
        ref.communicate()


def _preempt_on_a_then_finish_on_b(tmp_path: Path, redis_url: str, steps: dict[str, int],
                                   ref: subprocess.Popen[str]) -> None:
    from ptutils.group import GroupFiles
    from tests.helpers import assert_bit_identical

    app = make_app(redis_url)
    runs = str(tmp_path / "runs")
    store = open_store(runs)
    groups = tmp_path / "tmp-a"  # the supervisor's group folders (heartbeats) live here
    groups.mkdir()
    # Only the steps of Train[60,120) are slow: the first chunk goes at full speed.
    a = Worker("a", redis_url, runs, tmp_path / "w", "--slots", "2",
               env={"PTUTILS_SLOTS_DIR": str(tmp_path / "node-a"), "TMPDIR": str(groups),
                    "PTUTILS_TEST_SLOW_FROM": "60"},
               step_seconds=0.1)
    a.wait_ready()
    (s,) = submit(store, app, prepared(tmp_path, 2, "pair", **steps))

    def training_past_20() -> bool:
        if store.get_session(s.session)["step"] != 60:
            return False
        beats = [GroupFiles(p.parent).read_beat(0) for p in groups.glob("*/*/beat.0")]
        return any(b is not None and b[0] == "train" and b[1] >= 6 for b in beats)

    wait_for(training_past_20, 120, "Train[60,120) training on a", alive=a)
    a.kill(signal.SIGTERM)
    assert a.proc.wait(timeout=40) == 0
    doc = store.get_session(s.session)
    assert doc["checkpoint"]["kind"] == "preempt" and doc["lease"] is None
    b = Worker("b", redis_url, runs, tmp_path / "w", "--slots", "2",
               env={"PTUTILS_SLOTS_DIR": str(tmp_path / "node-b")}).wait_ready()
    try:
        wait_for(lambda: store.get_session(s.session)["status"] == "completed", 180,
                 "the session to finish on b", alive=b)
        _, err = ref.communicate(timeout=300)
        assert ref.returncode == 0, err
        with open_store(tmp_path / "ref") as refs:
            doc = refs.get_session("ref")
            expected = refs.load_state(refs.get_checkpoint(doc["_id"]))
        final = store.get_session(s.session)
        assert_bit_identical(expected, store.load_state(store.get_checkpoint(final["_id"])))
    finally:
        b.stop()

