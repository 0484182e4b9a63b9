"""Shared test helpers: the small digits config and bit-exact comparisons of States."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def digits_config(*, imports: list[str], callbacks: list[dict[str, Any]], seed: int = 3,
                  **session: Any) -> dict[str, Any]:
    """A digits MLP session that trains in a second or two: dropout (so the RNGs matter),
    Adam and a StepLR (so optimizer and scheduler state matter), an eval every chunk."""
    return {
        "name": "small",
        "imports": imports,
        "session": {"total_steps": 60, "chunk_steps": 20, "eval_every": 20, "log_every": 1,
                    "seed": seed, **session},
        "model": {
            "network": {"type": "ptutils.nets.MLP", "in_features": 64, "hidden": [32],
                        "out_features": 10, "dropout": 0.2},
            "optimizer": {"type": "torch.optim.Adam", "lr": 0.003},
            "scheduler": {"type": "torch.optim.lr_scheduler.StepLR", "step_size": 25,
                          "gamma": 0.5},
        },
        "data": {"batch_size": 32, "seed": 1, "datasets": {
            "train": {"type": "ptutils.data.DigitsReader",
                      "split": {"fraction": 0.8, "part": "train"}},
            "test": {"type": "ptutils.data.DigitsReader",
                     "split": {"fraction": 0.8, "part": "test"}}}},
        "eval": {"targets": {"test": {"data": "test", "metrics": ["loss", "accuracy"]}}},
        "callbacks": callbacks,
    }


def assert_bit_identical(a, b, path="state"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_bit_identical(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bit_identical(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), path
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"


def series(stats):
    return [(p["phase"], p["step"], p["name"], p["value"]) for p in stats]


def corrupt_segment(store, digest: str) -> None:
    """Flip one byte of a stored segment, as bit rot would: a file of the local store, or
    the GridFS file of a MongoStore (rewritten under the same name and length)."""
    from ptutils.store.local import LocalStore

    if isinstance(store, LocalStore):
        path = store.segments_dir / digest[:2] / digest
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        return
    from gridfs import GridFSBucket

    db, bucket = store.db, store.bucket_name
    fs = GridFSBucket(db, bucket_name=bucket)
    meta = db[f"{bucket}.files"].find_one({"filename": digest})
    assert meta is not None, f"segment {digest} is not in GridFS bucket {bucket!r} of {db.name}"
    data = bytearray(fs.open_download_stream(meta["_id"]).read())
    data[len(data) // 2] ^= 0xFF
    fs.delete(meta["_id"])  # same name, same length, one byte flipped
    fs.upload_from_stream_with_id(meta["_id"], digest, bytes(data), metadata=meta.get("metadata"))


class StopAfter:
    """A stop flag that turns on after `n` checks (one check per step)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def is_set(self) -> bool:
        self.n -= 1
        return self.n < 0


def run_cut(store: Any, cfg: dict[str, Any], name: str, stop_at: int) -> dict[str, Any]:
    """Run `cfg` to the end in-process, preempted at `stop_at` and continued by a new
    Engine (a new process: nothing warm, the State only). Returns the session document."""
    from collections import deque

    from ptutils.engine import Engine
    from ptutils.plan import train_task
    from ptutils.store.base import new_session_doc

    total = cfg["session"]["total_steps"]
    doc = store.create_session(new_session_doc(name, cfg, "h", total))
    engine = Engine(store)
    queue = deque([train_task(doc)])
    preempted = False
    while queue:
        task = queue.popleft()
        if task.kind == "train" and not preempted and task.start <= stop_at < task.stop:
            engine.stop_flag = StopAfter(stop_at - task.start)
            out = engine.run(task)
            assert out.step == stop_at
            assert store.get_checkpoint(doc["_id"], stop_at, "preempt")
            engine = Engine(store)
            preempted = True
        else:
            out = engine.run(task)
        queue.extend(out.successors)
    assert preempted
    return doc
