"""`Model`: network + criterion + optimizer + LR scheduler, and one training step."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ptutils.errors import ConfigError
from ptutils.module import Module, build, is_type_config

AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""`model.amp` values and the autocast dtype each runs the forward pass in."""

INTERVALS = ("step", "epoch")
"""When a scheduler without `monitor:` steps: after every training step, or when the
train stream finishes an epoch."""


def _build_part(cfg: Any, where: str, **extra: Any) -> Any:
    if cfg is None or not isinstance(cfg, Mapping):
        return cfg
    if not is_type_config(cfg):
        raise ConfigError(f"{where}: needs a `type:` (e.g. torch.optim.SGD)")
    return build(cfg, where=where, **extra)


def amp_mode(amp: Any) -> str | None:
    """The `model.amp` setting as None, "bf16" or "fp16"; a ConfigError for anything else."""
    if amp is None or amp is False:
        return None
    if amp is True:
        raise ConfigError(
            "model.amp: `true` does not say which precision; choose `bf16` (bfloat16 "
            "autocast, no loss scaling: CPUs and Ampere or newer GPUs) or `fp16` (float16 "
            "autocast with a GradScaler), or `false` for full precision."
        )
    if isinstance(amp, str) and amp in AMP_DTYPES:
        return amp
    raise ConfigError(f"model.amp: unknown value {amp!r}; valid: false, bf16, fp16.")


def amp_problem(mode: str, device: str | torch.device) -> str | None:
    """Why `model.amp: mode` cannot run on `device`, or None. What this machine cannot
    see (a CUDA device on a CPU-only machine) passes; the worker checks it at its build."""
    kind = torch.device(device).type
    if not torch.amp.is_autocast_available(kind):
        return f"this torch has no autocast for {kind} devices"
    if kind == "cuda":
        if not torch.cuda.is_available():
            return None
        dev = torch.device(device)
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if mode == "bf16":
            with torch.cuda.device(index):
                native = torch.cuda.is_bf16_supported(including_emulation=False)
            if not native:
                name = torch.cuda.get_device_name(index)
                return f"the CUDA device {index} ({name}) has no native bfloat16 support"
        return None
    if mode == "fp16":
        try:
            scaler = torch.amp.GradScaler(kind)
        except (RuntimeError, ValueError, AssertionError) as exc:
            return f"torch.amp.GradScaler({kind!r}) is not available ({exc})"
        if not scaler.is_enabled():
            return f"torch.amp.GradScaler({kind!r}) is disabled on this machine"
    return None


class Model(Module):
    """Holds the network and what trains it; `train_step(batches)` is its action.

    `optimizer` and `scheduler` stay configurations until the network exists (they
    need its parameters). `scheduler` may hold two keys of ptutils' own, removed before
    the scheduler is built: `interval` (`step`: after every training step, the
    default; `epoch`: when the train stream finishes an epoch, see `epochs_ended`) and
    `monitor` (an eval metric fed to `ReduceLROnPlateau.step(value)`, see `eval_end`).
    Under `amp: fp16` the GradScaler is the child `scaler`, so its state is checkpointed.
    """

    lazy_config = ("optimizer", "scheduler")

    def __init__(
        self,
        network: nn.Module,
        criterion: nn.Module | None = None,
        optimizer: Mapping[str, Any] | torch.optim.Optimizer | None = None,
        scheduler: Mapping[str, Any] | Any | None = None,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        amp: str | bool | None = None,
        accumulate: int = 1,
        input_key: str = "x",
        target_key: str = "y",
    ) -> None:
        if not isinstance(network, nn.Module):
            raise ConfigError(
                f"model.network must build a torch.nn.Module, got {type(network).__name__}"
            )
        self.amp = amp_mode(amp)
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise ConfigError(
                f"model.accumulate: the number of micro-batches per training step, a positive "
                f"integer (got {accumulate!r})"
            )
        self.accumulate = accumulate
        self.clip_grad_norm = _positive_or_none(clip_grad_norm, "clip_grad_norm")
        self.clip_grad_value = _positive_or_none(clip_grad_value, "clip_grad_value")
        self.network = network
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        params = [p for p in network.parameters() if p.requires_grad]
        if optimizer is None:
            optimizer = {"type": "torch.optim.SGD", "lr": 0.01}
        self.optimizer = _build_part(optimizer, "model.optimizer", params=params)
        self.interval, self.monitor, scheduler = _schedule_keys(scheduler)
        self.scheduler = _build_part(scheduler, "model.scheduler", optimizer=self.optimizer)
        _check_monitor(self.scheduler, self.monitor)
        self.input_key = input_key
        self.target_key = target_key
        if self.amp == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)

    @property
    def device(self) -> torch.device:
        p = next(self.network.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def check_device(self, device: str | torch.device) -> None:
        """ConfigError if `model.amp` cannot run on `device` (the session's device)."""
        if self.amp is None:
            return
        try:
            problem = amp_problem(self.amp, device)
        except RuntimeError as exc:  # torch.device("bogus")
            raise ConfigError(f"session.device: {device!r} is not a torch device ({exc})") from exc
        if problem:
            raise ConfigError(
                f"model.amp: {self.amp} cannot run on session.device {str(device)!r}: "
                f"{problem}. Choose another model.amp (bf16, fp16, or false) or device."
            )

    def to(self, device: str | torch.device) -> Model:
        self.network.to(device)
        scaler = self.__dict__.get("scaler")
        kind = torch.device(device).type
        if scaler is not None and getattr(scaler, "_device", kind) != kind:
            moved = torch.amp.GradScaler(kind)
            moved.load_state_dict(scaler.state_dict())
            self.scaler = moved
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    __call__ = forward

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The `model.amp` autocast context on the network's device (a no-op without amp)."""
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.amp])

    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, outputs) of a batch under `model.amp`, without touching gradients."""
        with self.autocast():
            out = self.network(batch[self.input_key])
            return self.criterion(out, batch[self.target_key]), out

    def train_step(
        self, batches: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]]
    ) -> torch.Tensor:
        """One optimisation step over one batch, or the K micro-batches of an accumulated
        step (each loss scaled by 1/K, one optimizer step after the K backwards; clipping
        applies to the summed gradient). Returns the mean loss, detached, on its device."""
        if isinstance(batches, Mapping) and self.amp is None and not self.clip_grad_value \
                and not self.clip_grad_norm:
            return self._plain_step(batches)
        micro = [batches] if isinstance(batches, Mapping) else list(batches)
        if not micro:
            raise ValueError("train_step: no batch")
        opt = self.optimizer
        scaler: torch.amp.GradScaler | None = self.__dict__.get("scaler")
        opt.zero_grad(set_to_none=True)
        losses = []
        # Under DistributedDataParallel the gradients of the first K-1 micro-batches stay
        # local (`no_sync`); the last backward all-reduces their sum: one all-reduce a step.
        no_sync = getattr(self.network, "no_sync", None)
        for i, batch in enumerate(micro):
            local = no_sync is not None and i < len(micro) - 1
            with no_sync() if local else contextlib.nullcontext():
                loss, _ = self.loss(batch)
                scaled = loss / len(micro) if len(micro) > 1 else loss
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            losses.append(loss.detach())
        if self.clip_grad_value or self.clip_grad_norm:
            if scaler is not None:
                scaler.unscale_(opt)
            params = [p for p in self.network.parameters() if p.grad is not None]
            if self.clip_grad_value:
                nn.utils.clip_grad_value_(params, self.clip_grad_value)
            if self.clip_grad_norm:
                nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        stepped = True
        if scaler is not None:
            scale = scaler.get_scale()  # step() syncs on found_inf anyway: no extra stall
            scaler.step(opt)
            scaler.update()
            stepped = scaler.get_scale() >= scale  # lowered: inf/NaN gradients, step skipped
        else:
            opt.step()
        if stepped and self.scheduler is not None and self.interval == "step" \
                and self.monitor is None:  # a skipped fp16 step does not advance the schedule
            self.scheduler.step()
        if len(losses) == 1:
            return losses[0]
        return torch.stack([v.float() for v in losses]).mean()

    def _plain_step(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """`train_step` of one batch without amp or clipping: what a hand-written loop
        does, and no more (this is the per-step path of most runs)."""
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        loss = self.criterion(self.network(batch[self.input_key]), batch[self.target_key])
        loss.backward()
        opt.step()
        if self.scheduler is not None and self.interval == "step" and self.monitor is None:
            self.scheduler.step()
        return loss.detach()

    def epochs_ended(self, count: int) -> None:
        """The train stream finished `count` epochs during the last step: an
        `interval: epoch` scheduler steps once for each."""
        if self.scheduler is not None and self.interval == "epoch" and self.monitor is None:
            for _ in range(count):
                self.scheduler.step()

    def eval_end(self, step: int, metrics: Mapping[str, float]) -> None:
        """Eval metrics of the checkpoint at `step`, at the plan's fixed delivery point:
        a `monitor:` scheduler steps with its metric."""
        if self.scheduler is None or self.monitor is None:
            return
        if self.monitor not in metrics:
            raise ConfigError(
                f"model.scheduler.monitor: the eval at step {step} has no {self.monitor!r}; "
                f"it has {', '.join(sorted(metrics))}"
            )
        self.scheduler.step(float(metrics[self.monitor]))

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def _positive_or_none(value: Any, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"model.{key}: a positive number, or null for none (got {value!r})")
    return float(value)


def _schedule_keys(scheduler: Any) -> tuple[str, str | None, Any]:
    """(interval, monitor, the scheduler config without them)."""
    if not isinstance(scheduler, Mapping):
        return "step", None, scheduler
    cfg = dict(scheduler)
    interval = cfg.pop("interval", None)
    monitor = cfg.pop("monitor", None)
    if interval is not None and interval not in INTERVALS:
        raise ConfigError(
            f"model.scheduler.interval: {interval!r}; valid: step (after every training "
            "step, the default) or epoch (when the train stream finishes an epoch)"
        )
    if monitor is not None:
        if not isinstance(monitor, str) or "/" not in monitor:
            raise ConfigError(
                f"model.scheduler.monitor: an eval metric as `target/metric` (e.g. "
                f"test/loss), got {monitor!r}"
            )
        if interval is not None:
            raise ConfigError(
                "model.scheduler.interval: a scheduler with `monitor:` steps when the eval "
                "results of session.eval_every arrive; remove `interval`."
            )
    return interval or "step", monitor, cfg


def _check_monitor(scheduler: Any, monitor: str | None) -> None:
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    if plateau and monitor is None:
        raise ConfigError(
            "model.scheduler.monitor: ReduceLROnPlateau steps on an eval metric; name it, "
            "e.g. `monitor: test/loss` (a `target/metric` of eval.targets)."
        )
    if monitor is not None and not plateau:
        raise ConfigError(
            f"model.scheduler.monitor: only ReduceLROnPlateau steps on a metric; "
            f"{type(scheduler).__name__} steps by time (remove `monitor`, or use "
            "`interval: step|epoch`)."
        )

