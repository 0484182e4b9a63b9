"""`ptutils run` end to end: the digits example, exact resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ptutils.store import open_store
from tests.helpers import assert_bit_identical, digits_config, series

ROOT = Path(__file__).resolve().parents[1]
PTUTILS = [sys.executable, "-m", "orchestrator.cli"]
KILLER = str(ROOT / "tests" / "killer.py")


def ptutils(*args: str, cwd: Path | None = None, check: bool = False,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([*PTUTILS, *args], cwd=cwd or ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"ptutils {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def small_config(tmp_path: Path, **session) -> dict:
    """The shared digits config with a KillAt callback that does not fire unless told."""
    return digits_config(imports=[KILLER], callbacks=[
        {"type": "killer.KillAt", "step": 10 ** 9, "marker": str(tmp_path / "killed")}],
        **session)


def write(tmp_path: Path, cfg: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def final_state(store_dir: Path | str, name: str):
    with open_store(store_dir) as store:
        doc = store.get_session(name)
        ckpt = store.get_checkpoint(doc["_id"])
        stats = store.query_statistics(doc["_id"])
        return doc, ckpt, store.load_state(ckpt), stats


@pytest.mark.parametrize("where", ["between checkpoints", "right after a checkpoint"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, where):
    rng = random.Random(os.getpid())
    kill_step = rng.choice([s for s in range(2, 59) if s % 20 not in (0, 1)]) \
        if where == "between checkpoints" else rng.choice([21, 41])
    cfg = small_config(tmp_path)
    cfg["callbacks"][0]["step"] = kill_step
    # The uninterrupted run uses the very same config (same hash); it runs after the
    # killed one, when the marker file exists, so KillAt never fires in it.
    path = write(tmp_path, cfg)
    store_a, store_b = tmp_path / "runs-a", tmp_path / "runs-b"

    killed = ptutils("run", str(path), "--store", str(store_b), "-q")
    assert killed.returncode == -9, killed.stderr
    assert (tmp_path / "killed").exists()
    again = ptutils("run", str(path), "--store", str(store_b), "-q")
    assert again.returncode == 2 and "--resume" in again.stderr, "same name without --resume"
    ptutils("run", str(path), "--store", str(store_b), "-q", "--resume", check=True)

    ptutils("run", str(path), "--store", str(store_a), "-q", check=True)  # marker exists now

    doc_a, ckpt_a, state_a, stats_a = final_state(store_a, "small")
    doc_b, ckpt_b, state_b, stats_b = final_state(store_b, "small")
    assert doc_a["status"] == doc_b["status"] == "completed"
    assert ckpt_a["step"] == ckpt_b["step"] == 60
    assert_bit_identical(state_a, state_b)
    assert series(stats_a) == series(stats_b)
    keys = [(p["phase"], p["step"], p["name"]) for p in stats_b]
    assert len(keys) == len(set(keys)), "no step appears twice in the statistics"
    train_steps = [p["step"] for p in stats_b if p["name"] == "loss" and p["phase"] == "train"]
    assert train_steps == list(range(1, 61))


def test_digits_example_reaches_95_percent(tmp_path):
    proc = ptutils("run", "examples/digits_mlp.yaml", "--store", str(tmp_path / "runs"), "-q",
                   check=True)
    assert "test/accuracy" in proc.stdout
    _, ckpt, _, stats = final_state(tmp_path / "runs", "digits-mlp")
    acc = [p["value"] for p in stats if p["name"] == "test/accuracy"]
    assert acc and acc[-1] >= 0.95, acc


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A store holding the completed session `small` (shared by the read-only tests)."""
    tmp = tmp_path_factory.mktemp("finished")
    (tmp / "killed").write_text("x")
    path = write(tmp, small_config(tmp))
    ptutils("run", str(path), "--store", str(tmp / "runs"), "-q", check=True)
    return tmp / "runs"


def test_export_writes_a_plain_state_dict(tmp_path, finished_run):
    out = tmp_path / "net.pt"
    ptutils("export", "small", "-o", str(out), "--store", str(finished_run), check=True)
    weights = torch.load(out, weights_only=True)
    _, _, state, _ = final_state(finished_run, "small")
    assert weights.keys() == state["trainer"]["model"]["network"].keys()
    for k, v in weights.items():
        assert torch.equal(v, state["trainer"]["model"]["network"][k])


def _stored_failure(store_dir: Path, name: str) -> dict:
    with open_store(store_dir) as store:
        return store.get_session(name)


def test_nan_loss_marks_the_session_failed_and_keeps_earlier_checkpoints(tmp_path):
    cfg = small_config(tmp_path, total_steps=200, chunk_steps=20)
    (tmp_path / "killed").write_text("x")
    cfg["model"]["optimizer"] = {"type": "torch.optim.SGD", "lr": 1.0e30}
    cfg["model"]["scheduler"] = None
    path = write(tmp_path, cfg)
    store = tmp_path / "runs"
    proc = ptutils("run", str(path), "--store", str(store), "-q")
    assert proc.returncode == 1
    assert "NanLossError" in proc.stderr and "learning rate" in proc.stderr
    doc = _stored_failure(store, "small")
    assert doc["status"] == "failed" and "NanLossError" in doc["error"]["message"]
    with open_store(store) as s:
        for ckpt in s.list_checkpoints(doc["_id"]):
            s.load_state(ckpt)  # every kept checkpoint still loads


@pytest.mark.parametrize("mutate,expect", [
    (lambda c, t: c["data"]["datasets"].update(
        train={"type": "ptutils.data.NpzReader", "path": str(t / "missing.npz")}),
     "missing.npz"),
    (lambda c, t: c["model"]["network"].update(in_features=63), "in_features"),
    (lambda c, t: c["model"].update(network={"type": "os.system", "command": "true"}),
     "allowlist"),
    (lambda c, t: c["session"].update(chunk_sise=5), "chunk_steps"),
])
def test_bad_input_is_refused_with_a_clear_error_and_nothing_stored(tmp_path, mutate, expect):
    cfg = small_config(tmp_path)
    mutate(cfg, tmp_path)
    path = write(tmp_path, cfg)
    proc = ptutils("run", str(path), "--store", str(tmp_path / "runs"), "-q")
    assert proc.returncode == 2, proc.stderr
    assert expect in proc.stderr
    assert "Traceback" not in proc.stderr
    with open_store(tmp_path / "runs") as store:
        assert store.find_sessions() == []


def test_failure_after_start_keeps_checkpoints_and_is_recorded(tmp_path, monkeypatch):
    """A data file that disappears between runs: --resume fails clearly, earlier work intact."""
    # Checkpoints committed before training goes on, so the one at step 20 is surely in
    # when the run is killed at step 30 (written in the background, it may still be in
    # flight: the session would then resume from step 0, see test_async_checkpoint.py).
    monkeypatch.setenv("PTUTILS_CHUNKS_PER_TASK", "1")
    from sklearn.datasets import load_digits

    digits = load_digits()
    np.savez(tmp_path / "d.npz", x=(digits.data / 16).astype("float32"),
             y=digits.target.astype("int64"))
    cfg = small_config(tmp_path)
    cfg["data"]["datasets"]["train"] = {"type": "ptutils.data.NpzReader",
                                        "path": str(tmp_path / "d.npz")}
    cfg["callbacks"][0]["step"] = 30
    path = write(tmp_path, cfg)
    store = tmp_path / "runs"
    assert ptutils("run", str(path), "--store", str(store), "-q").returncode == -9
    (tmp_path / "d.npz").unlink()
    proc = ptutils("run", str(path), "--store", str(store), "-q", "--resume")
    assert proc.returncode == 1 and "d.npz" in proc.stderr
    doc = _stored_failure(store, "small")
    assert doc["status"] == "failed" and "d.npz" in doc["error"]["message"]
    with open_store(store) as s:
        ckpt = s.get_checkpoint(doc["_id"])
        assert ckpt["step"] == 20
        s.load_state(ckpt)


def test_run_help_explains_the_options():
    out = ptutils("run", "--help", check=True).stdout
    for opt in ("--set", "--name", "--store", "--resume", "PTUTILS_STORE"):
        assert opt in out


def test_stats_plot_writes_a_png(tmp_path, finished_run):
    png = tmp_path / "curves.png"
    ptutils("stats", "small", "--plot", str(png), "--store", str(finished_run), check=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = json.loads(ptutils("stats", "small", "--json", "--store", str(finished_run),
                             check=True).stdout)
    assert len(out["small"]["train/loss"]["steps"]) == 60


@pytest.mark.parametrize("example,name", [("digits_cnn.yaml", "digits-cnn"),
                                          ("custom_module.yaml", "digits-custom")])
def test_other_examples_run_and_learn(tmp_path, example, name):
    store = tmp_path / "runs"
    ptutils("run", f"examples/{example}", "--store", str(store), "-q", check=True)
    doc, _, _, stats = final_state(store, name)
    assert doc["status"] == "completed"
    acc = [p["value"] for p in stats if p["name"] == "test/accuracy"]
    assert acc[-1] >= 0.9, acc


def test_run_on_mongodb_resumes_bit_identical_to_the_local_store(tmp_path, mongo_uri):
    """`ptutils run --store mongodb://...`: killed, resumed, and equal to a local run."""
    cfg = small_config(tmp_path)
    cfg["callbacks"][0]["step"] = 33
    path = write(tmp_path, cfg)
    assert ptutils("run", str(path), "--store", mongo_uri, "-q").returncode == -9
    ptutils("run", str(path), "--store", mongo_uri, "-q", "--resume", check=True)
    ptutils("run", str(path), "--store", str(tmp_path / "local"), "-q", check=True)
    doc_m, ckpt_m, state_m, stats_m = final_state(mongo_uri, "small")
    doc_l, ckpt_l, state_l, stats_l = final_state(tmp_path / "local", "small")
    assert doc_m["status"] == doc_l["status"] == "completed"
    assert_bit_identical(state_m, state_l)
    assert series(stats_m) == series(stats_l)
