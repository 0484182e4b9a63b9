"""LocalStore specifics: crash safety of segment files, several processes, bad folders."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash

from ptutils import codec
from ptutils.errors import CheckpointCorrupt, StoreError
from ptutils.store.base import StatPoint, new_session_doc
from ptutils.store.local import DB_NAME, SCHEMA_VERSION, LocalStore

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalStore]:
    s = LocalStore(tmp_path / "runs")
    yield s
    s.close()


def session(store: LocalStore, name: str = "run") -> str:
    return store.create_session(new_session_doc(name, {"x": 1}, "h", 100))["_id"]


def state_of(fill: dict[str, float], n: int = 65536) -> dict[str, Any]:
    return {k: torch.full((n,), v) for k, v in fill.items()}


def seg_path(store: LocalStore, digest: str) -> Path:
    return store.segments_dir / digest[:2] / digest


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def stored_segment_files(store: LocalStore) -> set[str]:
    return {p.name for p in store.segments_dir.glob("*/*")}


# --- the folder ---------------------------------------------------------------------------
def test_layout_schema_version_and_url(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b"
    with LocalStore(root) as s:
        assert s.url == str(root)
        sid = session(s)
        s.put_checkpoint(sid, 1, "chunk", state_of({"w": 1.0}))
    with sqlite3.connect(root / DB_NAME) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    (digest,) = {s.hash for s in codec.encode(state_of({"w": 1.0})).segments}
    path = root / "segments" / digest[:2] / digest
    assert xxhash.xxh3_128(path.read_bytes()).hexdigest() == digest
    with LocalStore(root) as again:  # reopening is idempotent and sees the data
        assert again.get_session("run")["_id"] == sid
        assert same(state_of({"w": 1.0}), again.load_state(again.get_checkpoint(sid)))


def test_root_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "runs"
    path.write_text("not a folder")
    with pytest.raises(StoreError, match="is a file, not a folder") as info:
        LocalStore(path)
    assert str(path) in str(info.value)


def test_unwritable_root_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root ignores permission bits; /sys refuses even root
        path = Path("/sys/ptutils-runs")
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o555)
        path = parent / "runs"
    with pytest.raises(StoreError, match="--store") as info:
        LocalStore(path)
    assert str(path) in str(info.value)


def test_foreign_or_newer_database_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / DB_NAME).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable ptutils store"):
        LocalStore(junk)
    newer = tmp_path / "newer"
    LocalStore(newer).close()
    with sqlite3.connect(newer / DB_NAME) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer ptutils"):
        LocalStore(newer)


# --- segment files ------------------------------------------------------------------------
def test_leftover_temp_and_truncated_segment_are_rewritten(store: LocalStore) -> None:
    sid = session(store)
    state = state_of({"a": 1.0, "b": 2.0})
    seg_a, seg_b = codec.encode(state).segments
    # A crash while writing `a` left its temp file; a crash (or bad copy) left `b` truncated.
    folder = seg_path(store, seg_a.hash).parent
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f".{seg_a.hash}.{dead_pid()}.deadbeef.tmp"
    temp.write_bytes(b"\0" * seg_a.nbytes)
    truncated = seg_path(store, seg_b.hash)
    truncated.parent.mkdir(parents=True, exist_ok=True)
    truncated.write_bytes(b"\1" * (seg_b.nbytes // 2))
    ckpt = store.put_checkpoint(sid, 1, "chunk", state)
    assert ckpt["bytes_written"] == seg_a.nbytes + seg_b.nbytes
    for seg in (seg_a, seg_b):
        assert xxhash.xxh3_128(seg_path(store, seg.hash).read_bytes()).hexdigest() == seg.hash
    assert not temp.exists()  # its writer is dead: cleaned up
    assert same(state, store.load_state(ckpt))


def test_segment_failing_verification_never_lands(store: LocalStore) -> None:
    data = torch.arange(1000, dtype=torch.int32)
    view = memoryview(data.numpy()).cast("B")
    wrong = codec.Segment("0" * 32, len(view), view)  # bytes that do not match their name
    with pytest.raises(StoreError, match="failed verification"):
        store._store_segments([wrong])
    assert list(store.segments_dir.rglob("*")) == [] or all(
        p.is_dir() for p in store.segments_dir.rglob("*")
    )  # neither the segment nor its temp file is left behind


def test_present_segments_are_not_rewritten(store: LocalStore) -> None:
    sid = session(store)
    state = state_of({"a": 1.0})
    store.put_checkpoint(sid, 1, "chunk", state)
    (digest,) = stored_segment_files(store)
    before = seg_path(store, digest).stat()
    assert store.put_checkpoint(sid, 2, "chunk", state)["bytes_written"] == 0
    after = seg_path(store, digest).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_missing_segment_file_raises_checkpoint_corrupt(store: LocalStore) -> None:
    sid = session(store)
    ckpt = store.put_checkpoint(sid, 3, "chunk", state_of({"a": 1.0}))
    (digest,) = stored_segment_files(store)
    seg_path(store, digest).unlink()
    with pytest.raises(CheckpointCorrupt, match=digest) as info:
        store.load_state(ckpt)
    assert sid in str(info.value) and "step 3" in str(info.value)


def test_forged_segment_name_is_not_a_path(store: LocalStore) -> None:
    ckpt = store.put_checkpoint(session(store), 1, "chunk", state_of({"a": 1.0}))
    (digest,) = ckpt["segments"]
    escape = b"../../../../../../" + digest.encode()[18:]  # same length: msgpack stays valid
    forged = {**ckpt, "manifest": ckpt["manifest"].replace(digest.encode(), escape)}
    forged["checksum"] = codec.checksum(forged["manifest"])
    with pytest.raises(CheckpointCorrupt):
        store.load_state(forged)


class VanishingStore(LocalStore):
    """Simulates a concurrent delete that removes a reused segment before the commit."""

    vanish = True

    def _store_segments(self, segments: Any) -> int:
        written = super()._store_segments(segments)
        if self.vanish:
            self.vanish = False
            for seg in segments:
                seg_path(self, seg.hash).unlink(missing_ok=True)
        return written


def test_segment_removed_before_commit_is_written_again(tmp_path: Path) -> None:
    s = VanishingStore(tmp_path / "runs")
    sid = session(s)
    state = state_of({"a": 1.0, "b": 2.0})
    ckpt = s.put_checkpoint(sid, 1, "chunk", state)
    assert ckpt["bytes_written"] == 2 * ckpt["size"]  # written, vanished, written again
    assert same(state, s.load_state(s.get_checkpoint(sid)))


def test_replacing_and_deleting_remove_only_unshared_files(store: LocalStore) -> None:
    sid = session(store)
    first = state_of({"keep": 1.0, "old": 2.0})
    hashes = {s.hash: name for s, name in zip(codec.encode(first).segments, first)}
    store.put_checkpoint(sid, 5, "chunk", first)
    store.put_checkpoint(sid, 9, "chunk", state_of({"keep": 1.0}))
    store.put_checkpoint(sid, 5, "chunk", state_of({"keep": 1.0, "new": 3.0}))
    names = {hashes.get(h, "new") for h in stored_segment_files(store)}
    assert names == {"keep", "new"}  # "old" went with the replaced manifest
    store.delete_checkpoint(sid, 5, "chunk")
    assert {hashes.get(h, "new") for h in stored_segment_files(store)} == {"keep"}
    store.delete_checkpoint(sid, 9, "chunk")
    assert stored_segment_files(store) == set()


def test_collect_garbage_removes_orphans_only(store: LocalStore) -> None:
    sid = session(store)
    kept = state_of({"a": 1.0})
    store.put_checkpoint(sid, 1, "chunk", kept)
    # An orphan: segments a killed put wrote before its row was committed.
    store._store_segments(codec.encode(state_of({"orphan": 7.0})).segments)
    assert len(stored_segment_files(store)) == 2
    assert store.collect_garbage(older_than=3600) == 0  # too recent to be a leftover
    assert store.collect_garbage(older_than=0) == 1
    assert len(stored_segment_files(store)) == 1
    assert same(kept, store.load_state(store.get_checkpoint(sid)))


# --- crashes and other processes ----------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys, torch
    from ptutils.store.local import LocalStore
    store = LocalStore(sys.argv[1])
    for step in range(1, 100):
        state = {f"w{i}": torch.full((4 << 20,), float(step * 10 + i)) for i in range(4)}
        store.put_checkpoint(sys.argv[2], step, "chunk", state)
        print(step, flush=True)
""")


def test_killed_put_leaves_no_partial_checkpoint(store: LocalStore) -> None:
    sid = session(store)
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, store.url, sid], stdout=subprocess.PIPE, text=True, env=ENV
    )
    try:
        assert proc.stdout.readline().strip() == "1"  # one complete checkpoint first
        deadline = time.monotonic() + 60
        while not list(store.segments_dir.glob("*/.*.tmp")):  # then catch a segment mid-write
            assert time.monotonic() < deadline and proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    steps = [c["step"] for c in store.list_checkpoints(sid)]
    assert steps == list(range(1, len(steps) + 1))
    last = steps[-1]
    expect = {f"w{i}": torch.full((4 << 20,), float(last * 10 + i)) for i in range(4)}
    assert same(expect, store.load_state(store.get_checkpoint(sid)))
    # The store is fully usable: a new put at the interrupted step completes and loads.
    nxt = {f"w{i}": torch.full((4 << 20,), -float(i)) for i in range(4)}
    store.put_checkpoint(sid, last + 1, "chunk", nxt)
    assert same(nxt, store.load_state(store.get_checkpoint(sid)))
    # The killed writer's leftovers (its temp file at least) are garbage; nothing else is.
    assert store.collect_garbage(older_than=0) >= 1
    assert not list(store.segments_dir.glob("*/.*.tmp"))
    referenced = {h for c in store.list_checkpoints(sid) for h in c["segments"]}
    assert stored_segment_files(store) == referenced
    assert same(nxt, store.load_state(store.get_checkpoint(sid)))
    assert same(expect, store.load_state(store.get_checkpoint(sid, last)))


OTHER = textwrap.dedent("""
    import json, sys, torch
    from ptutils.store.base import StatPoint
    from ptutils.store.local import LocalStore
    store = LocalStore(sys.argv[1])
    doc = store.get_session("run")
    state = store.load_state(store.get_checkpoint(doc["_id"]))
    seen = {
        "doc": doc,
        "steps": [c["step"] for c in store.list_checkpoints(doc["_id"])],
        "w": state["w"].tolist(),
        "stats": store.query_statistics(doc["_id"]),
    }
    store.cas_session(doc["_id"], {"step": 4}, {"step": 8, "status": "completed"})
    store.put_checkpoint(doc["_id"], 8, "final", {"w": state["w"] * 2})
    store.write_statistics(doc["_id"], [StatPoint("eval", 8, "acc", 0.9, time=1.0)])
    print(json.dumps(seen))
""")


def test_other_processes_see_everything(store: LocalStore) -> None:
    sid = session(store)
    store.put_checkpoint(sid, 4, "chunk", {"w": torch.arange(5.0)}, metrics={"loss": 0.5})
    store.write_statistics(sid, [StatPoint("train", 4, "loss", float("nan"), time=2.0)])
    store.cas_session(sid, {"step": 0}, {"step": 4, "lease": {"worker": "me", "expires": 9.0}})
    out = subprocess.run(
        [sys.executable, "-c", OTHER, store.url],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
        check=True,
    ).stdout
    seen = json.loads(out.splitlines()[-1])
    assert (
        seen["doc"]["_id"] == sid
        and seen["doc"]["step"] == 4
        and seen["doc"]["lease"] == {"worker": "me", "expires": 9.0}
    )
    assert seen["steps"] == [4] and seen["w"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    (point,) = seen["stats"]
    assert (point["name"], point["time"]) == ("loss", 2.0) and math.isnan(point["value"])
    # ...and this process, connection still open, sees what the other one wrote.
    doc = store.get_session(sid)
    assert (doc["step"], doc["status"]) == (8, "completed")
    final = store.get_checkpoint(sid)
    assert (final["step"], final["kind"]) == (8, "final")
    assert torch.equal(store.load_state(final)["w"], torch.arange(5.0) * 2)
    assert [p["value"] for p in store.query_statistics(sid, phase="eval")] == [0.9]


def test_heartbeat_thread_shares_the_store(store: LocalStore) -> None:
    doc = store.create_session(new_session_doc("run", {}, "h", 10))
    store.acquire_lease(doc["_id"], doc["token"], "w1", ttl=5, now=0.0)
    renewed, stop = [], threading.Event()

    def heartbeat() -> None:
        now = 0.0
        while not stop.is_set():
            now += 1.0
            renewed.append(store.renew_lease(doc["_id"], "w1", ttl=5, now=now))

    thread = threading.Thread(target=heartbeat)
    thread.start()
    try:
        for step in range(1, 6):
            store.put_checkpoint(doc["_id"], step, "chunk", state_of({"w": float(step)}, 4096))
            store.write_statistics(doc["_id"], [StatPoint("train", step, "loss", 1.0 / step)])
    finally:
        stop.set()
        thread.join()
    assert renewed and all(renewed)
    assert len(store.list_checkpoints(doc["_id"])) == 5
    assert store.get_session(doc["_id"])["lease"]["expires"] == len(renewed) + 5.0
