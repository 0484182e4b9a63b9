"""Metamodules: `State` (identity), `Status` (transient), `Statistic` and `History`."""

from __future__ import annotations

import math
import time
import traceback
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


class History:
    """The sequence of Statistics of a run; its state is part of the State.

    Stored column-wise per (phase, name) so a long run stays compact.
    """

    def __init__(self) -> None:
        self._series: dict[tuple[str, str], tuple[list[int], list[float]]] = {}

    def add(self, name: str, value: float, step: int, phase: str = "train") -> None:
        steps, values = self._series.setdefault((phase, name), ([], []))
        steps.append(int(step))
        values.append(float(value))

    def extend(self, stats: Iterable[Statistic]) -> None:
        for s in stats:
            self.add(s.name, s.value, s.step, s.phase)

    def series(self, name: str, phase: str = "train") -> tuple[list[int], list[float]]:
        steps, values = self._series.get((phase, name), ([], []))
        return list(steps), list(values)

    def last(self, name: str, phase: str = "train", default: float = math.nan) -> float:
        values = self._series.get((phase, name), ([], []))[1]
        return values[-1] if values else default

    def names(self) -> list[tuple[str, str]]:
        return sorted(self._series)

    def truncate(self, step: int) -> None:
        """Drop entries after `step` (a resumed run replays them)."""
        for _key, (steps, values) in list(self._series.items()):
            keep = sum(1 for s in steps if s <= step)
            del steps[keep:]
            del values[keep:]

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
        self._series = {}
        for key, col in state.items():
            phase, _, name = key.partition("/")
            self._series[(phase, name)] = (list(col["steps"]), list(col["values"]))
