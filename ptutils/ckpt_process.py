"""Checkpoint writes in a process of their own: no GIL shared with the training loop.

A background *thread* that encodes, hashes and writes a checkpoint holds the GIL for
its Python parts (the codec's walk, the store's bookkeeping, SQLite bindings), and
every hand-off of the GIL costs the training thread a wake-up: measured, a chunk's
background write slowed training by about as much as its own CPU time (~8 ms per chunk
for a small model, 1.3% of a 0.6 s chunk). This module moves that work to a writer
process:

- The host snapshot lives in shared memory (`SharedSnapshot`: one `memfd` arena per
  layout of the State, mapped by both processes), so the State's bytes never cross a
  pipe. What does cross it (stdin/stdout, length-prefixed msgpack; never pickle) is the
  State's structure as the codec's own msgpack tree, the arena offset of each tensor,
  small arrays by value, the chunk's statistics, and the commit's compare-and-set.
- The writer process opens the request's store (its URL comes through the pipe, so a
  password never shows in `ps`; the last two stores stay open), runs statistics ->
  `put_checkpoint` (verified) -> compare-and-set (`ckpt_writer.write_checkpoint`, the
  very function a thread write runs), and answers with the new session document or
  the error. The
  invariants of ptutils.ckpt_writer hold unchanged: the commit runs after the
  checkpoint is stored; one write in flight; the arena is reused only after the write
  that reads it is answered.
- It dies with its parent (PR_SET_PDEATHSIG when the main thread started it, which is
  what that signal follows; else a watch on its parent's pid, every 0.1 s) and ignores
  SIGINT/SIGTERM (the parent decides whether to wait for the write in flight). If it dies, the write in flight
  fails as a StoreError: the chunk after it is discarded, as for any failed write, and
  the next write starts a new process.
- One writer process serves every Engine of this process in turn (a worker's Engines,
  a test's, a benchmark's rounds). It is started by the first background write of a
  chunk that trained for at least `START_AFTER_CHUNK_S` (it costs a second or two of
  CPU to start, importing torch: not worth it for a run of a few short chunks); while
  it starts, or is busy with another Engine's write, a write runs in the thread. Linux only (memfd, /proc); elsewhere every write is a thread write.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import torch

from ptutils.ckpt_writer import HostSnapshot, copyable
from ptutils.errors import PtutilsError, StoreError

__all__ = ["SharedSnapshot", "WriterProcess", "writer_process"]

DISABLE_ENV = "PTUTILS_WRITER_PROCESS"
"""Set to 0 to write every checkpoint in a thread of the training process."""

START_AFTER_CHUNK_S = 0.25
"""A chunk at least this long (seconds of training) starts the writer process."""

_ALIGN = 64
_FRAME = struct.Struct("<I")
_MAX_ARENAS = 4
"""Arenas the writer process keeps mapped (each Engine has one at a time)."""


_DISABLED: list[bool] = []


def enabled() -> bool:
    return (sys.platform == "linux" and hasattr(os, "memfd_create")
            and os.environ.get(DISABLE_ENV, "1") != "0" and not _DISABLED)


def disable() -> None:
    """No writer process for the rest of this process (it could not read our memory)."""
    _DISABLED[:] = [True]


class Unusable(Exception):
    """The writer process cannot map this process's shared memory (/proc access)."""


# --- the shared snapshot ------------------------------------------------------------
class Arena:
    """`nbytes` of shared memory (a memfd), mapped here; the writer maps it by
    /proc/<pid>/fd/<fd>."""

    def __init__(self, nbytes: int) -> None:
        self.id = uuid.uuid4().hex
        self.nbytes = max(nbytes, 1)
        self.fd = os.memfd_create("ptutils-snapshot", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.nbytes)
        self._map = mmap.mmap(self.fd, self.nbytes)
        self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self.base = self.bytes.data_ptr()

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "pid": os.getpid(), "fd": self.fd, "nbytes": self.nbytes}

    def close(self) -> None:
        """Closes the arena's fd. The mapping is not closed here: torch.frombuffer keeps
        the mmap object alive but holds no buffer export on it, so an explicit close would
        unmap memory that views (a write in flight) still read; it is unmapped when the
        last view goes."""
        self.bytes = None  # type: ignore[assignment]
        try:
            os.close(self.fd)
        except OSError:
            pass


class SharedSnapshot(HostSnapshot):
    """A HostSnapshot whose buffers are views on one shared-memory `Arena`.

    `take` first walks the State without copying (its layout: path, shape and dtype of
    every tensor); when that differs from the arena's (the first checkpoint, a tensor
    added or reshaped) the buffers are laid out anew in a new arena. Then the State is
    copied once, as HostSnapshot copies it, so the host memory stays one copy of the
    State. A State with CUDA tensors keeps HostSnapshot's pinned buffers (`shared`
    False): the arena is not pinned, and such a State is written by the thread."""

    def __init__(self) -> None:
        super().__init__()
        self.arena: Arena | None = None
        self.shared = False
        """Whether the State taken last lies in the arena (what the writer process reads)."""
        self._layout: dict[str, tuple[Any, ...]] | None = None
        self._planning: dict[str, tuple[Any, ...]] | None = None

    def take(self, state: Any) -> Any:
        layout = self._plan(state)
        if layout is None:  # a GPU State: pinned buffers (HostSnapshot's), written in a thread
            self._layout, self.shared = None, False
            return super().take(state)
        if layout != self._layout:
            self._relayout(layout)
        self.shared = True
        return super().take(state)

    def _plan(self, state: Any) -> dict[str, tuple[Any, ...]] | None:
        """{path: (shape, dtype)} of the tensors `take` would copy; None if one is on a GPU."""
        self._planning = {}
        try:
            self._copy(state, "state", 0)
            layout = self._planning
        finally:
            self._planning = None
        return None if any(cuda for _, _, cuda in layout.values()) else layout

    def _tensor(self, t: torch.Tensor, path: str) -> torch.Tensor:
        if self._planning is None:
            return super()._tensor(t, path)
        if copyable(t):
            self._planning[path] = (tuple(t.shape), t.dtype, t.device.type == "cuda")
        return t

    def _relayout(self, layout: dict[str, tuple[Any, ...]]) -> None:
        sizes = {p: math.prod(shape) * dtype.itemsize for p, (shape, dtype, _) in layout.items()}
        old, arena = self.arena, Arena(sum(-(-n // _ALIGN) * _ALIGN for n in sizes.values()))
        self._buffers, at = {}, 0
        for path, (shape, dtype, _) in layout.items():
            n = sizes[path]
            self._buffers[path] = arena.bytes[at:at + n].view(dtype).reshape(shape) if n \
                else torch.empty(shape, dtype=dtype)
            at += -(-n // _ALIGN) * _ALIGN
        self.arena, self.nbytes, self._layout = arena, sum(sizes.values()), layout
        if old is not None:
            old.close()

    def describe(self, state: Any) -> tuple[bytes, list[Any]]:
        """The State taken last as (the codec's msgpack tree, its array table): arena
        tensors by offset, anything else (numpy arrays, tensors the arena does not
        hold) by value. CodecError for what the codec refuses."""
        from ptutils.codec.buffers import TORCH_DTYPES, array_bytes
        from ptutils.codec.structure import TreeEncoder

        names = {dtype: name for name, dtype in TORCH_DTYPES.items()}
        arena = self.arena
        assert arena is not None
        low, high = arena.base, arena.base + arena.nbytes
        table: list[Any] = []

        def on_array(value: Any, path: str) -> int:
            if (type(value) is torch.Tensor and value.device.type == "cpu"
                    and value.is_contiguous() and value.nbytes
                    and low <= value.data_ptr() < high and value.dtype in names):
                table.append(["a", value.data_ptr() - low, names[value.dtype],
                              list(value.shape)])
            else:
                spec, view = array_bytes(value, path)
                table.append(["b", spec.kind, spec.dtype, list(spec.shape), bytes(view)])
            return len(table) - 1

        return TreeEncoder(on_array).encode(state), table


# --- the parent's side --------------------------------------------------------------
class WriterProcess:
    """A writer process and the pipe to it; one request at a time (`lock`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner = os.getpid()  # a forked child must not share these pipes
        self._ready = False
        main = threading.current_thread() is threading.main_thread()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "ptutils.ckpt_process", str(os.getpid()),
             "pdeathsig" if main else "watch"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def ready(self) -> bool:
        """True once the process has started and said so (never blocks)."""
        if not self._ready and self.alive and self._readable(0):
            self._ready = self._recv().get("ready") is True
        return self._ready and self.alive

    def _readable(self, timeout: float) -> bool:
        assert self._proc.stdout is not None
        return bool(select.select([self._proc.stdout], [], [], timeout)[0])

    def answered(self) -> bool:
        """Whether the answer to the request in flight is there to read."""
        return self._readable(0) or not self.alive

    def send(self, message: dict[str, Any]) -> None:
        import msgpack

        body = msgpack.packb(message, use_bin_type=True)
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(_FRAME.pack(len(body)) + body)
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise self._died() from exc

    def _recv(self) -> dict[str, Any]:
        import msgpack

        assert self._proc.stdout is not None
        head = self._proc.stdout.read(_FRAME.size)
        if len(head) < _FRAME.size:
            raise self._died()
        body = self._proc.stdout.read(_FRAME.unpack(head)[0])
        return msgpack.unpackb(body, raw=False)

    def result(self) -> Any:
        """The answer to the request in flight: the new session document (None if
        fenced out), or its error raised here."""
        answer = self._recv()
        if "unusable" in answer:
            raise Unusable(answer["unusable"])
        if "error" in answer:
            raise _error(answer["error"])
        text = answer.get("doc")
        return None if text is None else json.loads(text)

    def _died(self) -> StoreError:
        code = self._proc.poll()
        return StoreError(f"the checkpoint writer process exited (code {code}) during a "
                          "write; the chunk after it is discarded and training resumes "
                          "from the last verified checkpoint")

    def close(self) -> None:
        try:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            self._proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()


_PROCESS: list[WriterProcess] = []
_PROCESS_LOCK = threading.Lock()


def writer_process(*, start: bool = True) -> WriterProcess | None:
    """This process's writer process (with `start`: started now if there is none or it
    died); None where it cannot be used or is not running."""
    if not enabled():
        return None
    with _PROCESS_LOCK:
        if _PROCESS and _PROCESS[0].owner != os.getpid():
            _PROCESS.clear()  # inherited through fork: its pipes are the parent's
        if (not _PROCESS or not _PROCESS[0].alive) and start:
            try:
                _PROCESS[:] = [WriterProcess()]
            except OSError:
                return None
        return _PROCESS[0] if _PROCESS and _PROCESS[0].alive else None


def _error(info: dict[str, Any]) -> BaseException:
    """The writer's error as an exception of the same ptutils class (by name, from
    ptutils.errors only), else a RuntimeError that says what it was."""
    from ptutils import errors

    cls = getattr(errors, str(info.get("type")), None)
    message = str(info.get("message"))
    if isinstance(cls, type) and issubclass(cls, PtutilsError):
        return cls(message)
    if info.get("store"):
        return StoreError(message)
    return RuntimeError(f"{info.get('type')}: {message} (in the checkpoint writer process)")


# --- the writer process -------------------------------------------------------------
def _die_with_parent(parent: int, how: str) -> None:
    """SIGKILL this process when `parent` dies: PR_SET_PDEATHSIG follows the thread that
    started us, so it is used only when that was the parent's main thread (a thread
    that ends would take us with it); otherwise a daemon thread watches the pid."""
    if how == "pdeathsig":
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            how = "watch"
    if os.getppid() != parent:
        os._exit(1)  # it died before we got here

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.1)
        os._exit(1)

    if how == "watch":
        threading.Thread(target=watch, daemon=True, name="ptutils-parent-watch").start()


class _Arenas:
    def __init__(self) -> None:
        self._maps: dict[str, torch.Tensor] = {}

    def get(self, info: dict[str, Any]) -> torch.Tensor:
        found = self._maps.pop(info["id"], None)
        if found is None:
            with open(f"/proc/{info['pid']}/fd/{info['fd']}", "r+b") as f:
                found = torch.frombuffer(mmap.mmap(f.fileno(), info["nbytes"]),
                                         dtype=torch.uint8)
        self._maps[info["id"]] = found  # most recent last
        while len(self._maps) > _MAX_ARENAS:
            self._maps.pop(next(iter(self._maps)))
        return found


def _state(request: dict[str, Any], arenas: _Arenas) -> Any:
    from ptutils.codec.buffers import TORCH_DTYPES, allocate, spec_from
    from ptutils.codec.structure import decode_tree

    arena = arenas.get(request["arena"])
    arrays = []
    for row in request["arrays"]:
        if row[0] == "a":
            _, offset, dtype, shape = row
            dt = TORCH_DTYPES[dtype]
            count = math.prod(shape)
            arrays.append(arena[offset:offset + count * dt.itemsize].view(dt).reshape(shape))
        else:
            _, kind, dtype, shape, raw = row
            value, dest = allocate(spec_from(kind, dtype, shape))
            dest[:] = raw
            arrays.append(value)
    return decode_tree(request["tree"], arrays)


class _Stores:
    """The stores requests name, opened once; the last `_MAX_STORES` kept open."""

    def __init__(self) -> None:
        self._open: dict[str, Any] = {}

    def get(self, url: str) -> Any:
        from ptutils.store import open_store

        store = self._open.pop(url, None) or open_store(url)
        self._open[url] = store
        while len(self._open) > _MAX_STORES:
            self._open.pop(next(iter(self._open))).close()
        return store


_MAX_STORES = 2


def main() -> None:
    import msgpack

    _die_with_parent(int(sys.argv[1]), sys.argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)
    from ptutils.ckpt_writer import write_checkpoint

    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")  # the answer pipe, private: nothing else writes on it
    os.dup2(2, 1)  # a stray print (Python or C) goes to stderr
    sys.stdout = sys.stderr

    def answer(message: dict[str, Any]) -> None:
        body = msgpack.packb(message, use_bin_type=True)
        out.write(_FRAME.pack(len(body)) + body)
        out.flush()

    stores, arenas = _Stores(), _Arenas()
    answer({"ready": True})
    while True:
        head = inp.read(_FRAME.size)
        if len(head) < _FRAME.size:
            break  # the parent closed the pipe (or died)
        request = msgpack.unpackb(inp.read(_FRAME.unpack(head)[0]), raw=False)
        try:
            state = _state(request, arenas)
        except OSError as exc:  # /proc/<pid>/fd not ours to open: the parent writes it
            answer({"unusable": f"the writer process cannot map the snapshot ({exc})"})
            continue
        try:
            store = stores.get(request.pop("url"))
            doc = write_checkpoint(store, request, state)
            answer({"doc": None if doc is None else json.dumps(doc, default=str)})
        except Exception as exc:  # noqa: BLE001 - handed to the parent, which decides
            answer({"error": {"type": type(exc).__name__, "message": str(exc),
                              "store": isinstance(exc, StoreError)}})


if __name__ == "__main__":
    main()
