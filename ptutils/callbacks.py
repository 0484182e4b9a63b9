"""Callbacks: trigger name -> handlers, and the stock ones (DESIGN §3).

A callback is a Module whose hooks do nothing unless overridden (dramatiq middleware,
sacred observers). Hooks fire at fixed points of the plan, never "when a worker
happens to finish", so a run's outcome does not depend on timing:

- `on_log(step, losses)`: every `log_every` steps with the losses since the last call
  (a list of (step, value)); the loss values are fetched from the device in one batch.
- `on_chunk_end(step)`: after the last step of a Train chunk, before the checkpoint.
- `on_eval_end(step, metrics)`: with the eval metrics of step `step`, delivered in step
  order at the start of the next-but-one Train chunk (the local runner and the workers
  deliver them identically).

A callback asks the run to stop by setting `stop_reason`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from ptutils.errors import ConfigError, HiLossError, NanLossError
from ptutils.module import Module
from ptutils.plan import DEFAULT_MODE, MODES

TRIGGERS = ("on_log", "on_chunk_end", "on_eval_end")
"""Trigger names a callback may handle."""



class Callback(Module):
    """Base class: every hook is a no-op; subclasses override what they need."""

    stop_reason: str | None = None

    def on_log(self, step: int, losses: Sequence[tuple[int, float]]) -> None:
        """Losses since the last call, as (step, value)."""

    def on_chunk_end(self, step: int) -> None:
        """A Train chunk ended at `step` (before its checkpoint is written)."""

    def on_eval_end(self, step: int, metrics: dict[str, float]) -> None:
        """Eval metrics of the checkpoint at `step` (`target/metric` names)."""


class Callbacks(Module):
    """An ordered collection of callbacks; fires a trigger on each in turn."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self._items: list[Callback] = []
        self._hooks: list[Callback] = []
        for i, cb in enumerate(callbacks):
            if not isinstance(cb, Callback):
                raise ConfigError(f"callbacks[{i}]: {type(cb).__name__} is not a Callback")
            self._items.append(cb)
            setattr(self, f"cb{i}_{type(cb).__name__}", cb)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def attach(self, hook: Callback) -> None:
        """Add a hook of ptutils' own (a `monitor:` scheduler): fired before the configured
        callbacks, at the same fixed points; not part of the State nor of the config."""
        self._hooks.append(hook)

    def fire(self, trigger: str, *args: Any) -> None:
        if trigger not in TRIGGERS:
            raise ValueError(f"unknown trigger {trigger!r}; known: {', '.join(TRIGGERS)}")
        for cb in (*self._hooks, *self._items):
            getattr(cb, trigger)(*args)

    @property
    def stop_reason(self) -> str | None:
        return next((cb.stop_reason for cb in self._items if cb.stop_reason), None)

    def to_config(self) -> dict[str, Any]:
        return {
            "type": "ptutils.callbacks.Callbacks",
            "callbacks": [cb.to_config() for cb in self._items],
        }


class NanDetector(Callback):
    """Raise `NanLossError` as soon as a logged loss is NaN or infinite."""

    def on_log(self, step: int, losses: Sequence[tuple[int, float]]) -> None:
        for s, v in losses:
            if not math.isfinite(v):
                raise NanLossError(
                    f"the training loss is {v} at step {s}. The last checkpoint before it is "
                    "kept. Lower the learning rate (model.optimizer.lr), set "
                    "model.clip_grad_norm, or check the data for NaN/inf values."
                )


class LossThreshold(Callback):
    """Raise `HiLossError` when the loss rises above `threshold` (after `warmup` steps)."""

    def __init__(self, threshold: float, warmup: int = 0) -> None:
        self.threshold = float(threshold)
        self.warmup = int(warmup)

    def on_log(self, step: int, losses: Sequence[tuple[int, float]]) -> None:
        for s, v in losses:
            if s > self.warmup and v > self.threshold:
                raise HiLossError(
                    f"the training loss {v:.4g} at step {s} is above the threshold "
                    f"{self.threshold:g} (callbacks LossThreshold). Lower the learning rate "
                    "or raise the threshold."
                )


class _MetricWatcher(Callback):
    """Tracks the best value of one eval metric; state: best value and its step."""

    def __init__(self, metric: str, mode: str = DEFAULT_MODE) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode must be 'min' or 'max', got {mode!r}")
        self.metric = metric
        self.mode = mode
        self.best: float | None = None
        self.best_step: int | None = None

    def improved(self, value: float, min_delta: float = 0.0) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - min_delta
        return value > self.best + min_delta

    def value_of(self, metrics: dict[str, float]) -> float | None:
        if self.metric not in metrics:
            return None
        return float(metrics[self.metric])

    def extra_state(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")
        self.best_step = state.get("best_step")


class BestCheckpoint(_MetricWatcher):
    """Remembers which checkpoint step has the best `metric` (kept by retention)."""

    def on_eval_end(self, step: int, metrics: dict[str, float]) -> None:
        value = self.value_of(metrics)
        if value is not None and self.improved(value):
            self.best, self.best_step = value, step


class EarlyStopping(_MetricWatcher):
    """Stop when `metric` has not improved by `min_delta` for `patience` evals."""

    def __init__(
        self, metric: str, mode: str = DEFAULT_MODE, patience: int = 3, min_delta: float = 0.0
    ) -> None:
        super().__init__(metric, mode)
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.bad_evals = 0

    def on_eval_end(self, step: int, metrics: dict[str, float]) -> None:
        value = self.value_of(metrics)
        if value is None:
            return
        if self.improved(value, self.min_delta):
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        if self.bad_evals >= self.patience:
            self.stop_reason = (
                f"early stopping: {self.metric} did not improve for {self.patience} evals "
                f"(best {self.best:.4g} at step {self.best_step})"
            )

    def extra_state(self) -> dict[str, Any]:
        return {
            **super().extra_state(),
            "bad_evals": self.bad_evals,
            "stop_reason": self.stop_reason,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.bad_evals = int(state.get("bad_evals", 0))
        self.stop_reason = state.get("stop_reason")
