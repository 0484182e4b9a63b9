"""`ptutils worker`: one Celery worker process per GPU (or N on CPU), supervised.

Each child is `celery -A workers.app worker` pinned to its device with
CUDA_VISIBLE_DEVICES, started fresh with exec (this process never touches CUDA, and
nothing is forked after CUDA is initialised). The launcher

- restarts a child that dies (OOM killer, a crash in native code), with a backoff;
  the session it ran is picked up through its lease, and a session that keeps killing
  its workers is failed after `session.max_attempts` attempts;
- turns SIGTERM or SIGINT into preemption: every child gets SIGTERM, stops at its next
  step boundary, checkpoints, requeues its continuation and exits within `grace`
  seconds; a second signal makes the children exit at once; children still running
  after grace + 5 s are killed;
- takes its children with it if it is SIGKILLed (PR_SET_PDEATHSIG on Linux);
- hands its children the operator's code policy (`--allow-imports`,
  `--trust-session-code`, see ptutils.policy) in their environment;
- runs a light reconcile loop in its first child (`reconcile_every`, 0 = off), so the
  session of a lost worker continues within lease TTL + a few seconds with no extra
  process to deploy;
- offers the node's slots (ptutils.slots): its GPUs, or `--slots N` CPU slots (default:
  one per process). Every child may take any of them through the node's slot file, and
  consumes the train queues of every world size up to the node's capacity (`train`,
  `train-x2`, ..., `train-xS`): a 2-rank session and two 1-rank ones run side by side
  on a 4-slot node, and a session too large for the node never reaches it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from ptutils.protocol import EVAL, QUEUES, SAVE
from ptutils.slots import (
    HOME_ENV,
    SLOTS_DIR_ENV,
    SLOTS_ENV,
    cpu_slots,
    gpu_slots,
    spec_of,
    train_queues,
)
from ptutils.slots import Slot as NodeSlot
from workers.metrics import ChildrenExporter

log = logging.getLogger("ptutils.launcher")

ROOT = Path(__file__).resolve().parents[1]
"""Directory holding the `workers` and `ptutils` packages (put on the children's path)."""

STOP_MARGIN_S = 5.0
"""Seconds after the grace period before children still running are SIGKILLed."""

RESTART_BACKOFF_MAX_S = 30.0
"""Longest wait before restarting a child that keeps dying at start."""

HEALTHY_AFTER_S = 60.0
"""A child that lived this long resets its restart backoff."""


@dataclass
class WorkerOptions:
    """What `ptutils worker` was asked for."""

    queues: Sequence[str] = ("train", "eval", "save")
    gpus: str = "all"
    concurrency: int | None = None
    """Processes per GPU (default 1), or in all on CPU (default: --slots, else 1)."""
    slots: int | None = None
    """CPU slots this node offers (default: one per process); on GPUs, its GPU count."""
    slots_dir: str | None = None
    """Directory of the node's slot file ($PTUTILS_SLOTS_DIR, ptutils.slots.default_dir)."""
    name: str | None = None  # node name prefix; None: default_name()
    broker: str | None = None
    store: str | None = None
    grace: float = 30.0
    lease_ttl: float = 60.0
    reconcile_every: float = 5.0
    stall_after: float | None = None
    loglevel: str = "info"
    events: bool = False
    allow_imports: Sequence[str] = ()
    """Modules sessions may name on this worker, besides the library's (ptutils.policy)."""
    trust_session_code: bool = False
    """Load the .py files stored with a session; else such a session fails at once."""
    metrics_port: int = 0
    """Serve Prometheus metrics of every child on this port (workers.metrics); 0: off."""


@dataclass
class Slot:
    """One child worker: its name and the devices it sees (`""` hides every GPU)."""

    name: str
    cuda_visible_devices: str
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    exit_codes: list[int] = field(default_factory=list)


def detect_gpus() -> list[str]:
    """GPU indices this machine offers, without initialising CUDA in this process.

    $CUDA_VISIBLE_DEVICES when set (an empty value means none), else `nvidia-smi -L`.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def parse_gpus(spec: str) -> list[str] | None:
    """`all` -> None (detect), `none` -> [], `0,1` -> ["0", "1"]; ValueError otherwise."""
    spec = spec.strip().lower()
    if spec == "all":
        return None
    if spec in ("none", ""):
        return []
    ids = [s.strip() for s in spec.split(",")]
    if not all(s.isdigit() or s.startswith("GPU-") for s in ids):
        raise ValueError(f"--gpus {spec!r}: expected all, none, or GPU indices like 0,1")
    return ids


def default_name() -> str:
    """`ptutils-PID`: two `ptutils worker` on one host get distinct Celery node names
    (`ptutils-PID-cpu0@HOST`), so remote control and Flower tell them apart."""
    return f"ptutils-{os.getpid()}"


def node_gpus(opts: WorkerOptions) -> list[str]:
    """The GPUs this launcher uses: `--gpus`, or the ones detected."""
    gpus = parse_gpus(opts.gpus)
    return detect_gpus() if gpus is None else gpus


def plan_slots(opts: WorkerOptions, gpus: list[str] | None = None) -> list[Slot]:
    """The child workers to run: `concurrency` per GPU, or `concurrency` on CPU (default:
    one per CPU slot)."""
    if opts.concurrency is not None and opts.concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    if opts.slots is not None and opts.slots < 1:
        raise ValueError("--slots must be at least 1")
    prefix = opts.name or default_name()
    gpus = node_gpus(opts) if gpus is None else gpus
    slots: list[Slot] = []
    if gpus:
        if opts.slots is not None and opts.slots != len(gpus):
            raise ValueError(f"--slots {opts.slots}: on a GPU node the slots are its GPUs "
                             f"({len(gpus)} here); choose them with --gpus")
        per = opts.concurrency or 1
        for gpu in gpus:
            for i in range(per):
                suffix = f"-{i}" if per > 1 else ""
                slots.append(Slot(f"{prefix}-gpu{gpu}{suffix}", gpu, len(slots)))
    else:
        count = opts.concurrency or opts.slots or 1
        if opts.gpus.strip().lower() == "all":
            log.info("no GPU found: starting %d CPU worker(s)", count)
        for i in range(count):
            slots.append(Slot(f"{prefix}-cpu{i}", "", len(slots)))
    return slots


def node_slots(opts: WorkerOptions, children: list[Slot], scope: str = "") -> list[NodeSlot]:
    """The slots this node offers: one per GPU (one per process on it, with several per
    GPU), or `--slots` CPU slots (default one per process), named in `scope` (this
    launcher's own: ptutils.slots)."""
    gpus = [c.cuda_visible_devices for c in children if c.cuda_visible_devices]
    if gpus:
        return gpu_slots(list(dict.fromkeys(gpus)), opts.concurrency or 1)
    return cpu_slots(opts.slots or len(children), scope)


def child_queues(opts: WorkerOptions, capacity: int) -> list[str]:
    """The queues of one child: every train queue in every size up to `capacity`."""
    queues: list[str] = []
    for q in opts.queues:
        for name in ([q] if q in (QUEUES[EVAL], QUEUES[SAVE]) else train_queues(q, capacity)):
            if name not in queues:
                queues.append(name)
    return queues


def child_command(opts: WorkerOptions, slot: Slot, capacity: int = 1) -> list[str]:
    """The `celery worker` command line of one child (`capacity`: the node's slots)."""
    cmd = [
        sys.executable, "-m", "celery", "-A", "workers.app", "worker",
        "--queues", ",".join(child_queues(opts, capacity)),
        "--hostname", f"{slot.name}@%h",
        "--concurrency", "1",
        "--without-gossip", "--without-mingle",
        "--loglevel", opts.loglevel,
    ]
    if opts.events:
        cmd.append("--task-events")
    return cmd


def child_env(opts: WorkerOptions, slot: Slot,
              node: Sequence[NodeSlot] | None = None) -> dict[str, str]:
    """The environment of one child: device pinning, the node's slots and the ptutils
    settings."""
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = slot.cuda_visible_devices
    if slot.cuda_visible_devices:  # device ids as nvidia-smi numbers them
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    if node is None:  # this child alone
        node = gpu_slots([slot.cuda_visible_devices]) if slot.cuda_visible_devices else cpu_slots(1)
    env[SLOTS_ENV] = spec_of(node)
    env[HOME_ENV] = slot.cuda_visible_devices
    if opts.slots_dir:
        env[SLOTS_DIR_ENV] = opts.slots_dir
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p
    )
    if opts.broker:
        env["PTUTILS_BROKER"] = opts.broker
    if opts.store:
        env["PTUTILS_STORE"] = opts.store
    env["PTUTILS_GRACE"] = str(opts.grace)
    env["PTUTILS_LEASE_TTL"] = str(opts.lease_ttl)
    first = slot.index == 0 and opts.reconcile_every > 0
    env["PTUTILS_WORKER_RECONCILE"] = str(opts.reconcile_every) if first else "0"
    if opts.stall_after is not None:
        env["PTUTILS_STALL_AFTER"] = str(opts.stall_after)
    env["PTUTILS_ALLOW_IMPORTS"] = ",".join(opts.allow_imports)
    env["PTUTILS_TRUST_SESSION_CODE"] = "1" if opts.trust_session_code else "0"
    return env


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when the launcher dies (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Launcher:
    """Starts the children, restarts the ones that die, and stops them on a signal."""

    def __init__(self, opts: WorkerOptions) -> None:
        self.opts = opts
        self.slots = plan_slots(opts)
        self.node = node_slots(opts, self.slots, f"launcher-{os.getpid()}")
        self.capacity = len({s.unit for s in self.node})
        log.info("this node offers %d slot(s) (%s); queues %s", len(self.node),
                 spec_of(self.node), ",".join(child_queues(opts, self.capacity)))
        self.stopping_since: float | None = None
        self._parent = os.getpid()
        self.metrics: ChildrenExporter | None = None

    def run(self) -> int:
        """Supervise until every child has exited after a stop signal; the exit status."""
        self._install_signals()
        if self.opts.metrics_port:
            self.metrics = ChildrenExporter(self.opts.metrics_port)
        for slot in self.slots:
            self._start(slot)
        try:
            while not self._all_exited():
                self._tick()
                time.sleep(0.2)
        finally:
            self._kill_all()
            if self.metrics is not None:
                self.metrics.close()
        codes = [s.exit_codes[-1] for s in self.slots if s.exit_codes]
        return 0 if all(c == 0 for c in codes) else 1

    def _start(self, slot: Slot) -> None:
        env = child_env(self.opts, slot, self.node)
        if self.metrics is not None:
            env.update(self.metrics.child_env())
        slot.proc = subprocess.Popen(
            child_command(self.opts, slot, self.capacity), env=env, cwd=os.getcwd(),
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent,
        )
        slot.started = time.monotonic()
        log.info("started worker %s (pid %d, CUDA_VISIBLE_DEVICES=%r)", slot.name,
                 slot.proc.pid, slot.cuda_visible_devices)

    def _tick(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is not None:
                self._exited(slot, now)
            elif slot.proc is None and self.stopping_since is None and now >= slot.restart_at:
                self._start(slot)
        if (self.stopping_since is not None
                and now - self.stopping_since > self.opts.grace + STOP_MARGIN_S):
            self._kill_all()

    def _exited(self, slot: Slot, now: float) -> None:
        assert slot.proc is not None
        code = slot.proc.returncode
        slot.exit_codes.append(code)
        self._forget(slot.proc.pid)
        slot.proc = None
        if self.stopping_since is not None:
            log.info("worker %s exited (%d)", slot.name, code)
            return
        lived = now - slot.started
        slot.failures = 0 if lived >= HEALTHY_AFTER_S else slot.failures + 1
        delay = min(RESTART_BACKOFF_MAX_S, 2.0 ** max(0, slot.failures - 1))
        slot.restart_at = now + delay
        log.warning("worker %s exited unexpectedly (%s) after %.0fs; restarting in %.0fs",
                    slot.name, _describe(code), lived, delay)

    def _all_exited(self) -> bool:
        return self.stopping_since is not None and all(s.proc is None for s in self.slots)

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        name = signal.Signals(signum).name
        if self.stopping_since is None:
            self.stopping_since = now
            log.warning("%s: preempting %d worker(s): checkpoint at the next step, then exit "
                        "(grace %gs; send it again to exit at once)", name, len(self.slots),
                        self.opts.grace)
        elif now - self.stopping_since < 1.0:
            return  # the same stop delivered twice (a terminal, systemd and us)
        else:
            log.warning("%s again: the workers exit at once", name)
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, sig: int) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                try:
                    slot.proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def _kill_all(self) -> None:
        """SIGKILL every child still running and reap it."""
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                log.error("worker %s did not exit in time; killing it", slot.name)
                slot.proc.kill()
            if slot.proc is not None:
                slot.proc.wait()
                slot.exit_codes.append(slot.proc.returncode)
                self._forget(slot.proc.pid)
                slot.proc = None

    def _forget(self, pid: int) -> None:
        """A child exited: its live gauges leave the metrics."""
        if self.metrics is not None:
            self.metrics.child_exited(pid)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def run_workers(opts: WorkerOptions) -> int:
    """Run `ptutils worker` until stopped; its exit status."""
    return Launcher(opts).run()
