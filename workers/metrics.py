"""Prometheus metrics of workers and the reconcile loop (`prometheus_client`).

`ptutils worker --metrics-port N` ($PTUTILS_METRICS_PORT) serves them over HTTP from the
launcher: every worker process writes its samples to files in a directory the launcher
gives it ($PROMETHEUS_MULTIPROC_DIR, prometheus_client's multiprocess mode) and the
launcher's exporter sums them (`ChildrenExporter`). `ptutils reconcile --metrics-port N`
serves its own (`serve_here`).

What is measured, and where (the hooks are in workers/tasks.py and the launcher):

- `ptutils_sessions{status}`: sessions in the store by stored status, counted by the
  reconcile loop at most every SESSIONS_EVERY_S seconds;
- `ptutils_tasks_total{kind,outcome}` and `ptutils_chunk_seconds`: tasks run (`ran`,
  `noop`, `failed`) and the wall time of Train chunks that ran;
- `ptutils_checkpoint_bytes_total` (new segment bytes stored) and
  `ptutils_checkpoint_seconds` (time to write and verify a checkpoint), by kind: the
  worker's store is instrumented (`instrument_store`). The checkpoints of a session on
  several devices are written by its rank 0 process and are not counted;
- `ptutils_requeues_total{reason}`: `preempt` (a worker stopped by SIGTERM requeued the
  continuation), and reconcile's `lease_expired`, `stalled` and `eval`;
  `ptutils_lease_expiries_total` counts the expired leases reconcile found;
- `ptutils_gpu_memory_bytes{device,kind}`: allocated and reserved CUDA memory (and the
  peak allocation of the last chunk) after each task, when CUDA is initialised.

Metrics never fail a task: an error while recording is logged and dropped.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)

from ptutils.store.base import Store

log = logging.getLogger("ptutils.metrics")

PORT_ENV = "PTUTILS_METRICS_PORT"
"""Port of the HTTP exporter (`--metrics-port`); unset or 0: no exporter."""

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""Where worker processes write their samples for the launcher (prometheus_client)."""

SESSIONS_EVERY_S = 30.0
"""Seconds between two counts of the sessions by status (a query over every session)."""

SESSIONS_EVERY_ENV = "PTUTILS_METRICS_SESSIONS_EVERY"
"""Overrides SESSIONS_EVERY_S in the reconcile loop of `ptutils worker`."""

CHUNK_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))
CHECKPOINT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf"))

SESSIONS = Gauge("ptutils_sessions", "Sessions in the store by status (reconcile loop).",
                 ["status"], multiprocess_mode="livemostrecent")
TASKS = Counter("ptutils_tasks", "Tasks taken by this worker, by kind and outcome.",
                ["kind", "outcome"])
CHUNK_SECONDS = Histogram("ptutils_chunk_seconds", "Wall time of Train chunks that ran.",
                          buckets=CHUNK_BUCKETS)
CHECKPOINT_BYTES = Counter("ptutils_checkpoint_bytes",
                           "Bytes of new State segments written, by checkpoint kind.", ["kind"])
CHECKPOINT_SECONDS = Histogram("ptutils_checkpoint_seconds",
                               "Time to write and verify a checkpoint, by kind.", ["kind"],
                               buckets=CHECKPOINT_BUCKETS)
REQUEUES = Counter("ptutils_requeues", "Continuations requeued, by reason.", ["reason"])
LEASE_EXPIRIES = Counter("ptutils_lease_expiries", "Expired leases found by reconcile.")
GPU_MEMORY = Gauge("ptutils_gpu_memory_bytes", "CUDA memory of a worker's device.",
                   ["device", "kind"], multiprocess_mode="livemax")


def _safe(fn: Callable[..., None]) -> Callable[..., None]:
    """Recording a metric must never fail the work it measures."""

    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:  # noqa: BLE001 - a metrics hiccup is logged, never raised
            log.exception("could not record a metric (%s)", fn.__name__)

    wrapper.__name__ = fn.__name__
    return wrapper


# --- exporters ---------------------------------------------------------------------------
class ChildrenExporter:
    """The launcher's exporter: sums what its worker processes wrote to `directory`."""

    def __init__(self, port: int, addr: str = "0.0.0.0") -> None:
        self.directory = tempfile.mkdtemp(prefix="ptutils-metrics-")
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.directory)
        self.server, self.thread = start_http_server(port, addr=addr, registry=registry)
        log.info("metrics on http://%s:%d/metrics", addr, port)

    def child_env(self) -> dict[str, str]:
        return {MULTIPROC_ENV: self.directory}

    def child_exited(self, pid: int) -> None:
        """Drop the live gauges of a worker process that exited (its counters stay)."""
        multiprocess.mark_process_dead(pid, self.directory)

    def close(self) -> None:
        self.server.shutdown()
        shutil.rmtree(self.directory, ignore_errors=True)


def serve_here(port: int, addr: str = "0.0.0.0") -> None:
    """Serve this process's own metrics (`ptutils reconcile`)."""
    start_http_server(port, addr=addr)
    log.info("metrics on http://%s:%d/metrics", addr, port)


# --- hooks -------------------------------------------------------------------------------
def instrument_store(store: Store) -> Store:
    """Count the bytes and time of every checkpoint this store writes."""
    put = store.put_checkpoint

    def put_checkpoint(session_id: str, step: int, kind: str, state: Any,
                       **kwargs: Any) -> dict[str, Any]:
        began = time.perf_counter()
        doc = put(session_id, step, kind, state, **kwargs)
        _checkpoint_written(kind, time.perf_counter() - began, doc)
        return doc

    store.put_checkpoint = put_checkpoint  # type: ignore[method-assign]
    return store


@_safe
def _checkpoint_written(kind: str, seconds: float, doc: dict[str, Any]) -> None:
    CHECKPOINT_SECONDS.labels(kind).observe(seconds)
    CHECKPOINT_BYTES.labels(kind).inc(int(doc.get("bytes_written") or 0))


@contextmanager
def task_timer(kind: str) -> Iterator[Callable[[Any, bool], None]]:
    """`with task_timer(kind) as done: outcome = ...; done(outcome, preempted)`."""
    began = time.perf_counter()
    yield lambda outcome, preempted: _task_done(kind, outcome, preempted,
                                                time.perf_counter() - began)


@_safe
def _task_done(kind: str, outcome: Any, preempted: bool, seconds: float) -> None:
    if outcome is None:
        TASKS.labels(kind, "noop").inc()
        return
    TASKS.labels(kind, "failed" if outcome.failed else "ran" if outcome.ran else "noop").inc()
    if kind == "train" and outcome.ran:
        CHUNK_SECONDS.observe(seconds)
        if preempted and any(t.kind == "train" for t in outcome.successors):
            REQUEUES.labels("preempt").inc()
    _gpu_memory()


def _gpu_memory() -> None:
    """CUDA memory of this process's devices, if it initialised CUDA (never initialise it
    here: a forked process must not find it initialised)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return
    for i in range(torch.cuda.device_count()):
        device = str(i)
        GPU_MEMORY.labels(device, "allocated").set(torch.cuda.memory_allocated(i))
        GPU_MEMORY.labels(device, "reserved").set(torch.cuda.memory_reserved(i))
        GPU_MEMORY.labels(device, "peak").set(torch.cuda.max_memory_allocated(i))
        torch.cuda.reset_peak_memory_stats(i)


class ReconcileMetrics:
    """`on_pass` of a reconcile loop: its requeues, and the sessions by status."""

    def __init__(self, store: Store, every: float = SESSIONS_EVERY_S) -> None:
        self.store = store
        self.every = every
        self._last = -float("inf")
        self._seen: set[str] = set()

    @_safe
    def __call__(self, done: list[Any]) -> None:
        for requeue in done:
            reason = _reason(requeue.reason)
            REQUEUES.labels(reason).inc()
            if reason == "lease_expired":
                LEASE_EXPIRIES.inc()
        if time.monotonic() - self._last >= self.every:
            self._last = time.monotonic()
            self.count_sessions()

    def count_sessions(self) -> None:
        counts = Tally(str(d.get("status")) for d in self.store.find_sessions())
        for status in self._seen - set(counts):
            SESSIONS.labels(status).set(0)
        for status, n in counts.items():
            SESSIONS.labels(status).set(n)
        self._seen |= set(counts)


def _reason(text: str) -> str:
    """reconcile's reason sentence -> a label value."""
    if "lease" in text and "expired" in text:
        return "lease_expired"
    if "no progress" in text:
        return "stalled"
    return "eval"
