"""MongoStore against a real MongoDB wire server (nx-27017 unless PTUTILS_TEST_MONGO_URI).

The backend-independent contract is in test_store_contract.py; this file covers what is
specific to MongoDB and GridFS: streaming round trips, dedup, crash leftovers, racing
writers and deleters, retries across a server restart, and credentials in errors.
"""

from __future__ import annotations

import io
import logging
import math
import threading
import time
import traceback
from typing import Any

import gridfs
import pytest
import torch
from pymongo.errors import AutoReconnect, DuplicateKeyError, OperationFailure

from ptutils import codec
from ptutils.errors import CheckpointCorrupt, StoreError, StoreUnavailable
from ptutils.store.base import StatPoint, new_session_doc
from ptutils.store.mongo import MongoStore, _db_name, is_transient, redact_url
from ptutils.store.mongo_retry import is_redacted
from ptutils.store.mongo_stats import BUCKET_STEPS
from tests.servers import free_port, uri_with_db


def new_session(store: MongoStore, name: str = "run") -> str:
    return store.create_session(new_session_doc(name, {"m": 1}, "h", 100))["_id"]


def tensors(n: int, numel: int, seed: int) -> dict[str, torch.Tensor]:
    """`n` float32 tensors of `numel` elements, each its own segment."""
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(numel, generator=g) for i in range(n)}


def assert_bit_exact(expected: Any, got: Any) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == expected.dtype
        assert got.shape == expected.shape
        flat = expected.reshape(-1).view(torch.uint8)
        assert torch.equal(flat, got.reshape(-1).view(torch.uint8))
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys()
        for key in expected:
            assert_bit_exact(expected[key], got[key])
    else:
        assert got == expected


def stored_points(store: MongoStore, sid: str) -> dict[tuple[str, str, int], Any]:
    """Every point kept in the session's bucket documents: (phase, name, step) -> pair.

    Fails if a step sits in the wrong bucket or two documents hold the same bucket.
    """
    found: dict[tuple[str, str, int], Any] = {}
    seen = set()
    for doc in store.db["statistics"].find({"session": sid}):
        key = (doc["phase"], doc["name"], doc["bucket"])
        assert key not in seen, f"bucket {key} stored twice"
        seen.add(key)
        for step, pair in (doc.get("points") or {}).items():
            assert int(step) // BUCKET_STEPS == doc["bucket"], (step, doc["bucket"])
            found[(doc["phase"], doc["name"], int(step))] = pair
    return found


def files_of(store: MongoStore) -> dict[str, int]:
    """GridFS files of the store's bucket: hash -> length."""
    return {f["_id"]: f["length"] for f in store.db[f"{store.bucket_name}.files"].find()}


def rewrite_segment(store: MongoStore, digest: str, data: bytes) -> None:
    """Replace a stored segment's bytes (bit rot, or a buggy writer), keeping its name."""
    bucket = gridfs.GridFSBucket(store.db, bucket_name=store.bucket_name)
    bucket.delete(digest)
    bucket.upload_from_stream_with_id(digest, digest, io.BytesIO(data))


# --- GridFS round trip and dedup ---------------------------------------------------------
def test_round_trip_40mb_is_bit_exact_and_split_in_segments(mongo_store: MongoStore) -> None:
    sid = new_session(mongo_store)
    state = {
        "big": torch.arange(9_500_000, dtype=torch.float32) * 1.5,  # 38 MB: two segments
        "half": torch.randn(1_000_000).half(),
        "ints": torch.randint(-(2**62), 2**62, (100_000,), dtype=torch.int64),
        "special": torch.tensor([float("nan"), float("inf"), -0.0]),
        "meta": {"step": 7, "name": "x"},
    }
    ckpt = mongo_store.put_checkpoint(sid, 10, "chunk", state, metrics={"loss": float("nan")})
    assert ckpt["size"] == ckpt["bytes_written"] > 40_000_000
    assert max(files_of(mongo_store).values()) <= codec.MAX_SEGMENT
    assert len(files_of(mongo_store)) == len(ckpt["segments"]) == 5
    got = mongo_store.get_checkpoint(sid, 10, "chunk")
    assert got["metrics"]["loss"] != got["metrics"]["loss"]  # NaN metric survives
    assert_bit_exact(state, mongo_store.load_state(got))
    # Plain GridFS files: any driver reads a segment back.
    bucket = gridfs.GridFSBucket(mongo_store.db, bucket_name=mongo_store.bucket_name)
    first = bucket.open_download_stream(got["segments"][0]).read()
    assert first == state["big"].numpy().tobytes()[: codec.MAX_SEGMENT]


def test_second_checkpoint_with_90_percent_unchanged_writes_under_20_percent(
    mongo_store: MongoStore,
) -> None:
    sid = new_session(mongo_store)
    state = tensors(10, 250_000, seed=0)
    first = mongo_store.put_checkpoint(sid, 1, "chunk", state)
    state["t3"] = state["t3"] + 1.0  # one tensor of ten trained, nine frozen
    second = mongo_store.put_checkpoint(sid, 2, "chunk", state)
    assert first["bytes_written"] == first["size"]
    assert second["bytes_written"] <= 0.2 * second["size"]
    assert second["bytes_written"] == 250_000 * 4
    assert len(files_of(mongo_store)) == 11
    assert_bit_exact(state, mongo_store.load_state(second))


# --- corruption and leftovers ------------------------------------------------------------
def test_corrupt_or_missing_segment_raises_checkpoint_corrupt_naming_it(
    mongo_store: MongoStore,
) -> None:
    sid = new_session(mongo_store)
    state = tensors(2, 100_000, seed=1)
    ckpt = mongo_store.put_checkpoint(sid, 30, "chunk", state)
    bad, gone = ckpt["segments"]
    flipped = bytearray(state["t0"].numpy().tobytes())
    flipped[1234] ^= 0x01
    rewrite_segment(mongo_store, bad, bytes(flipped))
    with pytest.raises(CheckpointCorrupt) as info:
        mongo_store.load_state(ckpt)
    assert bad in str(info.value) and sid in str(info.value) and "30" in str(info.value)
    rewrite_segment(mongo_store, bad, state["t0"].numpy().tobytes())  # repaired
    gridfs.GridFSBucket(mongo_store.db, bucket_name=mongo_store.bucket_name).delete(gone)
    with pytest.raises(CheckpointCorrupt, match=f"{gone}.*missing"):
        mongo_store.load_state(ckpt)


def test_orphaned_partial_upload_is_replaced(mongo_store: MongoStore) -> None:
    """Chunks without a complete files document (a writer died mid-upload) are cleared."""
    sid = new_session(mongo_store)
    state = tensors(1, 300_000, seed=2)
    (seg,) = codec.encode(state).segments
    chunks = mongo_store.db[f"{mongo_store.bucket_name}.chunks"]
    chunks.insert_many([{"files_id": seg.hash, "n": n, "data": b"\x00" * 1000} for n in range(3)])
    ckpt = mongo_store.put_checkpoint(sid, 1, "chunk", state)
    assert ckpt["bytes_written"] == seg.nbytes
    assert files_of(mongo_store) == {seg.hash: seg.nbytes}
    assert_bit_exact(state, mongo_store.load_state(ckpt))


def test_concurrent_puts_of_the_same_state_store_each_segment_once(
    mongo_store: MongoStore, mongo_uri: str
) -> None:
    state = tensors(4, 500_000, seed=3)
    sids = [new_session(mongo_store, f"s{i}") for i in range(3)]
    stores = [MongoStore(mongo_uri) for _ in sids]
    errors: list[BaseException] = []

    written: list[int] = []

    def put(store: MongoStore, sid: str) -> None:
        try:
            written.append(store.put_checkpoint(sid, 1, "chunk", state)["bytes_written"])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=put, args=pair) for pair in zip(stores, sids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for store in stores:
        store.close()
    assert errors == []
    assert len(files_of(mongo_store)) == 4
    assert sum(written) == 4 * 500_000 * 4  # each segment written by exactly one of them
    for sid in sids:
        assert_bit_exact(state, mongo_store.load_state(mongo_store.get_checkpoint(sid)))


# --- deletion and garbage collection -----------------------------------------------------
def test_shared_segment_survives_deleting_one_checkpoint(mongo_store: MongoStore) -> None:
    sid = new_session(mongo_store)
    one = {"shared": torch.ones(70_000), "own": torch.zeros(70_000)}
    two = {"shared": torch.ones(70_000), "other": torch.full((70_000,), 2.0)}
    c1 = mongo_store.put_checkpoint(sid, 1, "chunk", one)
    c2 = mongo_store.put_checkpoint(sid, 2, "chunk", two)
    shared, own = c1["segments"]
    assert shared in c2["segments"]
    mongo_store.delete_checkpoint(sid, 1, "chunk")
    mongo_store.delete_checkpoint(sid, 1, "chunk")  # twice: fine
    assert shared in files_of(mongo_store) and own not in files_of(mongo_store)
    assert_bit_exact(two, mongo_store.load_state(mongo_store.get_checkpoint(sid, 2)))


def test_registered_upload_protects_its_segments_from_deletion(mongo_store: MongoStore) -> None:
    """A put in flight lists its segments first; a delete meanwhile must keep them."""
    sid = new_session(mongo_store)
    ckpt = mongo_store.put_checkpoint(sid, 1, "chunk", {"w": torch.ones(70_000)})
    (digest,) = ckpt["segments"]
    uploads = mongo_store.db[f"{mongo_store.bucket_name}_uploads"]
    uploads.insert_one({"_id": "inflight", "session": sid, "segments": [digest],
                        "created": time.time()})  # fmt: skip
    mongo_store.delete_checkpoint(sid, 1, "chunk")
    assert digest in files_of(mongo_store)
    uploads.delete_one({"_id": "inflight"})
    assert mongo_store.gc_segments(older_than=0) == 1
    assert files_of(mongo_store) == {}


def test_put_waits_for_a_deletion_in_progress(mongo_store: MongoStore) -> None:
    """A segment under a deleter's tombstone is not trusted until the deleter is done."""
    sid = new_session(mongo_store)
    state = {"w": torch.ones(70_000)}
    (digest,) = mongo_store.put_checkpoint(sid, 1, "chunk", state)["segments"]
    stones = mongo_store.db[f"{mongo_store.bucket_name}_deletions"]
    stones.insert_one({"_id": digest, "token": "t", "at": time.time()})
    done = threading.Event()
    thread = threading.Thread(
        target=lambda: (mongo_store.put_checkpoint(sid, 2, "chunk", state), done.set())
    )
    thread.start()
    assert not done.wait(0.5)
    # The deleter removes the data, then its tombstone: the put must upload it again.
    gridfs.GridFSBucket(mongo_store.db, bucket_name=mongo_store.bucket_name).delete(digest)
    stones.delete_one({"_id": digest})
    assert done.wait(30)
    thread.join()
    ckpt = mongo_store.get_checkpoint(sid, 2)
    assert ckpt["bytes_written"] == ckpt["size"]
    assert_bit_exact(state, mongo_store.load_state(ckpt))


def test_racing_puts_and_deletes_never_lose_a_committed_segment(
    mongo_store: MongoStore, mongo_uri: str
) -> None:
    """Session A deletes its only checkpoint holding a segment while B writes one reusing it.

    Found by this test (1 run in 10 with 6 rounds): the deleter read checkpoints, then
    uploads; B committed its checkpoint between the two reads and unregistered before
    the second, so neither read saw B's reference and its segment was deleted."""
    a, b = new_session(mongo_store, "a"), new_session(mongo_store, "b")
    other = MongoStore(mongo_uri)
    try:
        for round_ in range(30):
            state = {f"w{i}": torch.full((4_000,), round_ * 100.0 + i) for i in range(20)}
            mongo_store.put_checkpoint(a, round_, "chunk", state)
            deleter = threading.Thread(target=mongo_store.delete_checkpoint,
                                       args=(a, round_, "chunk"))  # fmt: skip
            deleter.start()
            other.put_checkpoint(b, round_, "chunk", state)
            deleter.join()
            assert_bit_exact(state, mongo_store.load_state(mongo_store.get_checkpoint(b, round_)))
    finally:
        other.close()


def test_gc_removes_only_unreferenced_old_segments(mongo_store: MongoStore) -> None:
    sid = new_session(mongo_store)
    kept = mongo_store.put_checkpoint(sid, 1, "chunk", {"k": torch.ones(70_000)})
    lost = mongo_store.put_checkpoint(sid, 2, "chunk", {"l": torch.zeros(70_000)})
    # A crash between segment upload and checkpoint insert leaves unreferenced segments.
    mongo_store.db["checkpoints"].delete_one({"step": 2})
    assert mongo_store.gc_segments() == 0  # young: a put may be about to reference it
    assert set(files_of(mongo_store)) == set(kept["segments"] + lost["segments"])
    assert mongo_store.gc_segments(older_than=0) == 1
    assert set(files_of(mongo_store)) == set(kept["segments"])
    assert_bit_exact({"k": torch.ones(70_000)}, mongo_store.load_state(kept))


def test_gc_finishes_a_crashed_deletion(mongo_store: MongoStore) -> None:
    sid = new_session(mongo_store)
    ckpt = mongo_store.put_checkpoint(sid, 1, "chunk", {"x": torch.ones(70_000)})
    mongo_store.db["checkpoints"].update_one(
        {"step": 1}, {"$set": {"state": "deleting", "deleting_since": time.time() - 7200}}
    )
    assert mongo_store.list_checkpoints(sid) == []  # never visible once marked
    assert mongo_store.gc_segments() == 1
    assert mongo_store.db["checkpoints"].count_documents({}) == 0
    assert not set(ckpt["segments"]) & set(files_of(mongo_store))


# --- statistics --------------------------------------------------------------------------
def test_replayed_statistics_overwrite_across_batches(mongo_store: MongoStore) -> None:
    sid = new_session(mongo_store)
    first = [StatPoint("train", s, "loss", float(s), time=1.0) for s in range(6000)]
    assert mongo_store.write_statistics(sid, first) == 6000  # more than one batch
    # A redelivered chunk: half the points again with new values, plus new ones.
    replay = [StatPoint("train", s, "loss", -float(s), time=2.0) for s in range(3000, 9000)]
    assert mongo_store.write_statistics(sid, replay) == 6000
    rows = mongo_store.query_statistics(sid)
    assert len(rows) == 9000
    assert [r["value"] for r in rows] == [float(s) for s in range(3000)] + [
        -float(s) for s in range(3000, 9000)
    ]
    assert [r["time"] for r in rows[2999:3001]] == [1.0, 2.0]
    assert len(stored_points(mongo_store, sid)) == 9000


def test_statistic_names_with_slashes_do_not_collide(mongo_store: MongoStore) -> None:
    sid = new_session(mongo_store)
    mongo_store.write_statistics(sid, [StatPoint("a/1", 2, "x", 1.0),
                                       StatPoint("a", 1, "2/x", 2.0)])  # fmt: skip
    rows = mongo_store.query_statistics(sid)
    assert sorted((r["phase"], r["step"], r["name"], r["value"]) for r in rows) == [
        ("a", 1, "2/x", 2.0),
        ("a/1", 2, "x", 1.0),
    ]


def test_points_are_grouped_in_one_document_per_bucket(mongo_store: MongoStore) -> None:
    """The bucket pattern: 4 names x 3 buckets of steps is 12 documents, not 6000."""
    sid = new_session(mongo_store)
    names = ("loss", "acc", "lr", "gnorm")
    steps = 3 * BUCKET_STEPS - 36
    points = [StatPoint("train", s, n, s * 0.5, time=7.0) for s in range(steps) for n in names]
    assert mongo_store.write_statistics(sid, points) == len(points)
    assert mongo_store.db["statistics"].count_documents({"session": sid}) == 4 * 3
    stored = stored_points(mongo_store, sid)
    assert stored[("train", "acc", BUCKET_STEPS + 1)] == [(BUCKET_STEPS + 1) * 0.5, 7.0]
    assert len(stored) == len(points)


def test_replay_within_a_bucket_overwrites_and_last_write_wins(mongo_store: MongoStore) -> None:
    sid = new_session(mongo_store)
    step = BUCKET_STEPS + 5
    mongo_store.write_statistics(sid, [StatPoint("train", step, "loss", 1.0, time=1.0)])
    # The same point twice in one batch (last wins), and again in a later batch.
    twice = [StatPoint("train", step, "loss", 2.0, time=2.0),
             StatPoint("train", step, "loss", 3.0, time=3.0)]  # fmt: skip
    assert mongo_store.write_statistics(sid, twice) == 1
    rows = mongo_store.query_statistics(sid)
    assert [(r["step"], r["value"], r["time"]) for r in rows] == [(step, 3.0, 3.0)]
    assert len(stored_points(mongo_store, sid)) == 1


def test_delete_after_a_step_in_the_middle_of_a_bucket(mongo_store: MongoStore) -> None:
    sid, other = new_session(mongo_store, "a"), new_session(mongo_store, "b")
    steps = range(4 * BUCKET_STEPS)
    for session in (sid, other):
        mongo_store.write_statistics(session, [
            StatPoint(phase, s, name, float(s)) for s in steps
            for phase in ("train", "eval") for name in ("loss", "acc")
        ])  # fmt: skip
    cut = BUCKET_STEPS + 100  # in the second bucket
    removed = mongo_store.delete_statistics(sid, after_step=cut)
    assert removed == 4 * (len(steps) - cut - 1)
    rows = mongo_store.query_statistics(sid)
    assert len(rows) == 4 * (cut + 1) and max(r["step"] for r in rows) == cut
    assert all(r["value"] == float(r["step"]) for r in rows)  # earlier points untouched
    assert {d["bucket"] for d in mongo_store.db["statistics"].find({"session": sid})} == {0, 1}
    assert mongo_store.delete_statistics(sid, after_step=cut) == 0  # idempotent
    assert len(mongo_store.query_statistics(other)) == 4 * len(steps)  # other session intact
    # The restarted chunk writes its points again, into the trimmed and the new buckets.
    redo = [StatPoint("train", s, "loss", -1.0) for s in range(cut + 1, 2 * BUCKET_STEPS + 3)]
    mongo_store.write_statistics(sid, redo)
    again = mongo_store.query_statistics(sid, phase="train", name="loss", step_min=cut)
    assert [(r["step"], r["value"]) for r in again[:2]] == [(cut, float(cut)), (cut + 1, -1.0)]
    assert len(again) == 1 + len(redo)
    # Deleting from the last step of a bucket leaves it whole; from -1, everything goes.
    whole = mongo_store.delete_statistics(sid, after_step=BUCKET_STEPS - 1)
    assert whole == 4 * (cut + 1 - BUCKET_STEPS) + len(redo)
    assert max(r["step"] for r in mongo_store.query_statistics(sid)) == BUCKET_STEPS - 1
    assert mongo_store.delete_statistics(sid, after_step=-1) == 4 * BUCKET_STEPS
    assert mongo_store.query_statistics(sid) == []


def test_query_ranges_crossing_buckets(mongo_store: MongoStore) -> None:
    sid = new_session(mongo_store)
    last = 3 * BUCKET_STEPS + 10
    mongo_store.write_statistics(sid, [
        StatPoint(phase, s, name, float(s)) for s in range(0, last, 3)
        for phase in ("train", "eval") for name in ("loss", "acc")
    ])  # fmt: skip

    def steps(**kw: Any) -> list[int]:
        rows = mongo_store.query_statistics(sid, phase="eval", name="acc", **kw)
        return [r["step"] for r in rows]

    low, high = BUCKET_STEPS - 4, 2 * BUCKET_STEPS + 4  # three buckets, both ends partial
    assert steps(step_min=low, step_max=high) == [s for s in range(0, last, 3) if low <= s <= high]
    assert steps(step_min=2 * BUCKET_STEPS + 1) == [
        s for s in range(0, last, 3) if s >= 2 * BUCKET_STEPS + 1
    ]
    assert steps(step_max=BUCKET_STEPS) == [s for s in range(0, last, 3) if s <= BUCKET_STEPS]
    assert steps(step_min=10, step_max=11) == []  # inside one bucket, no point there
    assert steps(step_min=high, step_max=low) == []
    low, high = BUCKET_STEPS - 2, BUCKET_STEPS + 1  # across a bucket boundary
    both = mongo_store.query_statistics(sid, step_min=low, step_max=high)
    assert [(r["step"], r["name"], r["phase"]) for r in both] == [
        (s, n, p)
        for s in range(0, last, 3)
        if low <= s <= high
        for n in ("acc", "loss")
        for p in ("eval", "train")
    ]
    assert len(both) == 8


def test_query_across_sessions_orders_by_session_step_name(mongo_store: MongoStore) -> None:
    """A sweep's sessions side by side, each with points in several buckets."""
    sids = sorted(new_session(mongo_store, f"s{i}") for i in range(3))
    for i, sid in enumerate(reversed(sids)):  # written out of order
        mongo_store.write_statistics(sid, [
            StatPoint("train", s, name, float(i)) for s in (2 * BUCKET_STEPS, 7, BUCKET_STEPS)
            for name in ("z", "loss")
        ])  # fmt: skip
    rows = mongo_store.query_statistics(sids[::2], name="loss")
    assert [(r["session"], r["step"]) for r in rows] == [
        (sid, s) for sid in sids[::2] for s in (7, BUCKET_STEPS, 2 * BUCKET_STEPS)
    ]
    everything = mongo_store.query_statistics(None, step_min=BUCKET_STEPS)
    assert [(r["session"], r["step"], r["name"]) for r in everything] == [
        (sid, s, n) for sid in sids for s in (BUCKET_STEPS, 2 * BUCKET_STEPS) for n in ("loss", "z")
    ]
    assert mongo_store.query_statistics([]) == []


def test_non_finite_values_in_a_bucket_and_overwritten(mongo_store: MongoStore) -> None:
    sid = new_session(mongo_store)
    specials = [math.nan, math.inf, -math.inf, -0.0, 1e-300, 2.5]
    mongo_store.write_statistics(
        sid, [StatPoint("train", s, "loss", v, time=float(s)) for s, v in enumerate(specials)]
    )
    got = [r["value"] for r in mongo_store.query_statistics(sid)]
    assert math.isnan(got[0]) and got[1:] == specials[1:]
    mongo_store.write_statistics(sid, [StatPoint("train", 0, "loss", 1.0),
                                       StatPoint("train", 5, "loss", math.nan)])  # fmt: skip
    got = [r["value"] for r in mongo_store.query_statistics(sid)]
    assert got[0] == 1.0 and got[1:5] == specials[1:5] and math.isnan(got[5])


def test_concurrent_writers_of_the_same_new_buckets_lose_no_point(
    mongo_store: MongoStore, mongo_uri: str
) -> None:
    """Writers racing to create the same bucket documents (an upsert may lose the race)."""
    sid = new_session(mongo_store)
    stores = [MongoStore(mongo_uri) for _ in range(3)]
    errors: list[BaseException] = []

    def write(store: MongoStore, offset: int) -> None:
        try:
            for base in range(0, 8 * BUCKET_STEPS, BUCKET_STEPS):
                steps = range(base + offset, base + BUCKET_STEPS, 3)
                store.write_statistics(sid, [StatPoint("train", s, "loss", s) for s in steps])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(st, i)) for i, st in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for store in stores:
        store.close()
    assert errors == []
    rows = mongo_store.query_statistics(sid)
    assert [r["step"] for r in rows] == list(range(8 * BUCKET_STEPS))
    assert mongo_store.db["statistics"].count_documents({"session": sid}) == 8


def test_a_database_with_per_point_statistics_is_refused(mongo_uri: str) -> None:
    """The older layout (one document per point) cannot mix with buckets: say so."""
    import pymongo

    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
    try:
        client.get_default_database()["statistics"].create_index(
            [("session", 1), ("phase", 1), ("step", 1), ("name", 1)], unique=True
        )
    finally:
        client.close()
    with pytest.raises(StoreError, match="one document per point"):
        MongoStore(mongo_uri)


# --- connection, credentials, retries ----------------------------------------------------
def test_url_database_and_redaction(mongo_server: Any) -> None:
    assert redact_url("mongodb://bob:pa%40ss@h1:1,h2:2/db?replicaSet=r") == (
        "mongodb://bob:***@h1:1,h2:2/db?replicaSet=r"
    )
    assert redact_url("mongodb+srv://bob:pw@cluster.example.com/x") == (
        "mongodb+srv://bob:***@cluster.example.com/x"
    )
    assert redact_url("mongodb://h:1/db") == "mongodb://h:1/db"
    # a redacted URL is known as one (the checkpoint writer process cannot open it)
    assert is_redacted(redact_url("mongodb://bob:pw@h:1/x"))
    assert not is_redacted("mongodb://bob:pw@h:1/x") and not is_redacted("mongodb://h:1/db")
    assert _db_name("mongodb://h:1") == _db_name("mongodb://h:1/?w=1") == "ptutils"
    assert _db_name("mongodb://u:p@h:1/runs%2Dx?authSource=admin") == "runs-x"
    name = f"t_{time.time_ns()}"
    store = MongoStore(uri_with_db(mongo_server.uri, "elsewhere"), db=name)
    try:
        assert store.db.name == name  # `db=` wins over the URL
    finally:
        store.client.drop_database(name)
        store.close()


def test_transient_errors_are_told_apart_from_failures() -> None:
    assert is_transient(AutoReconnect("connection reset"))
    assert is_transient(OperationFailure("shutting down", code=91))
    assert not is_transient(OperationFailure("bad query", code=2))
    assert not is_transient(DuplicateKeyError("E11000 duplicate key"))


def test_malformed_url_is_a_store_error_without_the_password() -> None:
    url = "mongodb://alice:" + "Sup3rSecretPw" + "@127.0.0.1:notaport/db"
    with pytest.raises(StoreError) as info:
        MongoStore(url)
    assert "Sup3rSecretPw" not in "".join(traceback.format_exception(info.value))
    assert "alice:***@" in str(info.value)


def test_indexes_are_created_idempotently(mongo_uri: str) -> None:
    MongoStore(mongo_uri).close()
    store = MongoStore(mongo_uri)  # opening again must not fail
    try:

        def keys(coll: str) -> set[tuple[Any, bool]]:
            info = store.db[coll].index_information().values()
            return {(tuple(i["key"]), bool(i.get("unique"))) for i in info}

        assert ((("name", 1),), True) in keys("sessions")
        assert ((("session", 1), ("step", 1), ("kind", 1)), True) in keys("checkpoints")
        stats = keys("statistics")
        assert ((("session", 1), ("phase", 1), ("name", 1), ("bucket", 1)), True) in stats
        assert ((("session", 1), ("name", 1), ("bucket", 1)), False) in stats
    finally:
        store.close()


def test_dead_server_gives_store_unavailable_without_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    url = f"mongodb://alice:Sup3rSecretPw@127.0.0.1:{port}/runs"
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG), pytest.raises(StoreUnavailable) as info:
        MongoStore(url, retry_seconds=2.0)
    elapsed = time.monotonic() - started
    assert 2.0 <= elapsed < 10.0
    text = "".join(traceback.format_exception(info.value))
    assert "Sup3rSecretPw" not in text and "Sup3rSecretPw" not in caplog.text
    assert f"alice:***@127.0.0.1:{port}" in str(info.value)
    assert "creating indexes" in str(info.value)


def test_writes_survive_a_server_kill_and_restart(
    mongo_process: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL the server in the middle of checkpoint + statistics + CAS writes.

    The writer thread keeps going across the outage thanks to the retry loop; afterwards
    every write is present exactly once and every listed checkpoint loads bit-exact.
    """
    server = mongo_process()
    uri = uri_with_db(server.uri, "faults")
    store = MongoStore(uri, retry_seconds=60.0)
    sid = new_session(store)
    steps, points_per_step = 10, 400
    frozen = tensors(3, 250_000, seed=10)

    def state_at(step: int) -> dict[str, Any]:
        return {**frozen, "head": torch.full((250_000,), float(step)), "step": step}

    progress: list[int] = []
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for step in range(1, steps + 1):
                store.put_checkpoint(sid, step, "chunk", state_at(step), metrics={"s": step})
                store.write_statistics(sid, [
                    StatPoint("train", step * 1000 + i, "loss", step + i / 1000)
                    for i in range(points_per_step)
                ])  # fmt: skip
                assert store.cas_session(sid, {"step": step - 1}, {"step": step}) is not None
                progress.append(step)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    caplog.set_level(logging.WARNING, logger="ptutils.store.mongo")
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while len(progress) < 3 and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        server.kill()  # SIGKILL mid-series
        killed_at = len(progress)
        time.sleep(4.0)  # longer than server selection waits: the retry loop must act
        server.start()
        thread.join(timeout=240)
    finally:
        store.close()
    assert not thread.is_alive() and errors == []
    assert killed_at < steps and progress == list(range(1, steps + 1))
    assert "retrying" in caplog.text  # the outage was crossed by the retry loop

    check = MongoStore(uri)
    try:
        assert check.get_session(sid)["step"] == steps
        listed = check.list_checkpoints(sid)
        assert [c["step"] for c in listed] == list(range(1, steps + 1))
        for ckpt in listed:
            assert_bit_exact(state_at(ckpt["step"]), check.load_state(ckpt))
        rows = check.query_statistics(sid)
        assert len(rows) == steps * points_per_step
        assert len(stored_points(check, sid)) == steps * points_per_step
        assert all(r["value"] == r["step"] // 1000 + (r["step"] % 1000) / 1000 for r in rows)
    finally:
        check.close()
