"""A progress bar for training: step/total, loss, steps/s, ETA."""

from __future__ import annotations

import sys
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainProgress:
    """Context manager; `update(session_id, step, loss)` is an Engine progress callback."""

    def __init__(self, doc: dict[str, Any], *, enabled: bool = True) -> None:
        self.enabled = enabled and sys.stderr.isatty() or enabled == "force"
        self.total = int(doc["total_steps"])
        self.start = int(doc["step"])
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} steps/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            disable=not self.enabled, transient=False,
        )
        self._task = self._progress.add_task(doc["name"], total=self.total, completed=self.start,
                                             loss="-", rate="-")

    def __enter__(self) -> TrainProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def update(self, session_id: str, step: int, loss: float) -> None:
        task = self._progress.tasks[0]
        speed = task.speed
        self._progress.update(self._task, completed=step, loss=f"{loss:.4f}",
                              rate=f"{speed:.0f}" if speed else "-")
