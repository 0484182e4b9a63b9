"""`run_group`: start a Train chunk's N rank processes, watch them, stop them together.

The supervisor holds nothing of the session: it starts `python -m ptutils.group.rank`
N times (each in a process group of its own, so that a kill reaches its DataLoader
workers too, and terminal signals reach only the supervisor), with the rendezvous
address, RANK/WORLD_SIZE/LOCAL_RANK and CUDA_VISIBLE_DEVICES in its environment. It
then polls every POLL_S:

- a stop request (`stop_flag`: SIGTERM, Ctrl-C) becomes the stop file; the ranks agree
  on one step boundary, rank 0 writes one `preempt` checkpoint, all exit 0;
- a rank that exits non-zero, or whose heartbeat stands still for `hang_timeout` s
  (`startup_timeout` while it builds, loads or saves), or a lost lease: every rank is
  SIGKILLed (its whole process group) and reaped, and the result says why.

It never imports torch (so never initialises CUDA) and never decodes a State.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ptutils import policy
from ptutils.group.files import GroupFiles
from ptutils.procs import pid_alive
from ptutils.protocol import Task
from ptutils.sources import is_reference, local

log = logging.getLogger("ptutils.group")

POLL_S = 0.1
"""Seconds between two looks at the ranks."""

FAILURE_GRACE_S = 2.0
"""Seconds the other ranks get to fail on their own when one failed (to find which)."""

EXIT_GRACE_S = 5.0
"""Seconds a rank that wrote its result may take to exit before it is killed."""

DEFAULT_STARTUP_TIMEOUT = 300.0
"""Seconds a rank may take to build, load or save without a heartbeat."""

STORE_URL_ENV = "PTUTILS_STORE"
"""How a rank learns the store (the environment: a password stays out of `ps`)."""

ProgressFn = Callable[[int, float], None]


@dataclass
class GroupResult:
    """How a group's chunk ended.

    `ok`: every rank exited 0 and rank 0 reported the step reached (`reached`; its
    checkpoint is in the store when `reached` > the chunk's start). Otherwise `error`
    holds a rank's own failure ({type, message, traceback}: the session's fault, e.g. a
    NaN loss or a config that does not build), or is None for a failure of the group
    (a rank killed or hung, a lost lease, a broken collective): retried from the last
    checkpoint. `stop_reason`: a callback ended the session before the first step.
    """

    ok: bool
    reason: str
    reached: int | None = None
    error: dict[str, Any] | None = None
    stop_reason: str | None = None
    ranks: list[int | None] = field(default_factory=list)
    """Exit status of each rank (negative: killed by that signal)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (the rendezvous of rank 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def rank_trusts_code(doc: Mapping[str, Any]) -> bool:
    """Whether the ranks may load the session's stored .py files: this process's policy
    trusts session code, or this process read every one of them from its own disk
    (`ptutils run CONFIG`): the ranks then build exactly what the supervisor vouched for."""
    if policy.current().trust_session_code:
        return True
    refs = [e for e in (doc["config"].get("imports") or []) if is_reference(e)]
    return bool(refs) and all(local(str(r["sha256"])) is not None for r in refs)


def run_group(
    store_url: str,
    doc: Mapping[str, Any],
    task: Task,
    *,
    devices: Sequence[str],
    stop_flag: Any,
    lease_lost: Callable[[], bool] = lambda: False,
    progress: ProgressFn | None = None,
    hang_timeout: float = 60.0,
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
    collective_timeout: float | None = None,
    python: str = sys.executable,
) -> GroupResult:
    """Run `task` (a Train chunk of the session `doc`) on len(devices) rank processes.

    `devices[r]`: rank r's CUDA_VISIBLE_DEVICES ("" for a CPU slot: left as it is).
    `stop_flag.is_set()`: stop at the next agreed step boundary with a checkpoint.
    `lease_lost()`: kill the ranks at once (another worker owns the session now).
    `progress(step, loss)`: rank 0's log points. `collective_timeout`: the ranks'
    process group timeout (default: hang_timeout + 30 s), so no collective waits forever.
    """
    world = len(devices)
    files = GroupFiles(tempfile.mkdtemp(prefix="group-", dir=_groups_root()))
    try:
        files.spec.write_text(json.dumps({
            "session": doc["_id"],
            "task": {"token": task.token, "start": task.start, "stop": task.stop},
            "collective_timeout": collective_timeout or hang_timeout + 30.0,
            "parent": os.getpid(),
        }))
        procs = _start(files, store_url, doc, devices, python)
        try:
            return _watch(files, procs, stop_flag, lease_lost, progress, hang_timeout,
                          startup_timeout, task)
        finally:
            _kill_all(procs)
    finally:
        if log.isEnabledFor(logging.DEBUG):
            for r in range(world):
                path = files.log_path(r)
                if path.exists():
                    log.debug("rank %d log:\n%s", r, path.read_text()[-4000:])
        shutil.rmtree(files.root, ignore_errors=True)


def _groups_root() -> str:
    """The folder of the group folders; those of supervisors that died are removed."""
    root = os.path.join(tempfile.gettempdir(), f"ptutils-groups-{os.getuid()}")
    os.makedirs(root, mode=0o700, exist_ok=True)
    for name in os.listdir(root):
        files = GroupFiles(os.path.join(root, name))
        try:
            parent = int(json.loads(files.spec.read_text())["parent"])
        except (OSError, ValueError, KeyError):
            continue  # being written; or not ours to judge
        if not pid_alive(parent):
            shutil.rmtree(files.root, ignore_errors=True)
    return root


    return True


def _start(files: GroupFiles, store_url: str, doc: Mapping[str, Any], devices: Sequence[str],
           python: str) -> list[subprocess.Popen[bytes]]:
    world = len(devices)
    port = free_port()
    pol = policy.current()
    base = {
        **os.environ,
        STORE_URL_ENV: store_url,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        policy.ALLOW_ENV: ",".join(pol.allow),
        policy.TRUST_ENV: "1" if rank_trusts_code(doc) else "0",
    }
    base.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one node: the loopback interface
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for rank, device in enumerate(devices):
            env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            if device != "":
                env["CUDA_VISIBLE_DEVICES"] = device
            with open(files.log_path(rank), "wb") as out:
                procs.append(subprocess.Popen(
                    [python, "-m", "ptutils.group.rank", str(files.spec)],
                    env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,  # no preexec_fn: unsafe with threads
                ))
    except BaseException:
        _kill_all(procs)
        raise
    return procs


def _watch(files: GroupFiles, procs: list[subprocess.Popen[bytes]], stop_flag: Any,
           lease_lost: Callable[[], bool], progress: ProgressFn | None, hang_timeout: float,
           startup_timeout: float, task: Task) -> GroupResult:
    world = len(procs)
    now = time.monotonic()
    beats: list[tuple[str, int] | None] = [None] * world
    changed = [now] * world
    stop_sent = False
    offset = 0
    finished = 0.0
    while True:
        if progress is not None:
            offset = _forward_progress(files, offset, progress)
        if not stop_sent and stop_flag is not None and stop_flag.is_set():
            files.request_stop()
            stop_sent = True
        if lease_lost():
            return _failed(files, procs, "the lease was lost (another worker owns the session)")
        codes = [p.poll() for p in procs]
        bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
        bad += [r for r, c in enumerate(codes) if c == 0 and files.read_result(r) is None]
        if bad:
            return _failed(files, procs, _root_cause(files, procs))
        reported = all(c == 0 or files.result_path(r).exists() for r, c in enumerate(codes))
        if reported:
            finished = finished or time.monotonic()
        if all(c == 0 for c in codes) or (
            reported and time.monotonic() - finished > EXIT_GRACE_S
        ):  # a rank that reported and hangs in its exit is killed (finally, below)
            if progress is not None:
                _forward_progress(files, offset, progress)
            return _finished(files, procs)
        now = time.monotonic()
        for r in range(world):
            if codes[r] is not None:
                continue
            beat = files.read_beat(r)
            if beat is not None and beat != beats[r]:
                beats[r], changed[r] = beat, now
            phase = beats[r][0] if beats[r] is not None else "start"
            limit = hang_timeout if phase == "train" else startup_timeout
            if now - changed[r] > limit:
                return _failed(files, procs, f"rank {r} made no progress for {limit:g} s "
                               f"(in {phase}, {task}): hung")
        time.sleep(POLL_S)


def _forward_progress(files: GroupFiles, offset: int, progress: ProgressFn) -> int:
    try:
        with open(files.progress, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return offset
    end = data.rfind(b"\n") + 1
    for line in data[:end].decode().splitlines():
        step, loss = line.split()
        progress(int(step), float(loss))
    return offset + end


def _finished(files: GroupFiles, procs: list[subprocess.Popen[bytes]]) -> GroupResult:
    _kill_all(procs)
    codes = [p.returncode for p in procs]
    result = files.read_result(0)
    if result is None or "reached" not in result:
        return GroupResult(False, "rank 0 exited without a result", ranks=codes)
    return GroupResult(True, "ok", reached=int(result["reached"]),
                       stop_reason=result.get("stop_reason"), ranks=codes)


def _root_cause(files: GroupFiles, procs: list[subprocess.Popen[bytes]]) -> str:
    """Which rank broke the group: its peers fail soon after (a collective whose peer is
    gone), so wait for them a moment, then name a killed rank before a failed one."""
    deadline = time.monotonic() + FAILURE_GRACE_S
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(POLL_S)
    codes = [p.poll() for p in procs]

    def order(r: int) -> int:
        code, result = codes[r], files.read_result(r) or {}
        if code is not None and code < 0:
            return 0  # killed by a signal
        if code and result.get("error") and not result.get("group_error"):
            return 1  # an error of its own
        if code == 0 and not result:
            return 2
        return 3 if code else 4  # a broken collective; still running or done
    r = min(range(len(procs)), key=order)
    code = codes[r]
    what = "status 0 and no result" if code == 0 else _describe(code)
    others = ", ".join(f"rank {i}: {_describe(c) if c is not None else 'running'}"
                       for i, c in enumerate(codes) if i != r)
    return f"rank {r} exited with {what} ({others})"


def _failed(files: GroupFiles, procs: list[subprocess.Popen[bytes]], reason: str) -> GroupResult:
    """Kill every rank, then the first rank's own error (the session's fault), if any."""
    _kill_all(procs)
    codes = [p.returncode for p in procs]
    for r in range(len(procs)):
        result = files.read_result(r)
        if result is not None and result.get("error") and not result.get("group_error"):
            err = result["error"]
            return GroupResult(False, f"rank {r}: {err['type']}: {err['message']}",
                               error=err, ranks=codes)
    tails = "; ".join(f"rank {r}: {_tail(files, r)}" for r in range(len(procs)))
    log.warning("group stopped: %s (%s)", reason, tails)
    return GroupResult(False, reason, ranks=codes)


def _tail(files: GroupFiles, rank: int, limit: int = 300) -> str:
    try:
        text = files.log_path(rank).read_text(errors="replace").strip()
    except FileNotFoundError:
        return "(no output)"
    return text[-limit:].replace("\n", " | ") or "(no output)"


def _kill_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL each rank's process group and reap the rank; nothing is left running."""
    for p in procs:
        if p.poll() is None or _group_alive(p.pid):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not refusable
            log.error("rank process %d did not die after SIGKILL", p.pid)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _describe(code: int | None) -> str:
    if code is None:
        return "no status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"
