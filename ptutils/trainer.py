"""`Trainer` runs training steps and chunks; `Evaluator` runs named validation targets."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ptutils.callbacks import Callbacks
from ptutils.data import DataProvider
from ptutils.errors import ConfigError
from ptutils.model import Model
from ptutils.module import Module
from ptutils.state import History, Statistic

ProgressFn = Callable[[int, float], None]


class Trainer(Module):
    """Steps a Model on the DataProvider's train stream; its action is `step()`.

    Loss values stay on the device and are fetched every `log_every` steps in one
    transfer, so logging costs one sync per interval, not one per step. Log points fall
    on multiples of `log_every` and on chunk ends only: a run stopped between them
    (preemption) carries its unlogged losses in its State, so a resumed run logs, and
    fires `on_log`, exactly where an uninterrupted one does.
    """

    def __init__(self, model: Model, data: DataProvider, log_every: int = 10) -> None:
        self.model = model
        self.data = data
        self.log_every = max(1, int(log_every))
        self._pending: list[torch.Tensor] = []
        self._carried: list[float] = []
        self._reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    def reduce_losses_with(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """In a group (ptutils.group), `reduce` averages a 1-D tensor of losses over the
        ranks; logged and carried losses are then the group's (one collective per log
        interval, called by every rank at the same steps)."""
        self._reduce = reduce

    def extra_state(self) -> dict[str, Any]:
        return {"pending_losses": self._carried + self._pending_values()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._pending = []
        self._carried = [float(v) for v in state.get("pending_losses", [])]

    def _pending_values(self) -> list[float]:
        if not self._pending:  # the same on every rank of a group: no collective
            return []
        losses = torch.stack(self._pending).float()
        if self._reduce is not None:  # every rank calls this at the same steps
            return self._reduce(losses).tolist()
        return losses.tolist()

    def step(self, device: torch.device | None = None) -> torch.Tensor:
        """One training step on the next `model.accumulate` batches; the detached (mean)
        loss. An `interval: epoch` scheduler steps when the train stream finishes an
        epoch: `epochs_completed()` is a function of the data position, so a resumed run
        steps it where an uninterrupted one does."""
        model, data = self.model, self.data
        if device is None:
            device = model.device
        per_epoch = model.scheduler is not None and model.interval == "epoch"
        before = data.epochs_completed() if per_epoch else 0
        if model.accumulate == 1:
            loss = model.train_step(_to_device(data.next_batch(), device))
        else:
            loss = model.train_step(
                [_to_device(data.next_batch(), device) for _ in range(model.accumulate)]
            )
        if per_epoch:
            model.epochs_ended(data.epochs_completed() - before)
        return loss


    def run(
        self,
        start: int,
        stop: int,
        *,
        callbacks: Callbacks,
        history: History,
        stop_flag: threading.Event | None = None,
        progress: ProgressFn | None = None,
    ) -> tuple[int, list[Statistic]]:
        """Run steps `start+1 .. stop` (or until `stop_flag`); (step reached, train stats)."""
        self.model.network.train()
        device = self.model.device  # looked up once a run, not once a step
        stats: list[Statistic] = []
        step = start
        while step < stop:
            if stop_flag is not None and stop_flag.is_set():
                break
            self._pending.append(self.step(device))
            step += 1
            if step % self.log_every == 0 or step == stop:
                self._flush(step, callbacks, history, stats, progress)
        return step, stats

    def _flush(
        self,
        step: int,
        callbacks: Callbacks,
        history: History,
        stats: list[Statistic],
        progress: ProgressFn | None,
    ) -> None:
        values = self._carried + self._pending_values()
        self._pending, self._carried = [], []
        first = step - len(values) + 1
        losses = list(zip(range(first, step + 1), values))
        lr = self.model.lr()
        for s, v in losses:
            history.add("loss", v, s)
            stats.append(Statistic("loss", v, s))
        history.add("lr", lr, step)
        stats.append(Statistic("lr", lr, step))
        callbacks.fire("on_log", step, losses)
        if progress is not None:
            progress(step, values[-1])


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device
               ) -> Mapping[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _accuracy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.argmax(dim=-1) == y).sum()


def _top5(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    k = min(5, out.shape[-1])
    return (out.topk(k, dim=-1).indices == y.unsqueeze(-1)).any(dim=-1).sum()


METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "accuracy": _accuracy,
    "top5": _top5,
}
"""Per-batch metric sums; `loss` is always available (the model's criterion)."""


class Evaluator(Module):
    """Named validation targets, each a dataset and its metrics (tfutils' validation_params).

    `targets: {test: {data: test, metrics: [loss, accuracy]}}` gives statistics
    `test/loss` and `test/accuracy`, averaged over every example of the set.
    """

    def __init__(self, targets: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.targets: dict[str, dict[str, Any]] = {}
        for name, spec in (targets or {}).items():
            if not isinstance(spec, Mapping):
                raise ConfigError(
                    f"eval.targets.{name}: expected a mapping with `data:` and `metrics:`"
                )
            unknown = set(spec) - {"data", "metrics"}
            if unknown:
                raise ConfigError(
                    f"eval.targets.{name}: unknown key(s) {sorted(unknown)}; valid: data, metrics"
                )
            metrics = list(spec.get("metrics", ["loss", "accuracy"]))
            for m in metrics:
                if m != "loss" and m not in METRICS:
                    raise ConfigError(
                        f"eval.targets.{name}.metrics: unknown metric {m!r}; "
                        f"valid: loss, {', '.join(METRICS)}"
                    )
            self.targets[name] = {"data": spec.get("data", name), "metrics": metrics}

    def metric_names(self) -> list[str]:
        """The statistics an eval produces: `target/metric` for every target and metric."""
        return [f"{name}/{m}" for name, spec in self.targets.items() for m in spec["metrics"]]

    def check(self, data: DataProvider) -> None:
        """Every target names a dataset the provider has."""
        names = set(data.dataset_names())
        for name, spec in self.targets.items():
            if spec["data"] not in names:
                raise ConfigError(
                    f"eval.targets.{name}.data: no dataset {spec['data']!r}; "
                    f"data.datasets has {', '.join(sorted(names))}"
                )

    @torch.no_grad()
    def evaluate(self, model: Model, data: DataProvider) -> dict[str, float]:
        """Metrics of every target, as `target/metric` -> mean over the set."""
        was_training = model.network.training
        model.network.eval()
        results: dict[str, float] = {}
        try:
            for name, spec in self.targets.items():
                results.update(self._run_target(name, spec["metrics"], model, data, spec["data"]))
        finally:
            model.network.train(was_training)
        return results

    def _run_target(
        self, name: str, metrics: Sequence[str], model: Model, data: DataProvider, dataset: str
    ) -> dict[str, float]:
        sums = {m: torch.zeros((), dtype=torch.float64) for m in metrics}
        count = 0
        device = model.device
        for batch in data.provide(dataset):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, out = model.loss(batch)
            n = int(batch[model.target_key].shape[0])
            y = batch[model.target_key]
            for m in metrics:
                value = loss * n if m == "loss" else METRICS[m](out, y)
                sums[m] += value.double().cpu()
            count += n
        return {f"{name}/{m}": float(s) / max(count, 1) for m, s in sums.items()}
