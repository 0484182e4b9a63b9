"""`ptutils search`: space parsing, ASHA decisions and exactness, a killed driver, PBT.

Tiny digits MLPs (60 steps, an eval every 20): each search takes a few seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from ptutils.errors import ConfigError
from ptutils.runner import prepare_session, run_session
from ptutils.search import Driver, SearchSpec, Space, best_trial, create_search, decisions
from ptutils.search.local import LocalExecutor
from ptutils.search.schedulers import rungs
from ptutils.store.local import LocalStore
from tests.helpers import assert_bit_identical, digits_config

ROOT = Path(__file__).resolve().parents[1]
SPACE = {
    "model.optimizer.lr": {"loguniform": [1.0e-4, 3.0e-2]},
    "model.network.hidden": {"choice": [[16], [32]]},
}


def base_config(**session: Any) -> dict[str, Any]:
    cfg = digits_config(imports=[], callbacks=[], **session)
    del cfg["imports"]
    return cfg


def run_search(store: LocalStore, name: str = "s", **kw: Any) -> dict[str, Any]:
    spec = SearchSpec(name=name, config=base_config(), space=SPACE,
                      **{"algo": "tpe", "scheduler": "asha", "trials": 6, "parallel": 3,
                         "seed": 7, **kw})
    create_search(store, spec)
    return Driver(store, name, LocalExecutor(store)).run(timeout=300)


def test_space_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"space.model.optimizer.lr.loguniform: bounds"):
        Space.parse({"model.optimizer.lr": {"loguniform": [0, 1]}})
    with pytest.raises(ConfigError, match="exactly one of"):
        Space.parse({"a.b": {"uniform": [0, 1], "choice": [1]}})
    with pytest.raises(ConfigError, match="must be a key of the space listed before"):
        Space.parse({"a.b": {"uniform": [0, 1], "when": {"c.d": 1}}})
    with pytest.raises(ConfigError, match="--algo grid needs a finite set"):
        Space.parse({"a.b": {"uniform": [0, 1]}}).grid()
    space = Space.parse({"o.type": {"choice": ["SGD", "Adam"]},
                         "o.momentum": {"uniform": [0, 0.9], "when": {"o.type": "SGD"}}})
    assert space.params[1].active({"o.type": "SGD"})
    assert not space.params[1].active({"o.type": "Adam"})


def test_rungs_are_eval_points() -> None:
    assert rungs(20, 540, 3, 20) == [20, 60, 180, 540]
    assert rungs(20, 500, 3, 20) == [20, 60, 180, 500]
    with pytest.raises(ConfigError, match="--min-steps: must be a positive multiple"):
        rungs(30, 540, 3, 20)


def test_asha_is_deterministic_and_a_promoted_trial_is_exact(tmp_path: Path) -> None:
    """Two searches with the same seed decide alike; the best trial, stopped at rung 20
    and promoted to 60, ends bit-identical to one uninterrupted run of its config."""
    with LocalStore(tmp_path / "a") as a, LocalStore(tmp_path / "b") as b:
        body_a, body_b = run_search(a), run_search(b)
        assert decisions(body_a) == decisions(body_b)
        kinds = [d[0] for d in decisions(body_a)]
        assert kinds.count("ask") == 6 and "stop" in kinds and "promote" in kinds
        best = best_trial(body_a)
        assert best is not None and best == best_trial(body_b)
        wa = a.load_state(a.get_checkpoint(a.get_session(best["name"])["_id"]))
        wb = b.load_state(b.get_checkpoint(b.get_session(best["name"])["_id"]))
        assert_bit_identical(wa, wb)
        stopped = [t for t in body_a["trials"] if t["state"] == "stopped"]
        doc = a.get_session(stopped[0]["name"])
        assert doc["step"] == 20 and doc["meta"]["stopped"].startswith("asha: rung step 20")
        assert a.list_checkpoints(doc["_id"])  # its last checkpoint is kept
        from ptutils.search.space import apply_params

        cfg = apply_params(base_config(), dict(best["params"]))
        with LocalStore(tmp_path / "ref") as ref:
            rdoc, warm = prepare_session(ref, cfg, "ref")
            run_session(ref, rdoc, warm=warm)
            assert_bit_identical(wa, ref.load_state(ref.get_checkpoint(rdoc["_id"])))


def _cli(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "search", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_killed_driver_resumes_with_no_trial_lost_or_run_twice(tmp_path: Path) -> None:
    cfg_path, space_path = tmp_path / "exp.yaml", tmp_path / "space.yaml"
    cfg_path.write_text(yaml.safe_dump({**base_config(), "name": "k"}))
    space_path.write_text(yaml.safe_dump(SPACE))
    common = ["--space", str(space_path), "--algo", "tpe", "--scheduler", "asha",
              "--trials", "6", "--parallel", "3", "--seed", "7", "--local"]
    ref = _cli(str(cfg_path), *common, "--store", str(tmp_path / "ref"))
    killed = _cli(str(cfg_path), *common, "--store", str(tmp_path / "k"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill after a few decisions, mid-search
        with LocalStore(tmp_path / "k") as st:
            doc = st.get_document("search", "k")
        if doc and sum(e["kind"] in ("stop", "promote") for e in doc["body"]["log"]) >= 2:
            break
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert ref.wait(timeout=300) == 0, ref.stdout.read() if ref.stdout else ""
    again = _cli("--resume", "k", "--local", "--store", str(tmp_path / "k"))
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    with LocalStore(tmp_path / "ref") as r, LocalStore(tmp_path / "k") as k:
        body_r = r.get_document("search", "k")["body"]
        body_k = k.get_document("search", "k")["body"]
        assert body_k["done"] and decisions(body_k) == decisions(body_r)
        sessions = k.find_sessions(tag="search:k")
        assert sorted(s["name"] for s in sessions) == [f"k-{n}" for n in range(6)]
        for t in body_k["trials"]:  # each trial's statistics are those of the reference
            sk, sr = k.get_session(t["name"]), r.get_session(t["name"])
            assert sk["step"] == sr["step"] and sk["status"] == "completed"
            pts_k = [(p["phase"], p["step"], p["name"], p["value"])
                     for p in k.query_statistics(sk["_id"])]
            pts_r = [(p["phase"], p["step"], p["name"], p["value"])
                     for p in r.query_statistics(sr["_id"])]
            assert pts_k == pts_r
        best = best_trial(body_k)
        assert best == best_trial(body_r)
        assert_bit_identical(
            k.load_state(k.get_checkpoint(k.get_session(best["name"])["_id"])),
            r.load_state(r.get_checkpoint(r.get_session(best["name"])["_id"])))
    # Seeing it: the table of trials, and the plots a person would rather look at.
    table, _ = _cli("status", "k", "--store", str(tmp_path / "ref")).communicate(timeout=60)
    assert f"best: trial {best['n']} " in table, table
    assert all(f"\n{n} " in table or f"\n{n}  " in table for n in range(6)), table
    png = tmp_path / "search.png"
    plot, _ = _cli("plot", "k", "-o", str(png), "--store", str(tmp_path / "ref")).communicate(
        timeout=120)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot


def test_pbt_records_lineage_and_exploits_write_no_segment_bytes(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "p") as store:
        spec = SearchSpec(name="p", config=base_config(), space=SPACE, algo="random",
                          scheduler="pbt", trials=4, seed=3, pbt_fraction=0.25)
        create_search(store, spec)
        body = Driver(store, "p", LocalExecutor(store)).run(timeout=300)
        exploits = [e for e in body["log"] if e["kind"] == "exploit"]
        assert len(exploits) == 2  # ready points 20 and 40, one bottom member each
        lineage = [e for t in body["trials"] for e in t["lineage"]]
        assert len(lineage) == 2
        assert all(e["bytes_written"] == 0 for e in lineage)
        for t in body["trials"]:
            for e in t["lineage"]:
                donor = body["trials"][e["donor"]]
                assert donor["n"] != t["n"]
                assert e["hparams"]["lr"] > 0
            doc = store.get_session(t["name"])
            assert doc["meta"].get("lineage", []) == t["lineage"]
            assert doc["step"] == 60 and doc["status"] == "completed"


def test_an_ask_does_not_depend_on_what_live_trials_reported(tmp_path: Path) -> None:
    """Trial 9 (--parallel 3) is asked once trials 0..7 finished: whether trial 8 is
    running, has a rung value or already completed (worker timing) changes nothing."""
    import copy

    with LocalStore(tmp_path / "s") as store:
        spec = SearchSpec(name="t", config=base_config(), space=SPACE, algo="tpe",
                          scheduler="none", trials=10, parallel=2, seed=5)
        create_search(store, spec)
        driver = Driver(store, "t", LocalExecutor(store))
        body = copy.deepcopy(store.get_document("search", "t")["body"])
        driver._ask(body)  # trials 0 and 1, then finish them one by one
        for n in range(8):
            body["trials"][n].update(state="complete", value=0.5 + 0.01 * (n % 3),
                                     rungs=[[60, 0.5 + 0.01 * (n % 3)]])
            driver._ask(body)
        assert len(body["trials"]) == 10
        asked = body["trials"][9]["params"]
        for trial8 in ({"rungs": [[20, 0.9]]},
                       {"state": "complete", "value": 0.95, "rungs": [[60, 0.95]]}):
            other = copy.deepcopy(body)
            del other["trials"][9]
            other["trials"][8].update(trial8)
            driver._ask(other)
            assert other["trials"][9]["params"] == asked


@pytest.mark.parametrize("scheduler", [
    None,  # the base config's StepLR (chainable: it scales the group's current lr)
    {"type": "torch.optim.lr_scheduler.CosineAnnealingLR", "T_max": 60},
    {"type": "torch.optim.lr_scheduler.OneCycleLR", "max_lr": 0.01, "total_steps": 60},
], ids=["step", "cosine", "onecycle"])
def test_pbt_member_trains_with_the_perturbed_lr(tmp_path: Path, scheduler: Any) -> None:
    """After an exploit at step s, the member's lr (logged each step, and in its next
    checkpoint's param groups) is the donor's at the same step times the lr factor, up
    to the next ready point: the scheduler continues from the scaled rate."""
    cfg = base_config()
    if scheduler is not None:
        cfg["model"]["scheduler"] = scheduler
    with LocalStore(tmp_path / "p") as store:
        create_search(store, SearchSpec(name="p", config=cfg, space=SPACE, algo="random",
                                        scheduler="pbt", trials=4, seed=3))
        body = Driver(store, "p", LocalExecutor(store)).run(timeout=300)

        def lrs(n: int) -> dict[int, float]:
            sid = store.get_session(body["trials"][n]["name"])["_id"]
            return {p["step"]: p["value"] for p in store.query_statistics(sid, name="lr")}

        def ckpt_lr(n: int, step: int) -> float:
            sid = store.get_session(body["trials"][n]["name"])["_id"]
            state = store.load_state(store.get_checkpoint(sid, step))
            return float(state["trainer"]["model"]["optimizer"]["param_groups"][0]["lr"])

        exploits = [(t["n"], e) for t in body["trials"] for e in t["lineage"]]
        assert len(exploits) == 2
        for n, e in exploits:
            s, f = e["step"], e["factors"]["lr"]
            mine, donor = lrs(n), lrs(e["donor"])
            assert mine[s + 1] != donor[s + 1]
            for step in range(s + 1, s + 21):
                assert mine[step] == pytest.approx(donor[step] * f, rel=1e-9, abs=0), step
            assert ckpt_lr(n, s + 20) == pytest.approx(ckpt_lr(e["donor"], s + 20) * f,
                                                       rel=1e-9, abs=0)


def test_a_metric_no_eval_produces_fails_before_anything_is_stored(tmp_path: Path) -> None:
    cfg_path, space_path = tmp_path / "exp.yaml", tmp_path / "space.yaml"
    cfg_path.write_text(yaml.safe_dump(base_config()))
    space_path.write_text(yaml.safe_dump(SPACE))
    proc = _cli(str(cfg_path), "--space", str(space_path), "--metric", "test/acc", "--local",
                "--store", str(tmp_path / "runs"))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert "--metric test/acc" in out and "test/accuracy" in out and "Traceback" not in out
    assert not (tmp_path / "runs").exists()
