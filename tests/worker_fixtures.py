"""Callbacks for worker tests, listed under `imports:` by their configs (never library hooks).

`SlowSteps` makes the steps of the process it runs in slow ($PTUTILS_TEST_STEP_SECONDS
per step, set on the test's worker processes only) and records the last step it logged
in $PTUTILS_TEST_PROGRESS/<pid>, so a test can kill a worker in the middle of a chunk
and know where it was. It has no state and draws no random numbers: a reference
`ptutils run` of the same config, without the variables, computes the same numbers.
Two more variables narrow down which steps are slow, so a test waits only where it
needs slow steps: $PTUTILS_TEST_SLOW_FROM=N slows only the steps after step N (e.g. the
chunk a worker is to be stopped in), and $PTUTILS_TEST_SLOW_WHILE=PATH slows steps only
while the file PATH exists (the test deletes it once it saw what it waited for).

`KillWorkerAt(step)` SIGKILLs the process that runs `step`, on every attempt (a task
that always kills its worker: the poison case).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence

from ptutils.callbacks import Callback
from ptutils.registry import register

STEP_SECONDS_ENV = "PTUTILS_TEST_STEP_SECONDS"
PROGRESS_ENV = "PTUTILS_TEST_PROGRESS"
SLOW_FROM_ENV = "PTUTILS_TEST_SLOW_FROM"
SLOW_WHILE_ENV = "PTUTILS_TEST_SLOW_WHILE"


@register
class SlowSteps(Callback):
    """Record the step reached, then sleep $PTUTILS_TEST_STEP_SECONDS per logged step
    (only steps after $PTUTILS_TEST_SLOW_FROM, only while $PTUTILS_TEST_SLOW_WHILE exists)."""

    def on_log(self, step: int, losses: Sequence[tuple[int, float]]) -> None:
        folder = os.environ.get(PROGRESS_ENV)
        if folder:
            path = os.path.join(folder, str(os.getpid()))
            with open(f"{path}.tmp", "w") as f:
                f.write(str(step))
            os.replace(f"{path}.tmp", path)
        delay = float(os.environ.get(STEP_SECONDS_ENV) or 0)
        if not delay:
            return
        after = int(os.environ.get(SLOW_FROM_ENV) or 0)
        slow = sum(1 for s, _ in losses if s > after)
        hold = os.environ.get(SLOW_WHILE_ENV)
        if slow and (not hold or os.path.exists(hold)):
            time.sleep(delay * slow)


@register
class KillWorkerAt(Callback):
    """SIGKILL the running process when `step` is logged, on every attempt."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_log(self, step: int, losses: Sequence[tuple[int, float]]) -> None:
        if any(s == self.step for s, _ in losses):
            os.kill(os.getpid(), signal.SIGKILL)
