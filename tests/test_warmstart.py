"""Warm starts (`init:`): partial restore with only/rename from a session or a file,
stored as the new session's `init` checkpoint, kept by retention, resumed exactly."""

from __future__ import annotations

import hashlib
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from ptutils.errors import ConfigError
from ptutils.retention import retained_steps
from ptutils.runner import (
    TrainingFailed,
    export_state_dict,
    pause_session,
    prepare_session,
    resume_session,
    run_session,
    validate,
)
from ptutils.session import Plan
from ptutils.store.local import LocalStore
from ptutils.warmstart import InitSpec, initial_state, select
from tests.helpers import assert_bit_identical, corrupt_segment, digits_config, series
from tests.test_run import ptutils

NET = ("trainer", "model", "network")


def config(**session: Any) -> dict[str, Any]:
    """The shared digits MLP (64 -> 32 -> 10), trained in chunks of 20 steps."""
    return digits_config(imports=[], callbacks=[], **{"total_steps": 40, **session})


def target_config(init: dict[str, Any] | None = None, **session: Any) -> dict[str, Any]:
    """A deeper MLP (64 -> 32 -> 32 -> 10, so layers.1, layers.4, layers.7), seed 5."""
    cfg = config(seed=5, **session)
    cfg["model"]["network"]["hidden"] = [32, 32]
    if init is not None:
        cfg["init"] = init
    return cfg


def network(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    for key in NET:
        state = state[key]
    return state


@pytest.fixture(scope="module")
def source_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding `src`, a completed session with checkpoints at steps 20 and 40."""
    folder = tmp_path_factory.mktemp("source") / "runs"
    with LocalStore(folder) as store:
        doc, session = prepare_session(store, config(), "src")
        assert run_session(store, doc, warm=session).status == "completed"
    return folder


@pytest.fixture
def store(source_store: Path, tmp_path: Path):
    """A copy of the source store, of this test's own."""
    shutil.copytree(source_store, tmp_path / "runs")
    with LocalStore(tmp_path / "runs") as s:
        yield s


def source_net(store: LocalStore, step: int) -> dict[str, torch.Tensor]:
    src = store.get_session("src")
    return network(store.load_state(store.get_checkpoint(src["_id"], step)))


def cold_state(cfg: dict[str, Any]) -> dict[str, Any]:
    """The step-0 State of the same session started cold (its seeded init)."""
    return initial_state(validate({k: v for k, v in cfg.items() if k != "init"}))


PARTIAL = {"from": "src@20", "only": ["layers.1.weight", "layers.4.*"],
           "rename": {"layers.4": "layers.7"}}


# --- what a warm start loads ---------------------------------------------------------
def test_only_and_rename_load_exactly_the_named_tensors(store):
    cfg = target_config(PARTIAL)
    doc, session = prepare_session(store, cfg, "warm")

    src = store.get_session("src")
    assert doc["status"] == "running" and doc["checkpoint"] == {"step": 0, "kind": "init"}
    assert doc["init"] == {
        "from": "src@20",
        "source": {"session": src["_id"], "name": "src", "step": 20, "kind": "chunk"},
        "only": ["layers.1.weight", "layers.4.*"], "rename": {"layers.4": "layers.7"},
        "loaded": ["layers.1.weight", "layers.7.weight", "layers.7.bias"],
        "skipped": ["layers.1.bias"]}
    assert [e["kind"] for e in doc["events"]] == ["init"]
    (ckpt,) = store.list_checkpoints(doc["_id"])
    assert (ckpt["step"], ckpt["kind"]) == (0, "init")
    state = store.load_state(store.get_checkpoint(doc["_id"], 0))

    net, source, cold = network(state), source_net(store, 20), cold_state(cfg)
    assert torch.equal(net["layers.1.weight"], source["layers.1.weight"])
    assert torch.equal(net["layers.7.weight"], source["layers.4.weight"])
    assert torch.equal(net["layers.7.bias"], source["layers.4.bias"])
    for name in ("layers.1.bias", "layers.4.weight", "layers.4.bias"):  # seeded init
        assert torch.equal(net[name], network(cold)[name]), name
    assert not torch.equal(network(cold)["layers.1.weight"], source["layers.1.weight"])
    # everything else (optimizer, data order, RNGs right after the build) is the cold start's
    network(cold).update({k: net[k] for k in doc["init"]["loaded"]})
    assert_bit_identical(state, cold)
    for name, value in session.model.network.state_dict().items():  # the adopted session
        assert torch.equal(value, net[name]), name


def test_without_only_every_source_tensor_is_loaded(store):
    cfg = config(seed=5, total_steps=20)
    doc, _ = prepare_session(store, {**cfg, "init": {"from": "src"}}, "warm")
    assert doc["init"]["source"]["step"] == 40  # the latest checkpoint
    assert doc["init"]["skipped"] == [] and doc["init"]["only"] is None
    state = store.load_state(store.get_checkpoint(doc["_id"], 0))
    assert_bit_identical(network(state), dict(source_net(store, 40)))


def test_the_source_may_be_named_by_id(store):
    sid = store.get_session("src")["_id"]
    doc, _ = prepare_session(store, target_config({**PARTIAL, "from": f"{sid}@40"}), "warm")
    assert doc["init"]["source"] == {"session": sid, "name": "src", "step": 40, "kind": "final"}


@pytest.mark.parametrize("kind", ["pt", "safetensors", "wrapped"])
def test_from_a_state_dict_file_relative_to_the_config(store, tmp_path, kind):
    name = "net.safetensors" if kind == "safetensors" else "net.pt"
    export_state_dict(store, "src", 20, tmp_path / name)  # `ptutils export`'s own writer
    if kind == "wrapped":
        torch.save({"state_dict": torch.load(tmp_path / name, weights_only=True),
                    "epoch": 3}, tmp_path / name)
    init = {"from": name, "only": ["layers.4"], "rename": {"layers.4": "layers.7"}}
    doc, _ = prepare_session(store, target_config(init), "warm", base_dir=tmp_path)

    sha = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    assert doc["init"]["source"] == {"file": str(tmp_path / name), "sha256": sha}
    assert sorted(doc["init"]["loaded"]) == ["layers.7.bias", "layers.7.weight"]
    net = network(store.load_state(store.get_checkpoint(doc["_id"], 0)))
    source = source_net(store, 20)
    assert torch.equal(net["layers.7.weight"], source["layers.4.weight"])
    assert torch.equal(net["layers.1.weight"], network(cold_state(target_config()))
                       ["layers.1.weight"])


def test_rename_rules():
    src = {n: torch.zeros(1) for n in ("module.enc.0.weight", "module.enc.1.weight",
                                       "module.head")}
    tgt = {n: torch.zeros(1) for n in ("backbone.0.weight", "enc.1.weight", "out",
                                       "net.module.head")}
    spec = InitSpec.parse({"from": "x.pt", "only": ["module.enc"],
                           "rename": {"module": "", "module.enc.0": "backbone.0"}})
    assert list(select(spec, src, tgt)[0]) == ["backbone.0.weight", "enc.1.weight"]
    spec = InitSpec.parse({"from": "x.pt", "only": ["module.head"],
                           "rename": {"module.head": "out"}})
    assert select(spec, src, tgt) == ({"out": src["module.head"]},
                                      ["module.enc.0.weight", "module.enc.1.weight"])
    spec = InitSpec.parse({"from": "x.pt", "only": ["*.head"], "rename": {"": "net"}})
    assert list(select(spec, src, tgt)[0]) == ["net.module.head"]


def test_ptutils_run_reads_a_file_relative_to_the_config(store, tmp_path):
    (tmp_path / "weights").mkdir()
    export_state_dict(store, "src", 40, tmp_path / "weights" / "net.safetensors")
    cfg = target_config({"from": "weights/net.safetensors", "only": ["layers.1.*"]},
                        total_steps=20)
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    ptutils("run", str(tmp_path / "exp.yaml"), "--store", str(tmp_path / "runs"), "-q",
            "--name", "warm", check=True)  # run from the repository's root
    doc = store.get_session("warm")
    assert doc["status"] == "completed"
    assert doc["init"]["source"]["file"] == str(tmp_path / "weights" / "net.safetensors")
    assert sorted(doc["init"]["loaded"]) == ["layers.1.bias", "layers.1.weight"]


# --- the init checkpoint in the life of the session ----------------------------------
def test_retention_always_keeps_the_init_checkpoint(store):
    cfg = target_config(PARTIAL, total_steps=100, eval_every=0,
                        retention={"keep_last": 1})
    doc, session = prepare_session(store, cfg, "warm")
    assert run_session(store, doc, warm=session).status == "completed"
    kept = [(c["step"], c["kind"]) for c in store.list_checkpoints(doc["_id"])]
    assert kept == [(0, "init"), (100, "final")]
    plan = Plan.from_config({"eval_every": 0, "retention": {"keep_last": 1}})
    ckpts = [{"step": 0, "kind": "init"}, {"step": 20, "kind": "chunk"},
             {"step": 40, "kind": "chunk"}]
    assert retained_steps({"step": 40}, ckpts, plan) == {(0, "init"), (40, "chunk")}


def test_preempted_and_resumed_warm_start_is_bit_identical(store):
    """`ptutils run` (the adopted dry build) uninterrupted, against a run that loads the
    init checkpoint from the store as a worker does, stopped at step 27 and resumed."""
    cfg = target_config(PARTIAL, total_steps=60)
    doc, session = prepare_session(store, cfg, "a")
    assert run_session(store, doc, warm=session).status == "completed"

    doc, _ = prepare_session(store, cfg, "b")
    stop = threading.Event()

    def progress(sid: str, step: int, loss: float) -> None:
        if step == 27:
            stop.set()

    stopped = run_session(store, doc, progress=progress, stop_flag=stop)
    assert stopped.status == "running" and stopped.step == 27
    pause_session(store, doc["_id"])
    assert run_session(store, resume_session(store, "b")).status == "completed"

    finals = [store.get_session(n) for n in ("a", "b")]
    states = [store.load_state(store.get_checkpoint(d["_id"], 60)) for d in finals]
    assert_bit_identical(states[0], states[1])
    stats = [series(store.query_statistics(d["_id"])) for d in finals]
    assert stats[0] == stats[1]
    assert (0, "init") in {(c["step"], c["kind"]) for c in
                           store.list_checkpoints(finals[1]["_id"])}


def test_a_corrupt_first_chunk_rolls_back_to_the_init_checkpoint(store):
    """Rollback goes back to the warm start's step 0, not to a cold one: the session
    completes bit-identical to an uninterrupted run."""
    cfg = target_config(PARTIAL, total_steps=40)
    doc, session = prepare_session(store, cfg, "a")
    assert run_session(store, doc, warm=session).status == "completed"

    doc, session = prepare_session(store, cfg, "b")
    stop = threading.Event()
    run_session(store, doc, warm=session, stop_flag=stop,
                progress=lambda sid, step, loss: step == 20 and stop.set())
    assert store.get_session("b")["checkpoint"] == {"step": 20, "kind": "chunk"}
    init = set(store.get_checkpoint(doc["_id"], 0)["segments"])
    corrupt_segment(store, next(h for h in store.get_checkpoint(doc["_id"], 20)["segments"]
                                if h not in init))
    pause_session(store, doc["_id"])
    assert run_session(store, resume_session(store, "b")).status == "completed"

    b = store.get_session("b")
    (rollback,) = [e["message"] for e in b["events"] if e["kind"] == "rollback"]
    assert "step 0 (init)" in rollback
    states = [store.load_state(store.get_checkpoint(store.get_session(n)["_id"], 40))
              for n in ("a", "b")]
    assert_bit_identical(states[0], states[1])


def test_export_of_a_warm_start_before_its_first_chunk(store, tmp_path):
    doc, _ = prepare_session(store, target_config(PARTIAL), "warm")
    ckpt = export_state_dict(store, "warm", None, tmp_path / "w.pt")
    assert (ckpt["step"], ckpt["kind"]) == (0, "init")
    weights = torch.load(tmp_path / "w.pt", weights_only=True)
    assert torch.equal(weights["layers.7.bias"], source_net(store, 20)["layers.4.bias"])


def test_a_corrupt_init_checkpoint_fails_the_session_not_a_cold_start(store):
    doc, _ = prepare_session(store, target_config(PARTIAL), "warm")
    for digest in store.get_checkpoint(doc["_id"], 0)["segments"]:
        corrupt_segment(store, digest)
    with pytest.raises(TrainingFailed, match="warm start"):
        run_session(store, doc)  # no warm session: loads the init checkpoint
    assert store.get_session("warm")["status"] == "failed"


# --- bad input: a clear error, nothing stored ----------------------------------------
class Unpicklable:
    """A class torch.load(weights_only=True) refuses to rebuild."""


def _pickle_pt(tmp: Path) -> None:
    torch.save({"w": torch.zeros(2), "obj": Unpicklable()}, tmp / "evil.pt")


@pytest.mark.parametrize("init,setup,expect", [
    ({"from": "nope"}, None, "no session named (or with id) 'nope'"),
    ({"from": "src@7"}, None, "no checkpoint at step 7; its checkpoints are at steps: 20, 40"),
    ({"from": "src@x"}, None, "SESSION@STEP"),
    ({"from": "src@20"}, "corrupt", "is corrupt"),
    ({"from": "missing.pt"}, None, "no such file"),
    ({"from": "junk.pt"}, "junk", "not a readable torch file"),
    ({"from": "junk.safetensors"}, "junk", "not a readable safetensors file"),
    ({"from": "evil.pt"}, "pickle", "weights_only=True) refuses"),
    ({"from": "src", "only": ["decoder.*"]}, None, "'decoder.*' match(es) no tensor"),
    ({"from": "src", "only": ["layers.1.*"], "rename": {"enc": "x"}}, None,
     "'enc' is no prefix"),
    ({"from": "src"}, None, "layers.4.weight: shape (10, 32), the network's (32, 32)"),
    ({"from": "src", "onyl": ["x"]}, None, "unknown key `init.onyl` (did you mean `only`?)"),
    ({"only": ["x"]}, None, "init.from: required"),
], ids=["unknown-session", "unknown-step", "bad-step", "corrupt", "missing-file",
        "junk-pt", "junk-safetensors", "pickle", "only-matches-nothing", "unused-rename",
        "shape", "unknown-key", "no-from"])
def test_bad_init_is_refused_before_anything_is_stored(store, tmp_path, init, setup, expect):
    if setup == "corrupt":
        src = store.get_session("src")["_id"]
        later = set(store.get_checkpoint(src, 40)["segments"])
        bad = [h for h in store.get_checkpoint(src, 20)["segments"] if h not in later]
        corrupt_segment(store, bad[0])
    elif setup == "junk":
        (tmp_path / init["from"]).write_bytes(b"not a tensor file at all")
    elif setup == "pickle":
        _pickle_pt(tmp_path)
    with pytest.raises(ConfigError) as info:
        prepare_session(store, target_config(init), "warm", base_dir=tmp_path)
    assert expect in str(info.value)
    assert [d["name"] for d in store.find_sessions()] == ["src"]


def test_a_misfit_lists_the_offenders_and_the_networks_tensors(store):
    with pytest.raises(ConfigError) as info:
        prepare_session(store, target_config({"from": "src", "only": ["layers.4.*"]}), "w")
    message = str(info.value)
    assert "2 tensor(s) of 'src' do not fit" in message
    assert "layers.4.weight: shape (10, 32), the network's (32, 32)" in message
    assert "layers.4.bias: shape (10,), the network's (32,)" in message
    assert "the network's tensors: layers.1.weight (32, 64)" in message
    assert "layers.7.bias (10,)" in message


# --- through MongoDB and `ptutils submit` --------------------------------------------
def test_submit_stores_the_init_checkpoint_and_trains_like_run(mongo_store, redis_url,
                                                               store, tmp_path):
    """`submit` of a warm start (source session in MongoDB) trains bit-identically to
    `ptutils run` of the same config on the local store (same seeded source)."""
    from orchestrator.submit import prepare, submit
    from workers.app import make_app

    doc, session = prepare_session(mongo_store, config(), "src")
    assert run_session(mongo_store, doc, warm=session).status == "completed"
    cfg = target_config(PARTIAL, total_steps=40)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))

    (item,) = prepare(path, name="warm")
    (done,) = submit(mongo_store, make_app(redis_url), [item])

    doc = mongo_store.get_session(done.session)
    assert doc["status"] == "queued" and doc["checkpoint"] == {"step": 0, "kind": "init"}
    assert doc["init"]["loaded"] == ["layers.1.weight", "layers.7.weight", "layers.7.bias"]
    assert run_session(mongo_store, doc).status == "completed"  # a worker's path

    local, warm = prepare_session(store, cfg, "warm")
    assert run_session(store, local, warm=warm).status == "completed"
    assert_bit_identical(
        mongo_store.load_state(mongo_store.get_checkpoint(done.session, 40)),
        store.load_state(store.get_checkpoint(local["_id"], 40)))
    assert [(c["step"], c["kind"]) for c in mongo_store.list_checkpoints(done.session)
            ][0] == (0, "init")
