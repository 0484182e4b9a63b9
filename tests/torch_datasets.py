"""Test helper listed under `imports:` by test configs: small torch Datasets.

Their samples draw from all three global RNGs (torch, `random`, numpy), as random
augmentation does, so a test sees whether each sample's randomness is reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info


def _blobs(n: int, features: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)  # never the global RNG
    centres = torch.randn(classes, features, generator=generator) * 2
    y = torch.randint(0, classes, (n,), generator=generator)
    x = centres[y] + torch.randn(n, features, generator=generator)
    return x, y


class Blobs(Dataset):
    """Gaussian clusters; `augment` adds noise from the global RNGs to every sample.

    Samples are `(x, y)` tuples, or `{"x", "y", "i"}` dicts with `dicts: true` (`i`: the
    index, so a test sees which samples a batch holds).
    """

    def __init__(self, n: int = 64, features: int = 4, classes: int = 3, seed: int = 0,
                 augment: float = 0.0, dicts: bool = False) -> None:
        self.x, self.y = _blobs(n, features, classes, seed)
        self.augment, self.dicts = float(augment), bool(dicts)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Any:
        x = self.x[i]
        if self.augment:
            noise = torch.randn(x.shape) + random.random() + float(np.random.rand())
            x = x + self.augment * noise
        if self.dicts:
            return {"x": x, "y": self.y[i], "i": i}
        return x, self.y[i]


class Stream(IterableDataset):
    """`n` noisy samples per pass, shuffled per epoch (`set_epoch`) by a generator of its
    own, split between DataLoader workers; `{"x", "i"}` dicts. `fail_at`: the sample
    number at which the pass raises."""

    def __init__(self, n: int = 40, features: int = 3, seed: int = 0,
                 fail_at: int | None = None) -> None:
        self.n, self.features, self.seed, self.epoch = n, features, seed, 0
        self.fail_at = fail_at

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        info = get_worker_info()
        if info is not None:
            order = order[info.id::info.num_workers]
        for number, i in enumerate(order.tolist()):
            if number == self.fail_at:
                raise OSError(f"lost the connection at sample {number}")
            yield {"x": torch.full((self.features,), float(i)) + torch.rand(self.features),
                   "i": i}


class Bad(Dataset):
    """Samples that cannot become a batch: `kind` text, object, short (tuple of 3), raises."""

    def __init__(self, kind: str = "text", n: int = 8) -> None:
        self.kind, self.n = kind, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if self.kind == "text":
            return f"sample {i}", 1
        if self.kind == "object":
            return object()
        if self.kind == "short":
            return torch.zeros(2), 1, 2
        raise ValueError(f"cannot read sample {i}")
