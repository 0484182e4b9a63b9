"""The files through which a supervisor and its ranks talk: a stop request, per-rank
heartbeats and results, and rank 0's progress lines. All live in one private folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

BEAT_WIDTH = 40
"""Bytes of a heartbeat record (`PHASE COUNT`, padded): rewritten in place every step."""

PHASES = ("start", "train", "save", "done")
"""What a rank is doing: `train` is watched with the hang timeout, the others with the
(longer) startup timeout: building, loading and writing a State take their time."""


class GroupFiles:
    """Paths of one group run's folder, and the small reads and writes on them."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @property
    def spec(self) -> Path:
        return self.root / "spec.json"

    @property
    def stop(self) -> Path:
        return self.root / "stop"

    @property
    def progress(self) -> Path:
        return self.root / "progress"

    def beat_path(self, rank: int) -> Path:
        return self.root / f"beat.{rank}"

    def result_path(self, rank: int) -> Path:
        return self.root / f"result.{rank}.json"

    def log_path(self, rank: int) -> Path:
        return self.root / f"rank.{rank}.log"

    # --- supervisor side ---------------------------------------------------------------
    def request_stop(self) -> None:
        self.stop.touch()

    def read_beat(self, rank: int) -> tuple[str, int] | None:
        """(phase, count) of a rank's last heartbeat; None before its first."""
        try:
            text = self.beat_path(rank).read_text()
        except FileNotFoundError:
            return None
        parts = text.split()
        if len(parts) != 2 or parts[0] not in PHASES or not parts[1].isdigit():
            return None  # a record being rewritten: the next poll reads it whole
        return parts[0], int(parts[1])

    def read_result(self, rank: int) -> dict[str, Any] | None:
        try:
            return json.loads(self.result_path(rank).read_text())  # type: ignore[no-any-return]
        except (FileNotFoundError, ValueError):
            return None

    # --- rank side ---------------------------------------------------------------------
    def write_result(self, rank: int, result: dict[str, Any]) -> None:
        tmp = self.result_path(rank).with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, self.result_path(rank))


class Beat:
    """A rank's heartbeat: one fixed-width record rewritten in place (no truncation)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        self.count = 0

    def __call__(self, phase: str) -> None:
        self.count += 1
        record = f"{phase} {self.count}".ljust(BEAT_WIDTH - 1) + "\n"
        os.pwrite(self._fd, record.encode(), 0)

    def close(self) -> None:
        os.close(self._fd)
