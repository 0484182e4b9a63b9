"""MongoStore against a real MongoDB wire server (nx-27017 unless PTUTILS_TEST_MONGO_URI).

The backend-independent contract is in test_store_contract.py; this file covers what is
specific to MongoDB and GridFS: streaming round trips, dedup, crash leftovers, racing
writers and deleters, retries across a server restart, and credentials in errors.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import traceback
from typing import Any

import gridfs
import pytest
import torch

from ptutils import codec
from ptutils.errors import CheckpointCorrupt, StoreError, StoreUnavailable
from ptutils.store.base import StatPoint, new_session_doc
from ptutils.store.mongo import MongoStore, _db_name, redact_url
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
    """Session A deletes its only checkpoint holding a segment while B writes one reusing it."""
    a, b = new_session(mongo_store, "a"), new_session(mongo_store, "b")
    other = MongoStore(mongo_uri)
    try:
        for round_ in range(6):
            state = {f"w{i}": torch.full((16_000,), round_ * 100.0 + i) for i in range(20)}
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
    assert [r["value"] for r in rows[2999:3001]] == [2999.0, -3000.0]
    assert [r["time"] for r in rows[2999:3001]] == [1.0, 2.0]
    assert mongo_store.db["statistics"].count_documents({"session": sid}) == 9000


def test_statistic_names_with_slashes_do_not_collide(mongo_store: MongoStore) -> None:
    sid = new_session(mongo_store)
    mongo_store.write_statistics(sid, [StatPoint("a/1", 2, "x", 1.0),
                                       StatPoint("a", 1, "2/x", 2.0)])  # fmt: skip
    rows = mongo_store.query_statistics(sid)
    assert sorted((r["phase"], r["step"], r["name"], r["value"]) for r in rows) == [
        ("a", 1, "2/x", 2.0), ("a/1", 2, "x", 1.0)
    ]


# --- connection, credentials, retries ----------------------------------------------------
def test_url_database_and_redaction(mongo_server: Any) -> None:
    assert redact_url("mongodb://bob:pa%40ss@h1:1,h2:2/db?replicaSet=r") == (
        "mongodb://bob:***@h1:1,h2:2/db?replicaSet=r"
    )
    assert redact_url("mongodb+srv://bob:pw@cluster.example.com/x") == (
        "mongodb+srv://bob:***@cluster.example.com/x"
    )
    assert redact_url("mongodb://h:1/db") == "mongodb://h:1/db"
    assert _db_name("mongodb://h:1") == _db_name("mongodb://h:1/?w=1") == "ptutils"
    assert _db_name("mongodb://u:p@h:1/runs%2Dx?authSource=admin") == "runs-x"
    name = f"t_{time.time_ns()}"
    store = MongoStore(uri_with_db(mongo_server.uri, "elsewhere"), db=name)
    try:
        assert store.db.name == name  # `db=` wins over the URL
    finally:
        store.client.drop_database(name)
        store.close()


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
        assert ((("session", 1), ("phase", 1), ("step", 1), ("name", 1)), True) in stats
        assert ((("session", 1), ("name", 1), ("step", 1)), False) in stats
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
        assert check.db["statistics"].count_documents({}) == steps * points_per_step
        assert all(r["value"] == r["step"] // 1000 + (r["step"] % 1000) / 1000 for r in rows)
    finally:
        check.close()
