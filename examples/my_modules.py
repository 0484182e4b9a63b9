"""A user's own network, referenced from examples/custom_module.yaml via `imports:`."""

from __future__ import annotations

import torch
from torch import nn

import ptutils


@ptutils.register
class ResidualMLP(nn.Module):
    """An MLP with one residual block: shows a network defined outside ptutils."""

    def __init__(self, in_features: int = 64, width: int = 96, classes: int = 10) -> None:
        super().__init__()
        self.inp = nn.Linear(in_features, width)
        self.block = nn.Sequential(nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.out = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(h + self.block(h))
