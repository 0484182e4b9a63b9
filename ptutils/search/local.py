"""`ptutils search --local`: trials run in this process against the embedded store.

The same Engine task bodies `ptutils run` and the workers call. Tasks of the live
trials (at most `--parallel`) are interleaved one chunk at a time, first in first out,
so P trials progress together on one process; each trial keeps its own warm Engine.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from ptutils.engine import Engine
from ptutils.plan import train_task
from ptutils.protocol import Task
from ptutils.search.driver import eval_task
from ptutils.store.base import Store

log = logging.getLogger("ptutils.search")


class LocalExecutor:
    """Runs trial sessions' tasks in-process, round robin."""

    def __init__(self, store: Store) -> None:
        from ptutils.runner import local_worker_id

        self.store = store
        self.worker = local_worker_id()
        self.queue: deque[Task] = deque()
        self.engines: dict[str, Engine] = {}

    def start(self, doc: dict[str, Any]) -> None:
        self.engines.pop(doc["_id"], None)  # its checkpoint may have been replaced (PBT)
        task = train_task(doc)
        if task is not None:
            self.queue.append(task)

    def evaluate(self, doc: dict[str, Any], step: int) -> None:
        self.queue.append(eval_task(doc, step))

    def pump(self) -> bool:
        """Run the next task; its successors go to the back of the queue."""
        if not self.queue:
            return False
        task = self.queue.popleft()
        engine = self.engines.get(task.session)
        if engine is None:
            engine = self.engines[task.session] = Engine(self.store, worker=self.worker)
        outcome = engine.run(task)
        if outcome.retry_after is not None:
            self.queue.append(task)
        self.queue.extend(outcome.successors)
        if not any(t.session == task.session for t in self.queue):
            self.engines.pop(task.session, None)  # the trial is at a decision: free it
        return True
