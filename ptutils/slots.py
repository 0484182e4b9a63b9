"""Slots: the devices of one node, shared by every worker process on it (DESIGN §9).

A slot is one device a session's rank runs on: a GPU (device id "0", "1", ...) or, on
a CPU node, one of `--slots N` CPU slots (device id ""). `NodeSlots` hands them out to
the worker processes of a node through one JSON file under a node-wide directory
(`$PTUTILS_SLOTS_DIR`, default `/tmp/ptutils-slots-UID`), read and written under an
exclusive `fcntl.flock`, so two processes never hold the same slot. GPU slots are
named by their device: every `ptutils worker` on the machine shares them, and two
never put sessions on one GPU. CPU slots are a capacity each `ptutils worker` declares
(`--slots`), named after it (`SCOPE/cpu0`): its own processes share them, and two
launchers on one machine have separate ones, as they have separate processes. Each held slot
records its owner (a session id), the holder's pid and that process's start time: a
slot whose holder died (SIGKILL, OOM) is free again at the next acquire, with no
cleanup step; the kernel drops the lock of a killed process by itself.

Routing (how a session finds a node that can hold it): a queue per device count. A
session of world size N>1 sends its Train tasks to `QUEUE-xN` (`train-x2` for the
default `train` queue; world size 1 keeps `QUEUE`), recorded on the session at submit
(`meta.queue`), so every later send (the engine's successors, a preempted chunk's
continuation, reconcile) takes the same route. A node with S slots consumes `QUEUE`
and `QUEUE-x2` .. `QUEUE-xS`: a session never reaches a node too small for it. Why not
a claim by capacity: Celery routes by queue already, priorities and queue depths
(reconcile's "queue empty" rule) work per queue unchanged, and nothing polls the store.
A node that has the size but not the free slots right now sends the task back with a
countdown (`retry_after`); slots are taken before the lease, so waiting is no attempt.

CUDA is never initialised here: GPUs are counted by the launcher (`nvidia-smi`,
`$CUDA_VISIBLE_DEVICES`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptutils.errors import ConfigError
from ptutils.procs import pid_alive

log = logging.getLogger("ptutils.slots")

SLOTS_DIR_ENV = "PTUTILS_SLOTS_DIR"
"""Environment variable naming the node-wide directory of the slot file."""

SLOTS_ENV = "PTUTILS_SLOTS"
"""The slots a worker process may hand out: `cpu:4` or `gpu:0,1,2,3` (set by the launcher)."""

HOME_ENV = "PTUTILS_HOME_DEVICE"
"""The GPU a worker process is pinned to (its CUDA_VISIBLE_DEVICES); "" on CPU."""

SIZE_MARK = "-x"
"""Queue of a session of world size N>1: its train queue + `-xN` (`train-x2`)."""

FILE_NAME, LOCK_NAME = "slots.json", "slots.lock"


@dataclass(frozen=True)
class Slot:
    """One slot: a name in the slot file and the device id a rank gets ("" for CPU)."""

    name: str
    device: str

    @property
    def unit(self) -> str:
        """What a multi-rank session takes whole: a GPU (all its slots), or a CPU slot."""
        return f"gpu{self.device}" if self.device else self.name


def cpu_slots(n: int, scope: str = "") -> list[Slot]:
    """`n` CPU slots, device "": cpu0 .. cpu{n-1}, or SCOPE/cpu0 ... (a launcher's own)."""
    prefix = f"{scope}/" if scope else ""
    return [Slot(f"{prefix}cpu{i}", "") for i in range(n)]


def gpu_slots(devices: Sequence[str], per_device: int = 1) -> list[Slot]:
    """One slot per GPU (`per_device` when several worker processes share a GPU)."""
    return [Slot(f"gpu{d}" + (f".{i}" if i else ""), str(d))
            for d in devices for i in range(per_device)]


def spec_of(slots: Sequence[Slot]) -> str:
    """`cpu:4` (`cpu:4@SCOPE`), or `gpu:0,0,1,1` (a GPU once per slot): what
    $PTUTILS_SLOTS carries."""
    if all(not s.device for s in slots):
        scope = slots[0].name.rpartition("/")[0] if slots else ""
        return f"cpu:{len(slots)}" + (f"@{scope}" if scope else "")
    return "gpu:" + ",".join(s.device for s in slots)


def parse_spec(spec: str) -> list[Slot]:
    """The slots of a `cpu:N[@SCOPE]` / `gpu:ID,ID,...` spec; ValueError otherwise."""
    kind, _, rest = spec.strip().partition(":")
    count, _, scope = rest.partition("@")
    if kind == "cpu" and count.isdigit() and int(count) >= 1:
        return cpu_slots(int(count), scope)
    if kind == "gpu" and rest:
        ids = [d.strip() for d in rest.split(",") if d.strip()]
        counts: dict[str, int] = {}
        for d in ids:
            counts[d] = counts.get(d, 0) + 1
        per = set(counts.values())
        if len(per) == 1:
            return gpu_slots(list(counts), per.pop())
    raise ValueError(f"${SLOTS_ENV}={spec!r}: expected cpu:N or gpu:ID,ID,...")


# --- routing ----------------------------------------------------------------------------
def train_queue(base: str, world_size: int) -> str:
    """The queue of the Train tasks of a session of `world_size` submitted to `base`."""
    return base if world_size <= 1 else f"{base}{SIZE_MARK}{world_size}"


def train_queues(base: str, capacity: int) -> list[str]:
    """Every queue a node with `capacity` slots consumes for train queue `base`."""
    return [train_queue(base, n) for n in range(1, max(1, capacity) + 1)]


def world_size_of(doc_or_config: Mapping[str, Any]) -> int:
    """`session.world_size` of a session document or a config (default 1)."""
    cfg = doc_or_config.get("config", doc_or_config)
    value = (cfg.get("session") or {}).get("world_size", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"session.world_size: must be a positive integer (got {value!r})")
    return value


def describe_devices(devices: Sequence[str] | None) -> str:
    """`cpu×2` for CPU slots, `gpu0,1` for GPUs, "" for none (`ascii`: `cpux2`)."""
    if not devices:
        return ""
    gpus = [d for d in devices if d]
    cpus = len(devices) - len(gpus)
    parts = []
    if gpus:
        parts.append("gpu" + ",".join(gpus))
    if cpus:
        parts.append("cpu" if cpus == 1 else f"cpu×{cpus}")
    return "+".join(parts)


# --- the allocator ----------------------------------------------------------------------
def default_dir() -> Path:
    """$PTUTILS_SLOTS_DIR, else `ptutils-slots-UID` under the system's temp directory."""
    return Path(os.environ.get(SLOTS_DIR_ENV) or
                Path(tempfile.gettempdir()) / f"ptutils-slots-{os.getuid()}")


class NodeSlots:
    """The slots of this node that this process may hand out, shared through a file.

    `acquire(n, owner)` takes `n` slots for `owner` (re-entrant: the same owner in the
    same process gets the same slots back) and returns their device ids, or None if not
    enough are free now; `release(owner)` frees them. With `home` (a worker pinned to a
    GPU), a single slot is taken on that GPU only: a 1-rank session trains in the
    worker's own process, on the GPU it sees. Several ranks take whole units (every
    slot of a GPU), home first.
    """

    def __init__(self, slots: Sequence[Slot], directory: str | os.PathLike[str] | None = None,
                 *, home: str | None = None) -> None:
        if not slots:
            raise ValueError("a node needs at least one slot")
        self.slots = list(slots)
        self.directory = Path(directory) if directory is not None else default_dir()
        self.home = home or None
        self.pid = os.getpid()

    @classmethod
    def from_env(cls) -> NodeSlots:
        """The slots the launcher gave this process ($PTUTILS_SLOTS; without it, one CPU
        slot of its own), in $PTUTILS_SLOTS_DIR, with $PTUTILS_HOME_DEVICE."""
        spec = os.environ.get(SLOTS_ENV) or f"cpu:1@process-{os.getpid()}"
        return cls(parse_spec(spec), home=os.environ.get(HOME_ENV) or None)

    @property
    def capacity(self) -> int:
        """The most ranks one session may have here (units: GPUs, or CPU slots)."""
        return len({s.unit for s in self.slots})

    def acquire(self, n: int, owner: str) -> list[str] | None:
        """`n` device ids for `owner`, or None if not enough slots are free now."""
        if n < 1:
            raise ValueError(f"acquire: n must be >= 1 (got {n})")
        self.pid = os.getpid()
        with self._locked() as table:
            held = [s for s in self.slots if _holds(table.get(s.name), owner, self.pid)]
            if held and len({s.unit for s in held}) == n:
                return self._devices(held, n)
            for s in held:
                table.pop(s.name, None)
            chosen = self._choose(table, n)
            if chosen is None:
                return None
            me = {"owner": owner, "pid": self.pid, "start": _start_time(self.pid),
                  "since": time.time()}
            for s in chosen:
                table[s.name] = me
        log.debug("slots %s -> %s", [s.name for s in chosen], owner)
        return self._devices(chosen, n)

    def release(self, owner: str) -> None:
        """Free the slots `owner` holds in this process (nothing if it holds none)."""
        with self._locked() as table:
            for s in self.slots:
                if _holds(table.get(s.name), owner, os.getpid()):
                    del table[s.name]

    def holders(self) -> dict[str, dict[str, Any]]:
        """Slot name -> {owner, pid, start, since} of every live holder on the node."""
        with self._locked() as table:
            return {k: dict(v) for k, v in table.items()}

    def _choose(self, table: dict[str, Any], n: int) -> list[Slot] | None:
        free = [s for s in self.slots if s.name not in table]
        if n == 1:
            mine = [s for s in free if self.home is None or s.device == self.home]
            return mine[:1] or None
        units: dict[str, list[Slot]] = {}
        for s in self.slots:
            units.setdefault(s.unit, []).append(s)
        whole = [u for u, group in units.items() if all(s in free for s in group)]
        whole.sort(key=lambda u: units[u][0].device != self.home)  # home first, stable
        if len(whole) < n:
            return None
        return [s for u in whole[:n] for s in units[u]]

    def _devices(self, slots: list[Slot], n: int) -> list[str]:
        if n == 1:
            return [slots[0].device]
        seen: dict[str, str] = {}
        for s in slots:
            seen.setdefault(s.unit, s.device)
        return list(seen.values())

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The node's table (slot -> holder), dead holders dropped, written back on exit."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.directory / FILE_NAME
        with open(self.directory / LOCK_NAME, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                table = _read(path)
                before = json.dumps(table, sort_keys=True)
                for name in [k for k, v in table.items() if not _alive(v)]:
                    log.info("slot %s: holder pid %s is gone; freed", name, table[name].get("pid"))
                    del table[name]
                yield table
                if json.dumps(table, sort_keys=True) != before:
                    _write(path, table)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _holds(entry: dict[str, Any] | None, owner: str, pid: int) -> bool:
    return bool(entry) and entry.get("owner") == owner and entry.get("pid") == pid


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # written by tmp + rename: only a stranger's file
        log.warning("slot file %s unreadable (%s): starting from an empty one", path, exc)
        return {}
    return dict(data.get("held") or {}) if isinstance(data, dict) else {}


def _write(path: Path, table: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"held": table}, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, Linux), None elsewhere: a pid
    reused by a new process does not keep a dead holder's slots."""
    stat = _stat(pid)
    return int(stat[19]) if stat else None


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (state first), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


def _alive(entry: dict[str, Any]) -> bool:
    """Whether the holder of a slot still runs (a zombie does not)."""
    pid = int(entry.get("pid") or 0)
    if pid <= 0:
        return False
    if Path("/proc/self/stat").exists():
        stat = _stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            return False
        start = entry.get("start")
        return start is None or int(stat[19]) == int(start)
    return pid_alive(pid)


class WorkerSlots:
    """What a worker process gives its Engine as `slots`: the slots it took for the task
    it runs (`reserve` before the task, `end` after), handed back to the Engine's own
    `acquire` of as many, whatever owner name that uses; anything else goes to the node.
    """

    def __init__(self, node: NodeSlots) -> None:
        self.node = node
        self.owner: str | None = None
        self.held: list[str] | None = None

    def reserve(self, n: int, owner: str) -> list[str] | None:
        """Take `n` slots for the task about to run; None if they are not free now."""
        self.end()
        devices = self.node.acquire(n, owner)
        if devices is not None:
            self.owner, self.held = owner, devices
        return devices

    def end(self) -> None:
        """The task is over: free its slots."""
        if self.owner is not None:
            self.node.release(self.owner)
        self.owner = self.held = None

    def acquire(self, n: int, owner: str) -> list[str] | None:
        if self.held is not None and len(self.held) == n:
            return list(self.held)
        devices = self.node.acquire(n, owner)
        if owner == self.owner:
            self.held = devices
        return devices

    def release(self, owner: str) -> None:
        if owner != self.owner:  # the reserved slots are freed by `end`
            self.node.release(owner)
