"""Callbacks for worker tests, listed under `imports:` by their configs (never library hooks).

`SlowSteps(seconds)` sleeps after every logged step, so a chunk lasts long enough to be
killed in its middle; it has no state and draws no random numbers, so it changes
nothing in the arithmetic. `KillWorkerAt(step)` SIGKILLs the process that runs the step,
every time (a task that always kills its worker: the poison case).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence

from ptutils.callbacks import Callback
from ptutils.registry import register


@register
class SlowSteps(Callback):
    """Sleep `seconds` at every log point (log_every: 1 makes it every step)."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = float(seconds)

    def on_log(self, step: int, losses: Sequence[tuple[int, float]]) -> None:
        time.sleep(self.seconds * len(losses))


@register
class KillWorkerAt(Callback):
    """SIGKILL the running process when `step` is logged, on every attempt."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_log(self, step: int, losses: Sequence[tuple[int, float]]) -> None:
        if any(s == self.step for s, _ in losses):
            os.kill(os.getpid(), signal.SIGKILL)
