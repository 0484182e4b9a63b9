"""The Store contract (ptutils/store/base.py), run against every backend.

The `store` fixture yields an empty store: "local" is a LocalStore in a temp folder,
"mongo" is the `mongo_store` fixture of tests/servers.py (a real MongoDB wire server,
a fresh database per test).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from ptutils import codec
from ptutils.errors import (
    CheckpointCorrupt,
    CheckpointNotFound,
    SessionExists,
    SessionNotFound,
)
from ptutils.store.base import (
    EVENTS_KEPT,
    CheckpointKind,
    SessionStatus,
    StatPoint,
    Store,
    new_session_doc,
)
from ptutils.store.local import LocalStore
from tests.helpers import assert_bit_identical, corrupt_segment

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(each_store: Store) -> Store:
    """An empty store of each backend (tests/servers.py `each_store`)."""
    return each_store


# --- helpers ------------------------------------------------------------------------------
def make_session(store: Store, name: str = "run", **kw: Any) -> dict[str, Any]:
    created = kw.pop("created", None)
    doc = new_session_doc(name, {"model": {"type": "MLP", "width": 8}}, "cfghash", 100, **kw)
    if created is not None:
        doc["created"] = created
    return store.create_session(doc)


def sample_state(seed: int = 0) -> dict[str, Any]:
    """A State with tensors of several dtypes and nested python values."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "w": torch.randn(128, 64, generator=g),
            "b": torch.randn(64, generator=g, dtype=torch.float64),
        },
        "half": torch.randn(300, generator=g).half(),
        "bf16": torch.randn(300, generator=g).to(torch.bfloat16),
        "ints": torch.randint(-(2**62), 2**62, (200,), generator=g, dtype=torch.int64),
        "int8": torch.randint(-128, 128, (77,), generator=g, dtype=torch.int8),
        "mask": torch.rand(100, generator=g) > 0.5,
        "special": torch.tensor([math.nan, math.inf, -math.inf, -0.0, 1e-45]),
        "scalar": torch.tensor(3.5),
        "rng": torch.get_rng_state(),
        "step": 7 + seed,
        "lr": 0.1,
        "name": "run",
        "none": None,
        "flags": [True, False],
        "nested": {"a": [1, 2.5, "x", None, {"deep": -3}], "empty": {}},
    }


def big_state(fill: dict[str, float]) -> dict[str, Any]:
    """Tensors large enough to be separate segments, one per entry of `fill`."""
    return {name: torch.full((65536,), value) for name, value in fill.items()}


def assert_same(a: Any, b: Any, path: str = "state") -> None:
    """Bit-exact equality of nested States (NaN payloads and -0.0 included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert torch.equal(_bits(a), _bits(b)), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and a == b, path


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def segment_hashes(state: Any) -> set[str]:
    return {s.hash for s in codec.encode(state).segments}


# --- sessions -----------------------------------------------------------------------------
def test_create_and_get_by_id_and_name(store: Store) -> None:
    doc = make_session(store, "alpha", tags=["a", "b"], sweep="sw1", meta={"k": [1, 2]})
    for ref in (doc["_id"], "alpha"):
        got = store.get_session(ref)
        assert got["_id"] == doc["_id"]
        assert got["name"] == "alpha"
        assert got["config"] == {"model": {"type": "MLP", "width": 8}}
        assert got["status"] == "queued" and got["step"] == 0 and got["lease"] is None
        assert got["tags"] == ["a", "b"] and got["sweep"] == "sw1" and got["meta"] == {"k": [1, 2]}


def test_duplicate_name_raises_session_exists(store: Store) -> None:
    make_session(store, "dup")
    with pytest.raises(SessionExists, match="dup"):
        make_session(store, "dup")
    assert len(store.find_sessions()) == 1


def test_unknown_session_raises_not_found(store: Store) -> None:
    make_session(store, "present")
    with pytest.raises(SessionNotFound, match="absent"):
        store.get_session("absent")


def test_find_sessions_filters_and_orders_oldest_first(store: Store) -> None:
    a = make_session(store, "a", tags=["x"], sweep="s", created=1000.0)
    c = make_session(store, "c", tags=["x", "y"], created=3000.0, status=SessionStatus.RUNNING)
    b = make_session(store, "b", tags=["y"], sweep="s", created=2000.0)
    store.cas_session(b["_id"], {}, {"status": "failed"})
    names = lambda docs: [d["name"] for d in docs]  # noqa: E731
    assert names(store.find_sessions()) == ["a", "b", "c"]
    assert names(store.find_sessions(status="queued")) == ["a"]
    assert names(store.find_sessions(status=SessionStatus.RUNNING)) == ["c"]
    assert names(store.find_sessions(status=["failed", "running"])) == ["b", "c"]
    assert names(store.find_sessions(sweep="s")) == ["a", "b"]
    assert names(store.find_sessions(tag="x")) == ["a", "c"]
    assert names(store.find_sessions(tag="y", sweep="s")) == ["b"]
    assert store.find_sessions(tag="nope") == []
    assert {a["_id"], b["_id"], c["_id"]} == {d["_id"] for d in store.find_sessions()}


# --- compare-and-set ------------------------------------------------------------------------
def test_cas_applies_update_when_expectations_match(store: Store) -> None:
    doc = make_session(store)
    new = store.cas_session(
        doc["_id"], {"step": 0, "token": doc["token"]}, {"step": 10, "token": "t2", "attempts": 1}
    )
    assert new is not None and (new["step"], new["token"], new["attempts"]) == (10, "t2", 1)
    assert new["updated"] >= doc["updated"]
    got = store.get_session(doc["_id"])
    assert (got["step"], got["token"], got["attempts"]) == (10, "t2", 1)
    assert got["name"] == doc["name"] and got["config"] == doc["config"]


def test_cas_with_stale_token_or_step_changes_nothing(store: Store) -> None:
    doc = make_session(store)
    assert store.cas_session(doc["_id"], {"token": doc["token"]}, {"token": "fresh"}) is not None
    assert store.cas_session(doc["_id"], {"step": 0, "token": doc["token"]}, {"step": 5}) is None
    assert store.cas_session(doc["_id"], {"step": 3, "token": "fresh"}, {"step": 5}) is None
    got = store.get_session(doc["_id"])
    assert (got["step"], got["token"]) == (0, "fresh")


def test_cas_dotted_lease_fields(store: Store) -> None:
    doc = make_session(store)
    sid = doc["_id"]
    # No lease: lease.worker compares as None.
    assert store.cas_session(sid, {"lease.worker": "w1"}, {"step": 1}) is None
    assert store.cas_session(sid, {"lease.worker": None}, {"step": 1}) is not None
    store.cas_session(sid, {}, {"lease": {"worker": "w1", "expires": 50.0}})
    assert store.cas_session(sid, {"lease.worker": "w2"}, {"lease.expires": 99.0}) is None
    new = store.cas_session(sid, {"lease.worker": "w1"}, {"lease.expires": 99.0})
    assert new is not None and new["lease"] == {"worker": "w1", "expires": 99.0}
    assert store.get_session(sid)["lease"] == {"worker": "w1", "expires": 99.0}
    # A field the document does not have compares as None.
    assert store.cas_session(sid, {"no_such_field": None}, {"step": 2}) is not None
    assert store.cas_session(sid, {"no_such_field": 1}, {"step": 3}) is None
    assert store.get_session(sid)["step"] == 2


def test_cas_on_unknown_session_returns_none(store: Store) -> None:
    assert store.cas_session("0" * 32, {}, {"step": 1}) is None


# --- leases -------------------------------------------------------------------------------
def test_an_expired_lease_that_lists_devices_can_be_taken_over(store: Store) -> None:
    """A running group's lease carries `devices`; once expired, another worker takes it."""
    doc = store.create_session(new_session_doc("devs", {}, "h", 10))
    sid, tok = doc["_id"], doc["token"]
    assert store.acquire_lease(sid, tok, "w1", ttl=10, now=100.0) is not None
    assert store.cas_session(sid, {"lease.worker": "w1"}, {"lease.devices": ["0", "1"]})
    assert store.acquire_lease(sid, tok, "w2", ttl=10, now=105.0) is None
    taken = store.acquire_lease(sid, tok, "w2", ttl=10, now=111.0)
    assert taken is not None and taken["lease"] == {"worker": "w2", "expires": 121.0}


def test_lease_acquire_refuse_expire_and_reacquire(store: Store) -> None:
    doc = make_session(store)
    sid, tok = doc["_id"], doc["token"]
    got = store.acquire_lease(sid, tok, "w1", ttl=10, now=100.0)
    assert got is not None and got["lease"] == {"worker": "w1", "expires": 110.0}
    assert store.acquire_lease(sid, tok, "w2", ttl=10, now=105.0) is None
    assert store.get_session(sid)["lease"]["worker"] == "w1"
    # The holder may take it again (redelivery to the same worker) and extend it.
    again = store.acquire_lease(sid, tok, "w1", ttl=10, now=106.0)
    assert again is not None and again["lease"]["expires"] == 116.0
    # Expired: another worker takes over.
    taken = store.acquire_lease(sid, tok, "w2", ttl=10, now=117.0)
    assert taken is not None and taken["lease"] == {"worker": "w2", "expires": 127.0}


def test_lease_sets_its_extra_fields_only_when_taken(store: Store) -> None:
    """A Train task takes the lease and counts its attempt in one compare-and-set."""
    doc = make_session(store)
    sid, tok = doc["_id"], doc["token"]
    got = store.acquire_lease(sid, tok, "w1", ttl=10, now=100.0,
                              also={"attempts": 1, "status": "running"})
    assert got is not None and (got["attempts"], got["status"]) == (1, "running")
    assert got["lease"] == {"worker": "w1", "expires": 110.0}
    refused = store.acquire_lease(sid, tok, "w2", ttl=10, now=105.0,
                                  also={"attempts": 2, "status": "failed"})
    assert refused is None
    kept = store.get_session(sid)
    assert (kept["attempts"], kept["status"], kept["lease"]["worker"]) == (1, "running", "w1")


def test_lease_needs_the_current_token(store: Store) -> None:
    doc = make_session(store)
    assert store.acquire_lease(doc["_id"], "stale-token", "w1", ttl=10, now=0.0) is None
    assert store.get_session(doc["_id"])["lease"] is None


def test_lease_renew_and_release_only_by_holder(store: Store) -> None:
    doc = make_session(store)
    sid = doc["_id"]
    assert not store.renew_lease(sid, "w1", ttl=10, now=0.0)  # nobody holds it
    store.acquire_lease(sid, doc["token"], "w1", ttl=10, now=0.0)
    assert not store.renew_lease(sid, "w2", ttl=10, now=5.0)
    assert store.renew_lease(sid, "w1", ttl=10, now=5.0)
    assert store.get_session(sid)["lease"] == {"worker": "w1", "expires": 15.0}
    assert store.acquire_lease(sid, doc["token"], "w2", ttl=10, now=12.0) is None  # renewed
    assert not store.release_lease(sid, "w2")
    assert store.get_session(sid)["lease"]["worker"] == "w1"
    assert store.release_lease(sid, "w1")
    assert store.get_session(sid)["lease"] is None
    assert not store.release_lease(sid, "w1")
    assert store.acquire_lease(sid, doc["token"], "w2", ttl=10, now=13.0) is not None


# --- checkpoints --------------------------------------------------------------------------
def test_checkpoint_round_trip_is_bit_exact(store: Store) -> None:
    sid = make_session(store)["_id"]
    state = sample_state()
    ckpt = store.put_checkpoint(sid, 10, CheckpointKind.CHUNK, state, metrics={"loss": 0.25})
    assert (ckpt["session"], ckpt["step"], ckpt["kind"]) == (sid, 10, "chunk")
    assert ckpt["size"] == sum(s.nbytes for s in codec.encode(state).segments)
    assert ckpt["bytes_written"] == ckpt["size"]
    assert_same(state, store.load_state(ckpt))
    got = store.get_checkpoint(sid, 10, "chunk")
    assert got["metrics"] == {"loss": 0.25}
    assert_same(state, store.load_state(got))


def test_get_latest_by_step_and_kind_and_list(store: Store) -> None:
    sid = make_session(store)["_id"]
    other = make_session(store, "other")["_id"]
    states = {
        (s, k): {"step": s, "kind": k}
        for s, k in [(5, "chunk"), (10, "chunk"), (10, "best"), (15, "preempt")]
    }
    for (step, kind), state in states.items():
        store.put_checkpoint(sid, step, kind, state)
    store.put_checkpoint(other, 99, "chunk", {"x": 1})
    assert [(c["step"], c["kind"]) for c in store.list_checkpoints(sid)] == [
        (5, "chunk"),
        (10, "best"),
        (10, "chunk"),
        (15, "preempt"),
    ]
    latest = store.get_checkpoint(sid)
    assert (latest["step"], latest["kind"]) == (15, "preempt")
    assert store.get_checkpoint(sid, kind="chunk")["step"] == 10
    assert store.load_state(store.get_checkpoint(sid, 10, "best")) == {"step": 10, "kind": "best"}
    assert store.get_checkpoint(sid, 5)["kind"] == "chunk"
    for ckpt in store.list_checkpoints(sid):
        assert store.load_state(ckpt) == states[(ckpt["step"], ckpt["kind"])]
    with pytest.raises(CheckpointNotFound):
        store.get_checkpoint(sid, 7)
    with pytest.raises(CheckpointNotFound):
        store.get_checkpoint(sid, 15, "final")
    with pytest.raises(CheckpointNotFound):
        store.get_checkpoint(make_session(store, "empty")["_id"])


def test_same_step_and_kind_replaces(store: Store) -> None:
    sid = make_session(store)["_id"]
    store.put_checkpoint(sid, 10, "chunk", sample_state(0), metrics={"loss": 1.0})
    second = sample_state(1)
    store.put_checkpoint(sid, 10, "chunk", second, metrics={"loss": 0.5})
    ckpts = store.list_checkpoints(sid)
    assert [(c["step"], c["kind"]) for c in ckpts] == [(10, "chunk")]
    assert ckpts[0]["metrics"] == {"loss": 0.5}
    assert_same(second, store.load_state(store.get_checkpoint(sid, 10, "chunk")))


def test_update_checkpoint_sets_metrics(store: Store) -> None:
    sid = make_session(store)["_id"]
    store.put_checkpoint(sid, 4, "chunk", {"x": 1}, metrics={"loss": 2.0})
    store.update_checkpoint(sid, 4, "chunk", {"metrics": {"loss": 2.0, "acc": 0.75}})
    assert store.get_checkpoint(sid, 4, "chunk")["metrics"] == {"loss": 2.0, "acc": 0.75}
    with pytest.raises(CheckpointNotFound):
        store.update_checkpoint(sid, 5, "chunk", {"metrics": {}})


def test_unchanged_segments_are_not_written_again(store: Store) -> None:
    sid = make_session(store)["_id"]
    fill = {"frozen": 1.0, "head": 2.0, "emb": 3.0}
    first = store.put_checkpoint(sid, 1, "chunk", big_state(fill))
    assert first["bytes_written"] == first["size"] >= 3 * 65536 * 4
    same = store.put_checkpoint(sid, 2, "chunk", big_state(fill))
    assert same["bytes_written"] == 0 and same["size"] == first["size"]
    changed = store.put_checkpoint(sid, 3, "chunk", big_state({**fill, "head": 5.0}))
    assert changed["bytes_written"] == 65536 * 4
    assert_same(big_state({**fill, "head": 5.0}), store.load_state(changed))
    assert_same(big_state(fill), store.load_state(store.get_checkpoint(sid, 1, "chunk")))


def test_corrupt_segment_is_named_and_latest_falls_back(store: Store) -> None:
    sid = make_session(store)["_id"]
    old, new = big_state({"a": 1.0, "b": 2.0}), big_state({"a": 1.0, "b": 9.0})
    store.put_checkpoint(sid, 10, "chunk", old)
    ckpt = store.put_checkpoint(sid, 20, "chunk", new)
    (bad,) = segment_hashes(new) - segment_hashes(old)
    corrupt_segment(store, bad)
    with pytest.raises(CheckpointCorrupt) as info:
        store.load_state(ckpt)
    assert bad in str(info.value) and sid in str(info.value) and "20" in str(info.value)
    found = store.load_latest_state(sid)
    assert found is not None
    assert found[0]["step"] == 10
    assert_same(old, found[1])
    assert store.load_latest_state(sid, max_step=5) is None
    # Nothing decodes: the error is raised, not swallowed.
    (shared,) = segment_hashes(old) & segment_hashes(new)
    corrupt_segment(store, shared)
    with pytest.raises(CheckpointCorrupt):
        store.load_latest_state(sid)


def test_delete_checkpoint_is_idempotent_and_keeps_shared_segments(store: Store) -> None:
    sid = make_session(store)["_id"]
    one = big_state({"shared": 1.0, "only_one": 2.0})
    two = big_state({"shared": 1.0, "only_two": 3.0})
    store.put_checkpoint(sid, 1, "chunk", one)
    store.put_checkpoint(sid, 2, "chunk", two)
    store.delete_checkpoint(sid, 1, "chunk")
    store.delete_checkpoint(sid, 1, "chunk")  # already gone: success
    store.delete_checkpoint(sid, 99, "best")  # never existed: success
    assert [c["step"] for c in store.list_checkpoints(sid)] == [2]
    with pytest.raises(CheckpointNotFound):
        store.get_checkpoint(sid, 1, "chunk")
    assert_same(two, store.load_state(store.get_checkpoint(sid, 2, "chunk")))
    # The unshared segment of checkpoint 1 is gone, the shared one is still there.
    again = store.put_checkpoint(sid, 3, "chunk", one)
    assert again["bytes_written"] == 65536 * 4
    store.delete_checkpoint(sid, 2, "chunk")
    store.delete_checkpoint(sid, 3, "chunk")
    assert store.list_checkpoints(sid) == []
    fresh = store.put_checkpoint(sid, 4, "chunk", two)
    assert fresh["bytes_written"] == fresh["size"]


def test_delete_session_removes_everything_it_alone_uses(store: Store) -> None:
    doc = make_session(store)
    keep = make_session(store, "keep")
    shared = big_state({"shared": 1.0, "own": 2.0})
    store.put_checkpoint(doc["_id"], 1, "chunk", shared)
    store.put_checkpoint(keep["_id"], 1, "chunk", big_state({"shared": 1.0}))
    store.write_statistics(doc["_id"], [StatPoint("train", 1, "loss", 1.0)])
    store.write_statistics(keep["_id"], [StatPoint("train", 1, "loss", 2.0)])
    store.delete_session(doc["_id"])
    with pytest.raises(SessionNotFound):
        store.get_session(doc["_id"])
    assert store.list_checkpoints(doc["_id"]) == []
    assert store.query_statistics(doc["_id"]) == []
    assert [p["value"] for p in store.query_statistics(keep["_id"])] == [2.0]
    assert_same(big_state({"shared": 1.0}), store.load_state(store.get_checkpoint(keep["_id"])))
    again = store.put_checkpoint(keep["_id"], 2, "chunk", shared)
    assert again["bytes_written"] == 65536 * 4  # "own" was deleted, "shared" kept
    make_session(store, doc["name"])  # the name is free again


# --- statistics ---------------------------------------------------------------------------
def test_statistics_upsert_is_idempotent(store: Store) -> None:
    sid = make_session(store)["_id"]
    points = [StatPoint("train", s, "loss", 1.0 / s, time=100.0 + s) for s in range(1, 6)]
    assert store.write_statistics(sid, points) == 5
    assert store.write_statistics(sid, points) == 5
    assert len(store.query_statistics(sid)) == 5
    store.write_statistics(sid, [StatPoint("train", 3, "loss", 42.0, time=500.0)])
    got = store.query_statistics(sid, name="loss")
    assert [(p["step"], p["value"]) for p in got] == [
        (1, 1.0),
        (2, 0.5),
        (3, 42.0),
        (4, 0.25),
        (5, 0.2),
    ]
    p3 = got[2]
    assert (p3["session"], p3["phase"], p3["name"], p3["time"]) == (sid, "train", "loss", 500.0)
    assert store.write_statistics(sid, []) == 0


def test_a_large_batch_is_written_whole_and_a_repeated_point_keeps_its_last_value(
    store: Store,
) -> None:
    """A chunk's statistics go in one call: hundreds of points (several multi-row INSERTs
    in the local store), a point repeated in the same call keeps the value given last."""
    sid = make_session(store)["_id"]
    points = [StatPoint("train", s, "loss", float(s), time=1.0) for s in range(1, 601)]
    points += [StatPoint("train", s, "lr", 0.1, time=1.0) for s in range(10, 601, 10)]
    points.append(StatPoint("train", 7, "loss", -7.0, time=2.0))  # across the batch
    store.write_statistics(sid, points)
    loss = store.query_statistics(sid, name="loss")
    assert [p["step"] for p in loss] == list(range(1, 601))
    assert [p["value"] for p in loss if p["step"] in (6, 7, 8)] == [6.0, -7.0, 8.0]
    assert len(store.query_statistics(sid, name="lr")) == 60


def test_delete_statistics_after_step(store: Store) -> None:
    sid, other = make_session(store)["_id"], make_session(store, "other")["_id"]
    store.write_statistics(
        sid, [StatPoint(ph, s, "loss", s) for s in range(10) for ph in ("train", "eval")]
    )
    store.write_statistics(other, [StatPoint("train", s, "loss", s) for s in range(10)])
    assert store.delete_statistics(sid, after_step=6) == 6
    assert max(p["step"] for p in store.query_statistics(sid)) == 6
    assert len(store.query_statistics(sid)) == 14
    assert len(store.query_statistics(other)) == 10
    assert store.delete_statistics(sid, after_step=6) == 0


def test_query_statistics_filters(store: Store) -> None:
    a, b, c = (make_session(store, n)["_id"] for n in ("a", "b", "c"))
    for sid in (a, b, c):
        store.write_statistics(
            sid,
            [
                StatPoint(phase, step, name, float(step))
                for step in range(0, 50, 10)
                for phase in ("train", "eval")
                for name in ("loss", "acc")
            ],
        )
    rows = store.query_statistics(a, name="acc", phase="eval", step_min=10, step_max=30)
    assert [(r["session"], r["phase"], r["name"], r["step"]) for r in rows] == [
        (a, "eval", "acc", 10),
        (a, "eval", "acc", 20),
        (a, "eval", "acc", 30),
    ]
    both = store.query_statistics([a, c], name="loss", phase="train")
    assert [(r["session"], r["step"]) for r in both] == sorted(
        (s, st) for s in (a, c) for st in range(0, 50, 10)
    )
    assert len(store.query_statistics(name="loss", step_max=0)) == 6
    assert len(store.query_statistics()) == 3 * 5 * 2 * 2
    ordered = store.query_statistics(b, phase="train")
    assert [(r["step"], r["name"]) for r in ordered] == sorted(
        (r["step"], r["name"]) for r in ordered
    )


def test_non_finite_statistics_survive(store: Store) -> None:
    sid = make_session(store)["_id"]
    store.write_statistics(
        sid,
        [
            StatPoint("train", 1, "nan", math.nan),
            StatPoint("train", 1, "inf", math.inf),
            StatPoint("train", 1, "ninf", -math.inf),
            StatPoint("train", 1, "zero", -0.0),
            StatPoint("train", 1, "int", 3),
        ],
    )
    got = {p["name"]: p["value"] for p in store.query_statistics(sid)}
    assert math.isnan(got["nan"]) and isinstance(got["nan"], float)
    assert got["inf"] == math.inf and got["ninf"] == -math.inf
    assert got["zero"] == 0.0 and got["int"] == 3.0


# --- several processes --------------------------------------------------------------------
RACE_CHILD = textwrap.dedent("""
    import json, sys
    from ptutils.store import open_store
    url, sid, token, worker, rounds = sys.argv[1:]
    store = open_store(url)
    print("ready", flush=True)
    sys.stdin.readline()
    lease = store.acquire_lease(sid, token, worker, 60.0, now=1000.0) is not None
    wins = 0
    for _ in range(int(rounds)):
        n = store.get_session(sid)["attempts"]
        if store.cas_session(sid, {"attempts": n}, {"attempts": n + 1}) is not None:
            wins += 1
    print(json.dumps([lease, wins]), flush=True)
    store.close()
""")


def run_racers(store: Store, sid: str, token: str, procs: int, rounds: int) -> list[list[Any]]:
    """Start `procs` processes on the same store, release them together, collect results."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", RACE_CHILD, store.url, sid, token, f"w{i}", str(rounds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(procs)
    ]
    try:
        for child in children:
            assert child.stdout.readline().strip() == "ready"
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        results = []
        for child in children:
            out, _ = child.communicate(timeout=120)
            assert child.returncode == 0
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


def test_cas_and_leases_are_atomic_across_processes(store: Store) -> None:
    """4 processes race for the lease, then CAS-increment a counter 100 times each."""
    doc = make_session(store)
    results = run_racers(store, doc["_id"], doc["token"], procs=4, rounds=100)
    leases = [lease for lease, _ in results]
    assert sum(leases) == 1
    assert store.get_session(doc["_id"])["lease"] == {
        "worker": f"w{leases.index(True)}",
        "expires": 1060.0,
    }
    wins = sum(w for _, w in results)
    assert store.get_session(doc["_id"])["attempts"] == wins  # no increment lost or doubled
    # A failed attempt means another process won in between, and one win can defeat at
    # most one pending attempt per other process: at least 400 / 4 wins.
    assert wins >= 100


# --- corrupt checkpoints, events, housekeeping --------------------------------------------
def test_mark_corrupt_flags_it_drops_the_rotten_segment_and_a_rewrite_heals(store: Store) -> None:
    sid = make_session(store)["_id"]
    old, new = big_state({"a": 1.0, "b": 2.0}), big_state({"a": 1.0, "b": 9.0})
    store.put_checkpoint(sid, 10, "chunk", old)
    ckpt = store.put_checkpoint(sid, 20, "chunk", new)
    (bad,) = segment_hashes(new) - segment_hashes(old)
    corrupt_segment(store, bad)
    assert store.bad_segments(ckpt) == [bad]
    assert store.checkpoint_problem(store.get_checkpoint(sid, 10)) is None
    assert bad in str(store.checkpoint_problem(ckpt))

    assert store.mark_corrupt(ckpt, "fails its checksum") == [bad]

    flagged = {c["step"]: c.get("corrupt") for c in store.list_checkpoints(sid)}
    assert flagged[10] is None
    assert flagged[20]["reason"] == "fails its checksum" and flagged[20]["segments"] == [bad]
    assert "marked corrupt" in str(store.checkpoint_problem(store.get_checkpoint(sid, 20)))
    found = store.load_latest_state(sid)
    assert found is not None and found[0]["step"] == 10
    # The same State written again stores the dropped segment afresh, unflagged.
    again = store.put_checkpoint(sid, 20, "chunk", new)
    assert again["bytes_written"] == 65536 * 4
    assert not store.get_checkpoint(sid, 20).get("corrupt")
    assert_same(new, store.load_state(store.get_checkpoint(sid, 20)))
    assert_same(old, store.load_state(store.get_checkpoint(sid, 10)))


def test_add_event_appends_and_keeps_the_last_hundred(store: Store) -> None:
    sid = make_session(store)["_id"]
    assert store.get_session(sid)["events"] == []
    for i in range(EVENTS_KEPT + 5):
        store.add_event(sid, "note", f"event {i}")
    events = store.get_session(sid)["events"]
    assert len(events) == EVENTS_KEPT
    assert [e["message"] for e in events[:2]] == ["event 5", "event 6"]
    assert events[-1]["kind"] == "note" and events[-1]["message"] == f"event {EVENTS_KEPT + 4}"
    assert abs(events[-1]["time"] - store.now()) < 60
    assert store.add_event("0" * 32, "note", "nobody") is None


def test_claim_periodic_lets_one_caller_in_per_period(store: Store) -> None:
    assert store.claim_periodic("gc", 100.0, now=1000.0)
    assert not store.claim_periodic("gc", 100.0, now=1000.0)
    assert not store.claim_periodic("gc", 100.0, now=1099.0)
    assert store.claim_periodic("other", 100.0, now=1050.0)
    assert store.claim_periodic("gc", 100.0, now=1100.0)
    assert not store.claim_periodic("gc", 100.0, now=1150.0)


def test_gc_drops_checkpoints_beyond_the_step_after_the_grace_only(store: Store) -> None:
    """A fenced-out chunk (running, then cancelled) left a checkpoint beyond its session's
    committed step: young, it may be a chunk about to commit and stays; old, it goes,
    with the segments only it used. Running GC again removes nothing more."""
    from ptutils.retention import collect_garbage

    doc = make_session(store)
    sid = doc["_id"]
    store.cas_session(sid, {}, {"step": 10, "status": "cancelled"})
    committed = big_state({"shared": 1.0, "head": 2.0})
    stray = big_state({"shared": 1.0, "head": 3.0})
    store.put_checkpoint(sid, 10, "chunk", committed)
    store.put_checkpoint(sid, 20, "chunk", stray)

    assert collect_garbage(store).checkpoints == 0  # default grace: an hour
    assert [c["step"] for c in store.list_checkpoints(sid)] == [10, 20]
    assert collect_garbage(store, older_than=0.0).checkpoints == 1
    assert [c["step"] for c in store.list_checkpoints(sid)] == [10]
    assert collect_garbage(store, older_than=0.0).checkpoints == 0
    assert_same(committed, store.load_state(store.get_checkpoint(sid, 10)))
    again = store.put_checkpoint(sid, 30, "chunk", stray)
    assert again["bytes_written"] == 65536 * 4  # "head" of the stray one was deleted


def test_gc_beside_a_running_writer_never_breaks_a_checkpoint(store: Store) -> None:
    """A writer commits checkpoints (each sharing one segment, each with its own) and
    drops the old ones, while garbage collection runs in a loop with a 1 s grace."""
    from ptutils.retention import collect_garbage

    sid = make_session(store)["_id"]
    errors: list[BaseException] = []
    done = threading.Event()

    def writer() -> None:
        try:
            for step in range(1, 16):
                store.put_checkpoint(sid, step, "chunk", big_state({"shared": 1.0, "own": step}))
                assert store.cas_session(sid, {"step": step - 1}, {"step": step}) is not None
                if step > 2:
                    store.delete_checkpoint(sid, step - 2, "chunk")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    runs = 0
    while not done.is_set():
        collect_garbage(store, older_than=1.0)
        runs += 1
    thread.join()
    collect_garbage(store, older_than=1.0)
    assert errors == [] and runs > 0
    assert [c["step"] for c in store.list_checkpoints(sid)] == [14, 15]
    for ckpt in store.list_checkpoints(sid):
        assert store.checkpoint_problem(ckpt) is None
        assert_same(big_state({"shared": 1.0, "own": ckpt["step"]}), store.load_state(ckpt))


def stored_document_bytes(store: Store, sid: str, step: int) -> int:
    """Size of the checkpoint document as the backend stores it (BSON / the SQLite row)."""
    if isinstance(store, LocalStore):
        import sqlite3

        with sqlite3.connect(store.root / "ptutils.db") as conn:
            (size,) = conn.execute(
                "SELECT length(manifest) + length(checksum) + length(segments) + "
                "length(metrics) + length(extra) + 64 FROM checkpoints "
                "WHERE session = ? AND step = ?", (sid, step)).fetchone()  # fmt: skip
        return int(size)
    import bson

    return len(bson.encode(store.db["checkpoints"].find_one({"session": sid, "step": step})))


@pytest.fixture(scope="module")
def million_step_state() -> Any:
    """The State of the shared digits session after a synthetic 1M-step history: a loss
    and a learning rate at every step, as `log_every: 1` records them."""
    from ptutils.session import Session
    from tests.helpers import digits_config

    session = Session.create(digits_config(imports=[], callbacks=[]))
    history = session.history
    for step in range(1, 1_000_001):
        history.add("loss", 1.0 / step, step)
        history.add("lr", 0.003, step)
    session.step = 1_000_000
    return session.state_dict()


def test_a_million_step_history_keeps_the_checkpoint_document_under_1mb(
    store: Store, million_step_state: Any
) -> None:
    from ptutils.state import HISTORY_WINDOW

    state = million_step_state
    manifest = codec.encode(state).manifest  # the State's non-tensor part (and layout)
    assert len(manifest) < 1 << 20
    loss = state["history"]["train/loss"]
    assert len(loss["steps"]) == HISTORY_WINDOW and loss["steps"][-1] == 1_000_000
    sid = make_session(store)["_id"]
    store.put_checkpoint(sid, 1_000_000, "chunk", state, metrics={"loss": 1e-6})
    assert stored_document_bytes(store, sid, 1_000_000) < 1 << 20
    assert_bit_identical(state, store.load_state(store.get_checkpoint(sid, 1_000_000)))


def test_documents_compare_and_set_on_their_version(store: Store) -> None:
    """A search's state: created once, then each update expects the version it read, so of
    two drivers that read the same version only one writes."""
    assert store.get_document("search", "s1") is None
    first = store.put_document("search", "s1", {"asks": [[0, {"lr": 0.1}]]}, version=None)
    assert first == {"version": 1, "body": {"asks": [[0, {"lr": 0.1}]]}}
    assert store.put_document("search", "s1", {"asks": []}, version=None) is None
    second = store.put_document("search", "s1", {"asks": [], "n": 2}, version=1)
    assert second is not None and second["version"] == 2
    assert store.put_document("search", "s1", {"lost": True}, version=1) is None
    assert store.get_document("search", "s1") == {"version": 2, "body": {"asks": [], "n": 2}}
    store.put_document("search", "s0", {}, version=None)
    store.put_document("other", "s9", {}, version=None)
    assert store.list_documents("search") == ["s0", "s1"]
    store.delete_document("search", "s1")
    store.delete_document("search", "s1")
    assert store.get_document("search", "s1") is None
    assert store.list_documents("search") == ["s0"]
