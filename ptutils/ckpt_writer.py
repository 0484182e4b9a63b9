"""Checkpoints off the training path: a host snapshot of the State, written in the background.

At a chunk boundary the Engine copies the State's tensors into host buffers
(`HostSnapshot`: reused from one checkpoint to the next, pinned when the tensors live on
a GPU; its `SharedSnapshot` kind lays them out in shared memory) and hands the copy to a
`CheckpointWriter`, which writes the chunk's statistics, encodes, hashes, deduplicates
and uploads the State, and only then moves the session to the new step (the
compare-and-set of `Engine.commit_change`): `write_checkpoint`, run by the writer
process (ptutils.ckpt_process: no GIL shared with training) or, when that cannot take
it, by one background thread. Training goes on with the next chunk meanwhile.

Invariants (DESIGN §4):

- Checkpoint before advance: the commit runs in the writer after `put_checkpoint` has
  stored and verified every segment; the step in the store never runs ahead of a
  complete checkpoint.
- At most one write in flight per Engine (so per session): before the next snapshot the
  Engine waits for the previous write (`CheckpointWriter.wait`), and a snapshot's
  buffers are reused only after the write that reads them is over.
- Memory bound: one host copy of the State's tensors (`HostSnapshot`), plus what the
  store holds while writing (segments are views on that copy; the local store writes
  from them directly, GridFS batches `CHUNK_BATCH` chunks per writer thread). So at most
  about 1x the State beyond training itself, plus a few tens of MiB.
- A write that fails discards the chunk trained after it: the Engine resumes from the
  last verified checkpoint, so exact resume holds.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

log = logging.getLogger("ptutils.ckpt_writer")

__all__ = ["CheckpointWriter", "HostSnapshot", "write_checkpoint"]

_MAX_DEPTH = 64
"""Deeper than the codec accepts: left as is, so the codec's own error reports it."""

_PLAIN = (torch.Tensor, torch.nn.Parameter)

_SCALARS = frozenset({int, float, bool, str, bytes, type(None)})
"""Immutable leaves: a list of only these is copied in one go."""


def copyable(t: torch.Tensor) -> bool:
    """Whether a snapshot copies `t` into a host buffer (a plain dense tensor); the rest
    is passed through for the codec to refuse with a message naming it."""
    return (type(t) in _PLAIN and t.layout is torch.strided and not t.is_quantized
            and not t.is_nested and not t.is_meta)


class HostSnapshot:
    """Copies the tensors of a State into host buffers kept from one call to the next.

    `take(state)` returns a State of the same structure whose tensors are private CPU
    copies (pinned memory when the source is on CUDA, copied with non_blocking and one
    synchronize); containers are rebuilt, immutable leaves shared. Training may change
    its tensors in place as soon as `take` returns. The copies are overwritten by the
    next `take`: call it only once the previous snapshot is no longer read.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self.nbytes = 0
        """Bytes of the host buffers held (the memory bound: about the State's size)."""

    def take(self, state: Any) -> Any:
        self._cuda = False
        self._seen: set[str] = set()
        out = self._copy(state, "state", 0)
        if self._cuda:
            torch.cuda.synchronize()
        for gone in set(self._buffers) - self._seen:  # tensors no longer in the State
            self.nbytes -= self._buffers.pop(gone).nbytes
        return out

    def _copy(self, obj: Any, path: str, depth: int) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, path)
        if type(obj) is np.ndarray:
            return obj.copy()
        if depth >= _MAX_DEPTH:
            return obj
        if isinstance(obj, dict):
            return {k: self._copy(v, f"{path}/{k!r}", depth + 1) for k, v in obj.items()}
        if isinstance(obj, torch.Size):
            return obj
        if isinstance(obj, list | tuple):
            if all(type(v) in _SCALARS for v in obj):  # a History column: thousands of floats
                return list(obj) if isinstance(obj, list) else obj
            items = [self._copy(v, f"{path}/{i}", depth + 1) for i, v in enumerate(obj)]
            return items if isinstance(obj, list) else tuple(items)
        if isinstance(obj, bytearray):
            return bytes(obj)
        return obj

    def _tensor(self, t: torch.Tensor, path: str) -> torch.Tensor:
        if not copyable(t):
            return t  # the codec refuses these with a message naming the tensor
        cuda = t.device.type == "cuda"
        buf = self._buffers.get(path)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.is_pinned() != cuda:
            if buf is not None:
                self.nbytes -= buf.nbytes
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda)
            self._buffers[path] = buf
            self.nbytes += buf.nbytes
        self._seen.add(path)
        with torch.no_grad():
            buf.copy_(t.detach(), non_blocking=cuda)
        self._cuda = self._cuda or cuda
        return buf


def write_checkpoint(store: Any, request: dict[str, Any], state: Any) -> dict[str, Any] | None:
    """A chunk's write: its statistics, its checkpoint (stored and verified), then the
    commit (the compare-and-set `request["expect"]` -> `request["update"]`): the new
    session document, or None if fenced out. The same function runs inline (a task's
    last chunk), in the writer thread and in the writer process (ptutils.ckpt_process);
    `request` holds plain values only (msgpack), `state` the host copy."""
    from ptutils.store.base import StatPoint

    sid = request["session"]
    store.write_statistics(sid, [StatPoint(*p) for p in request["points"]])
    store.put_checkpoint(sid, request["step"], request["kind"], state,
                         metrics=request["metrics"])
    return store.cas_session(sid, request["expect"], request["update"])


class _InProcess:
    """A write in flight in the writer process, answered like a Future. If the process
    could not read the snapshot (no access to this process's shared memory), the write
    runs here when its result is asked for, and the writer process is not used again."""

    def __init__(self, proc: Any, store: Any, request: dict[str, Any], state: Any) -> None:
        self._proc, self._store, self._request, self._state = proc, store, request, state

    def done(self) -> bool:
        return self._proc.answered()

    def result(self) -> Any:
        from ptutils.ckpt_process import Unusable, disable

        try:
            return self._proc.result()
        except Unusable as exc:
            log.warning("checkpoint writes stay in this process: %s", exc)
            disable()
        finally:
            self._proc.lock.release()
        return write_checkpoint(self._store, self._request, self._state)


class CheckpointWriter:
    """Runs checkpoint jobs in the background, one at a time: in the writer process
    (`submit_write`, ptutils.ckpt_process) when it is there and free, else in one
    background thread.

    `submit(job)` refuses a second job while one is in flight (the caller `wait`s
    first); `wait()` returns the job's result or raises its exception; `drain()` waits
    and swallows it (for paths that are already failing).
    """

    def __init__(self, url: str | None = None) -> None:
        """`url`: the store the writes go to, as the writer process opens it (None: every
        write runs in the thread)."""
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[Any] | _InProcess | None = None
        self._lock = threading.Lock()
        self._url = url
        self.process_writes = 0
        """Writes this writer handed to the writer process (the rest ran in the thread)."""

    def submit_write(self, store: Any, request: dict[str, Any], state: Any,
                     snapshot: HostSnapshot, chunk_seconds: float = 0.0) -> None:
        """`write_checkpoint(store, request, state)` in the background: in the writer
        process if it is ready and free and `state` lies in a SharedSnapshot's arena,
        else in the thread. `chunk_seconds`: how long the chunk trained (a long one
        starts the writer process if it is not running)."""
        from ptutils.ckpt_process import START_AFTER_CHUNK_S, SharedSnapshot, writer_process

        if self._pending is not None:
            raise RuntimeError("a checkpoint write is still in flight; wait() for it first")
        shared = isinstance(snapshot, SharedSnapshot) and snapshot.shared
        proc = writer_process(start=chunk_seconds >= START_AFTER_CHUNK_S) \
            if self._url and shared else None
        if proc is not None and proc.ready() and proc.lock.acquire(blocking=False):
            try:
                tree, table = snapshot.describe(state)
                assert snapshot.arena is not None
                proc.send({**request, "url": self._url, "tree": tree, "arrays": table,
                           "arena": snapshot.arena.describe()})
            except Exception:  # noqa: BLE001 - the thread writes it (and reports any error)
                proc.lock.release()
            else:
                self._pending = _InProcess(proc, store, request, state)
                self.process_writes += 1
                return
        self.submit(lambda: write_checkpoint(store, request, state))

    @property
    def busy(self) -> bool:
        """True while a job runs."""
        pending = self._pending
        return pending is not None and not pending.done()

    @property
    def pending(self) -> bool:
        """True while a job was submitted and not yet waited for."""
        return self._pending is not None

    def submit(self, job: Callable[[], Any]) -> None:
        with self._lock:
            if self._pending is not None:
                raise RuntimeError("a checkpoint write is still in flight; wait() for it first")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="ptutils-ckpt")
            self._pending = self._pool.submit(job)

    def wait(self) -> Any:
        """The result of the job in flight (None if there is none); raises its error."""
        pending, self._pending = self._pending, None
        return None if pending is None else pending.result()

    def drain(self) -> BaseException | None:
        """Wait for the job in flight; its error, returned rather than raised."""
        try:
            self.wait()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            return exc
        return None

    def close(self) -> None:
        self.drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
