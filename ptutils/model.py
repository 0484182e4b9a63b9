"""`Model`: network + criterion + optimizer + LR scheduler, and one training step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ptutils.errors import ConfigError
from ptutils.module import Module, build, is_type_config


def _build_part(cfg: Any, where: str, **extra: Any) -> Any:
    if cfg is None or not isinstance(cfg, Mapping):
        return cfg
    if not is_type_config(cfg):
        raise ConfigError(f"{where}: needs a `type:` (e.g. torch.optim.SGD)")
    return build(cfg, where=where, **extra)


class Model(Module):
    """Holds the network and what trains it; `train_step(batch)` is its action.

    `optimizer` and `scheduler` stay configurations until the network exists (they
    need its parameters). The scheduler steps once per training step.
    """

    lazy_config = ("optimizer", "scheduler")

    def __init__(
        self,
        network: nn.Module,
        criterion: nn.Module | None = None,
        optimizer: Mapping[str, Any] | torch.optim.Optimizer | None = None,
        scheduler: Mapping[str, Any] | Any | None = None,
        clip_grad_norm: float | None = None,
        amp: bool = False,
        input_key: str = "x",
        target_key: str = "y",
    ) -> None:
        if not isinstance(network, nn.Module):
            raise ConfigError(
                f"model.network must build a torch.nn.Module, got {type(network).__name__}"
            )
        self.network = network
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        params = [p for p in network.parameters() if p.requires_grad]
        if optimizer is None:
            optimizer = {"type": "torch.optim.SGD", "lr": 0.01}
        self.optimizer = _build_part(optimizer, "model.optimizer", params=params)
        self.scheduler = _build_part(scheduler, "model.scheduler", optimizer=self.optimizer)
        self.clip_grad_norm = clip_grad_norm
        self.input_key = input_key
        self.target_key = target_key
        self.amp = bool(amp)
        self._scaler: torch.amp.GradScaler | None = None

    @property
    def device(self) -> torch.device:
        p = next(self.network.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def to(self, device: str | torch.device) -> Model:
        self.network.to(device)
        if self.amp and torch.device(device).type == "cuda":
            self.scaler = torch.amp.GradScaler("cuda")
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    __call__ = forward

    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, outputs) of a batch, without touching gradients."""
        out = self.network(batch[self.input_key])
        return self.criterion(out, batch[self.target_key]), out

    def train_step(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One optimisation step; returns the (detached) loss, left on its device."""
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        scaler = self.__dict__.get("scaler")
        if scaler is not None:
            with torch.autocast("cuda"):
                loss, _ = self.loss(batch)
            scaler.scale(loss).backward()
            if self.clip_grad_norm:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(self.network.parameters(), self.clip_grad_norm)
            scaler.step(opt)
            scaler.update()
        else:
            loss, _ = self.loss(batch)
            loss.backward()
            if self.clip_grad_norm:
                nn.utils.clip_grad_norm_(self.network.parameters(), self.clip_grad_norm)
            opt.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return loss.detach()

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])
