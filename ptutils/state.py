"""Metamodules: `State` (identity), `Status` (transient), `Statistic` and `History`."""

from __future__ import annotations

import math
import time
import traceback
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class State(dict):
    """A dict with dot access; `State(state) is state` (the identity of a Module tree)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> State:
        if len(args) == 1 and not kwargs and isinstance(args[0], State):
            return args[0]
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) == 1 and not kwargs and args[0] is self:
            return
        super().__init__(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            value = self[name]
        except KeyError:
            raise AttributeError(name) from None
        if isinstance(value, dict) and not isinstance(value, State):
            value = State(value)
            self[name] = value
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts (for the codec, which stores dicts)."""
        return {k: v.to_dict() if isinstance(v, State) else v for k, v in self.items()}


class Phase(StrEnum):
    """What a Module is doing now."""

    CONFIGURED = "configured"
    RESTORED = "restored"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


@dataclass
class Status:
    """Transient status of a running Module: phase, and the exception when it failed."""

    phase: Phase = Phase.CONFIGURED
    error: str | None = None
    traceback: str | None = None

    def fail(self, exc: BaseException) -> None:
        self.phase = Phase.FAILED
        self.error = f"{type(exc).__name__}: {exc}"
        self.traceback = "".join(traceback.format_exception(exc))


@dataclass(frozen=True)
class Statistic:
    """A named quantity computed at a step."""

    name: str
    value: float
    step: int
    phase: str = "train"
    time: float = field(default_factory=time.time)


HISTORY_WINDOW = 1000
"""Points a History keeps per (phase, name): the recent window, whatever the run's length.
The full series live in the store's statistics (DESIGN §5), so a checkpoint stays small."""


class History:
    """The recent Statistics of a run; its state is part of the State.

    Each (phase, name) series keeps its last `window` points (column-wise), so a State
    stays the same size at step 100 and at step 1,000,000: the whole series is in the
    store's statistics. A resumed run holds exactly the points an uninterrupted one
    holds (the last `window` of the same series).
    """

    def __init__(self, window: int = HISTORY_WINDOW) -> None:
        if int(window) < 1:
            raise ValueError(f"History window must be >= 1, got {window!r}")
        self.window = int(window)
        self._series: dict[tuple[str, str], tuple[deque[int], deque[float]]] = {}

    def _column(self, key: tuple[str, str]) -> tuple[deque[int], deque[float]]:
        col = self._series.get(key)
        if col is None:
            col = self._series[key] = (deque(maxlen=self.window), deque(maxlen=self.window))
        return col

    def add(self, name: str, value: float, step: int, phase: str = "train") -> None:
        steps, values = self._column((phase, name))
        steps.append(int(step))
        values.append(float(value))

    def extend(self, stats: Iterable[Statistic]) -> None:
        for s in stats:
            self.add(s.name, s.value, s.step, s.phase)

    def series(self, name: str, phase: str = "train") -> tuple[list[int], list[float]]:
        """The recent (steps, values) of one series (the store has the whole of it)."""
        steps, values = self._series.get((phase, name), ((), ()))
        return list(steps), list(values)

    def last(self, name: str, phase: str = "train", default: float = math.nan) -> float:
        values = self._series.get((phase, name), ((), ()))[1]
        return values[-1] if values else default

    def names(self) -> list[tuple[str, str]]:
        return sorted(self._series)

    def truncate(self, step: int) -> None:
        """Drop entries after `step` (a resumed run replays them)."""
        for steps, values in self._series.values():
            while steps and steps[-1] > step:
                steps.pop()
                values.pop()

    def __iter__(self) -> Iterator[Statistic]:
        for (phase, name), (steps, values) in sorted(self._series.items()):
            for s, v in zip(steps, values):
                yield Statistic(name, v, s, phase, 0.0)

    def __len__(self) -> int:
        return sum(len(s) for s, _ in self._series.values())

    def state_dict(self) -> dict[str, Any]:
        return {
            f"{phase}/{name}": {"steps": list(steps), "values": list(values)}
            for (phase, name), (steps, values) in self._series.items()
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore; a State written before the window existed keeps only its last points."""
        self._series = {}
        for key, col in state.items():
            phase, _, name = key.partition("/")
            steps, values = self._column((phase, name))
            steps.extend(int(s) for s in col["steps"])
            values.extend(float(v) for v in col["values"])
