"""Sessions on several devices (ptutils.group): 2 CPU ranks with Gloo, real processes.

The acceptance of issue 10 on CPU: a 2-rank `ptutils run` ends bit-identical to itself,
to the same run with its supervisor or one rank SIGKILLed (or one rank hung) and
resumed; no rank process outlives its group; the union of the ranks' shards is the
world_size=1 batch; resizing needs --allow-resize and keeps the data position; the
group's State loads into a single-process Session.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from ptutils.errors import ConfigError
from ptutils.store import open_store
from tests.helpers import assert_bit_identical, digits_config, series
from tests.test_run import PTUTILS, ROOT, final_state, ptutils, write

GROUP_KILLER = str(ROOT / "tests" / "group_killer.py")
HANG_TIMEOUT = 2.0


def group_config(tmp_path: Path, *, step: int = 10 ** 9, rank: int = 1, action: str = "kill",
                 **session) -> dict:
    """The digits session on 2 ranks (40 steps, 2 chunks), with a RankFault that does
    not fire unless told (its marker exists for an uninterrupted run)."""
    session = {"total_steps": 40, "world_size": 2, **session}
    return digits_config(imports=[GROUP_KILLER], callbacks=[
        {"type": "group_killer.RankFault", "step": step, "rank": rank, "action": action,
         "marker": str(tmp_path / "fault")}], **session)


def uninterrupted(tmp_path: Path, name: str = "runs-a") -> Path:
    (tmp_path / "fault").write_text("x")
    path = write(tmp_path, group_config(tmp_path), "plain.yaml")
    ptutils("run", str(path), "--store", str(tmp_path / name), "-q", check=True)
    return tmp_path / name


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A store with the 2-rank session `small`, run without interruption."""
    return uninterrupted(tmp_path_factory.mktemp("reference"))


class RankWatcher:
    """Samples the process table while a run goes on: the rank processes of one store."""

    def __init__(self, store: Path) -> None:
        self.store = str(store)
        self.max_live = 0
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def live(self) -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter(["cmdline", "status"]):
            try:
                if "ptutils.group.rank" not in " ".join(p.info["cmdline"] or []):
                    continue
                if p.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                if p.environ().get("PTUTILS_STORE") == self.store:
                    out.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            live = self.live()
            self.seen.update(p.pid for p in live)
            self.max_live = max(self.max_live, len(live))

    def __enter__(self) -> RankWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_watched(args: list[str], store: Path, env: dict | None = None,
                timeout: float = 240) -> tuple[subprocess.CompletedProcess, RankWatcher]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    with RankWatcher(store) as watcher:
        child = subprocess.Popen([*PTUTILS, *args], cwd=ROOT, env=full_env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            out, err = child.communicate()
            raise AssertionError(f"ptutils {' '.join(args)} timed out:\n{out}\n{err}") from None
        proc = subprocess.CompletedProcess(child.args, child.returncode, out, err)
    gone_by = time.monotonic() + 0.3
    while watcher.live() and time.monotonic() < gone_by:
        time.sleep(0.05)
    assert watcher.live() == [], "no rank process outlives its run (0.3 s after it)"
    return proc, watcher


def assert_same_run(store_a: Path, store_b: Path) -> None:
    doc_a, ckpt_a, state_a, stats_a = final_state(store_a, "small")
    doc_b, ckpt_b, state_b, stats_b = final_state(store_b, "small")
    assert doc_a["status"] == doc_b["status"] == "completed"
    assert ckpt_a["step"] == ckpt_b["step"] == 40
    assert state_a["group"]["world_size"] == 2 and len(state_a["group"]["rng"]) == 2
    assert_bit_identical(state_a, state_b)
    assert series(stats_a) == series(stats_b)
    train = [p["step"] for p in stats_b if p["name"] == "loss" and p["phase"] == "train"]
    assert train == list(range(1, 41)), "every step logged once"


# --- acceptance, real processes ------------------------------------------------------------


def test_two_ranks_end_bit_identical_to_themselves(tmp_path, reference):
    again = uninterrupted(tmp_path)
    assert_same_run(reference, again)
    _, _, state, _ = final_state(reference, "small")
    r0, r1 = state["group"]["rng"]
    assert not torch.equal(r0["torch"], r1["torch"]), "ranks draw their own dropout masks"


def test_supervisor_sigkilled_then_resumed_is_bit_identical(tmp_path, reference):
    step = random.Random(os.getpid()).choice([s for s in range(3, 39) if s % 20 not in (0, 1)])
    path = write(tmp_path, group_config(tmp_path, step=step, rank=0, action="kill_parent"))
    store = tmp_path / "runs-b"
    killed, _ = run_watched(["run", str(path), "--store", str(store), "-q"], store)
    assert killed.returncode == -9, killed.stderr
    assert (tmp_path / "fault").exists()
    with open_store(store) as s:  # the dead supervisor's lease names the devices it held
        assert s.get_session("small")["lease"]["devices"] == ["", ""]
    resumed, _ = run_watched(["run", str(path), "--store", str(store), "-q", "--resume"], store)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(reference, store)


def test_sigterm_stops_every_rank_at_one_step_with_one_preempt_checkpoint(tmp_path, reference):
    path = write(tmp_path, group_config(tmp_path, step=27, rank=0, action="term_parent"))
    store = tmp_path / "runs-p"
    stopped, _ = run_watched(["run", str(path), "--store", str(store), "-q"], store)
    assert stopped.returncode == 130, stopped.stderr
    with open_store(store) as s:
        doc = s.get_session("small")
        assert doc["status"] == "paused" and 27 <= doc["step"] < 40
        ckpt = s.get_checkpoint(doc["_id"])
        assert (ckpt["step"], ckpt["kind"]) == (doc["step"], "preempt")
        assert s.load_state(ckpt)["group"]["world_size"] == 2
    resumed, _ = run_watched(["run", "--resume", "small", "--store", str(store), "-q"], store)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(reference, store)


def test_an_error_of_the_session_in_a_rank_fails_it_with_the_reason(tmp_path):
    (tmp_path / "fault").write_text("x")
    cfg = group_config(tmp_path, total_steps=20)
    cfg["model"]["optimizer"] = {"type": "torch.optim.SGD", "lr": 1.0e30}
    cfg["model"]["scheduler"] = None
    store = tmp_path / "runs-n"
    proc, _ = run_watched(["run", str(write(tmp_path, cfg)), "--store", str(store), "-q"], store)
    assert proc.returncode == 1 and "NanLossError" in proc.stderr, proc.stderr
    with open_store(store) as s:
        doc = s.get_session("small")
    assert doc["status"] == "failed" and "NanLossError" in doc["error"]["message"]
    assert "Traceback" in doc["error"]["traceback"] and "nan" in doc["error"]["traceback"].lower()


def test_one_rank_sigkilled_stops_the_group_and_the_run_recovers(tmp_path, reference):
    step = random.Random(os.getpid() + 1).choice([s for s in range(3, 39) if s % 20 not in (0, 1)])
    path = write(tmp_path, group_config(tmp_path, step=step, rank=1, action="kill"))
    store = tmp_path / "runs-c"
    started = time.monotonic()
    proc, watcher = run_watched(["run", str(path), "--store", str(store), "-q"], store)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "fault").exists()
    assert watcher.max_live <= 2, "the dead group's ranks were gone before the next started"
    assert len(watcher.seen) >= 4, f"a new group replaced the broken one: {watcher.seen}"
    assert "rank 1 exited with signal SIGKILL" in proc.stderr, proc.stderr
    assert time.monotonic() - started < 120
    assert_same_run(reference, store)


def test_a_hung_rank_is_detected_and_the_run_recovers(tmp_path, reference):
    step = 27
    path = write(tmp_path, group_config(tmp_path, step=step, rank=1, action="hang"))
    store = tmp_path / "runs-d"
    started = time.monotonic()
    proc, watcher = run_watched(["-v", "run", str(path), "--store", str(store), "-q"], store,
                                env={"PTUTILS_HANG_TIMEOUT": str(HANG_TIMEOUT)})
    assert proc.returncode == 0, proc.stderr
    assert "made no progress" in proc.stderr and "hung" in proc.stderr
    assert watcher.max_live <= 2
    assert_same_run(reference, store)
    detected = _detection_delay(proc.stderr, tmp_path / "fault")
    assert detected <= HANG_TIMEOUT + 10, detected
    assert time.monotonic() - started < 120


def _detection_delay(stderr: str, marker: Path) -> float:
    """Seconds from the hang (the marker's mtime) to the supervisor's warning."""
    import datetime

    for line in stderr.splitlines():
        if "group stopped" in line and "made no progress" in line:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp() - marker.stat().st_mtime
    raise AssertionError(f"no hang warning in:\n{stderr}")


def test_two_ranks_train_on_the_union_of_their_shards(tmp_path):
    """No dropout: 2 ranks x 16 samples per step give the 1-rank 32-sample step (up to
    the summation order of the gradient average)."""
    stores = {}
    for world in (1, 2):
        cfg = group_config(tmp_path, world_size=world, total_steps=8, chunk_steps=8,
                           eval_every=0)
        cfg["model"]["network"]["dropout"] = 0.0
        (tmp_path / "fault").write_text("x")
        path = write(tmp_path, cfg, f"w{world}.yaml")
        stores[world] = tmp_path / f"w{world}"
        ptutils("run", str(path), "--store", str(stores[world]), "-q", check=True)
    _, _, one, stats_one = final_state(stores[1], "small")
    _, _, two, stats_two = final_state(stores[2], "small")
    assert one["trainer"]["data"] == two["trainer"]["data"], "same global data position"
    net1, net2 = one["trainer"]["model"]["network"], two["trainer"]["model"]["network"]
    assert net1.keys() == net2.keys()
    for k in net1:
        assert torch.allclose(net1[k], net2[k], rtol=1e-4, atol=1e-5), k
    loss1 = [p["value"] for p in stats_one if p["name"] == "loss"]
    loss2 = [p["value"] for p in stats_two if p["name"] == "loss"]
    assert loss1 == pytest.approx(loss2, rel=1e-4), "the logged loss is the global batch's"


def test_resize_needs_allow_resize_and_keeps_the_data_position(tmp_path, reference):
    path = write(tmp_path, group_config(tmp_path, step=25, rank=0, action="kill_parent"))
    store = tmp_path / "runs-e"
    killed = ptutils("run", str(path), "--store", str(store), "-q")
    assert killed.returncode == -9, killed.stderr
    refused = ptutils("run", "--resume", "small", "--store", str(store), "-q",
                      "--set", "session.world_size=1")
    assert refused.returncode == 2 and "--allow-resize" in refused.stderr, refused.stderr
    with open_store(store) as s:
        doc = s.get_session("small")
        assert doc["config"]["session"]["world_size"] == 2 and doc["step"] == 20
    ptutils("run", "--resume", "small", "--store", str(store), "-q", "--set",
            "session.world_size=1", "--allow-resize", check=True)
    doc, ckpt, state, stats = final_state(store, "small")
    _, _, ref, _ = final_state(reference, "small")
    assert doc["status"] == "completed" and doc["config"]["session"]["world_size"] == 1
    assert "group" not in state
    assert state["trainer"]["data"] == ref["trainer"]["data"], "no sample skipped or repeated"
    train = [p["step"] for p in stats if p["name"] == "loss" and p["phase"] == "train"]
    assert train == list(range(1, 41))


def test_the_group_checkpoint_loads_into_a_single_process_session(tmp_path, reference):
    from ptutils.engine import build_session

    doc, ckpt, state, stats = final_state(reference, "small")
    assert [p["step"] for p in stats if p["name"] == "test/accuracy"] == [20, 40]
    assert not any(k.startswith("module.") for k in state["trainer"]["model"]["network"])
    from ptutils import policy

    cfg = {**doc["config"], "session": {**doc["config"]["session"], "world_size": 1}}
    previous = policy.configure(policy.Policy(trust_session_code=True))  # group_killer.py
    try:
        session = build_session(cfg, doc.get("code"), place=False)
    finally:
        policy.configure(previous)
    session.load_state_dict(state)
    assert session.saved_world_size() == 2
    metrics = session.evaluator.evaluate(session.model, session.data)
    acc = [p["value"] for p in stats if p["name"] == "test/accuracy" and p["step"] == 40]
    assert metrics["test/accuracy"] == pytest.approx(acc[0])
    out = tmp_path / "net.pt"
    ptutils("export", "small", "-o", str(out), "--store", str(reference), check=True)
    weights = torch.load(out, weights_only=True)
    for k, v in weights.items():
        assert torch.equal(v, state["trainer"]["model"]["network"][k])


# --- config and sharding, in process -----------------------------------------------------


def test_world_size_and_batch_size_are_checked(tmp_path):
    from ptutils.engine import build_session

    cfg = digits_config(imports=[], callbacks=[], world_size=3)
    with pytest.raises(ConfigError, match=r"data.batch_size.*session.world_size=3"):
        build_session(cfg, place=False)
    cfg = digits_config(imports=[], callbacks=[], world_size=0)
    with pytest.raises(ConfigError, match="session.world_size"):
        build_session(cfg, place=False)
    cfg = digits_config(imports=[], callbacks=[], world_size=2)
    cfg["data"]["drop_last"] = False
    with pytest.raises(ConfigError, match="data.drop_last"):
        build_session(cfg, place=False)
    cfg = digits_config(imports=[], callbacks=[], world_size=2, device="cuda:1")
    with pytest.raises(ConfigError, match="session.device"):
        build_session(cfg, place=False)


@pytest.mark.parametrize("source", ["reader", "torch dataset", "workers", "iterable"])
def test_the_shards_of_a_step_are_the_global_batch(source):
    """Per-sample seeds (augmentation) and the order do not depend on the world size."""
    from tests.test_torch_data import augmented, provider

    def make():
        if source == "reader":
            return provider({"train": {"type": "ptutils.data.DigitsReader"}}, batch_size=8)
        if source == "iterable":
            return provider({"train": {"type": "torch_datasets.Stream", "n": 40}},
                            batch_size=8)
        return augmented(2 if source == "workers" else 0)

    whole = make()
    parts = [make() for _ in range(2)]
    for r, p in enumerate(parts):
        p.shard(r, 2)
    for _ in range(14):  # past an epoch's end
        batch = whole.next_batch()
        shards = [p.next_batch() for p in parts]
        for key in batch:
            assert torch.equal(torch.cat([s[key] for s in shards]), batch[key]), key
    assert all(p.extra_state() == whole.extra_state() for p in parts)
    for p in (whole, *parts):
        p.close()
