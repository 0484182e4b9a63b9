"""Test helper listed under `imports:` by group test configs: one rank misbehaves at a step.

`RankFault(step=N, marker=PATH, rank=R, action=...)` acts in rank R when step N is
logged, unless the marker file exists (it creates it first, so the retried or resumed
run goes past step N): `kill` SIGKILLs that rank's own process, `kill_parent` SIGKILLs
its supervisor (the `ptutils run` process), `term_parent` sends it SIGTERM (a
preemption), `hang` sleeps forever.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence

from ptutils.callbacks import Callback
from ptutils.registry import register


@register
class RankFault(Callback):
    """Kill this rank, kill its supervisor, or hang, when `step` is logged on `rank`."""

    def __init__(self, step: int, marker: str, rank: int = 1, action: str = "kill") -> None:
        self.step, self.marker, self.rank, self.action = int(step), marker, int(rank), action

    def on_log(self, step: int, losses: Sequence[tuple[int, float]]) -> None:
        if int(os.environ.get("RANK", "0")) != self.rank or os.path.exists(self.marker):
            return
        if not any(s == self.step for s, _ in losses):
            return
        with open(self.marker, "w") as f:
            f.write(str(step))
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.action == "kill_parent":
            os.kill(os.getppid(), signal.SIGKILL)
        elif self.action == "term_parent":  # preemption: the supervisor gets SIGTERM
            os.kill(os.getppid(), signal.SIGTERM)
            time.sleep(1.0)  # the supervisor's stop request lands before the next step
        elif self.action == "hang":
            while True:
                time.sleep(3600)
