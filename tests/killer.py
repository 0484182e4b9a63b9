"""Test helper listed under `imports:` by test configs: kills its own process at a step.

`KillAt(step=N, marker=PATH)` sends SIGKILL to the training process when step N is
logged, unless the marker file exists; it creates the marker first, so the resumed
run (same config, same hash) goes past step N.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence

from ptutils.callbacks import Callback
from ptutils.registry import register


@register
class KillAt(Callback):
    """SIGKILL this process when `step` is logged (once per marker file)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = int(step)
        self.marker = marker

    def on_log(self, step: int, losses: Sequence[tuple[int, float]]) -> None:
        if any(s == self.step for s, _ in losses) and not os.path.exists(self.marker):
            with open(self.marker, "w") as f:
                f.write(str(step))
            os.kill(os.getpid(), signal.SIGKILL)


@register
class SignalAt(Callback):
    """Send `signal` (a name: SIGSTOP, ...) to process `pid` when `step` is logged
    (once per marker file): e.g. freeze the store's server under a run."""

    def __init__(self, step: int, pid: int, signal: str, marker: str) -> None:
        self.step, self.pid, self.signal, self.marker = int(step), int(pid), signal, marker

    def on_log(self, step: int, losses: Sequence[tuple[int, float]]) -> None:
        if any(s == self.step for s, _ in losses) and not os.path.exists(self.marker):
            with open(self.marker, "w") as f:
                f.write(str(step))
            os.kill(self.pid, getattr(signal, self.signal))
