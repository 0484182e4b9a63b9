"""An ImageFolder-style dataset of PNG files with random augmentation, and its networks.

`PngFolder(root, split)` reads `root/split/<class>/*.png` (classes are the sorted folder
names, or the ones listed in `classes`) into `(image, label)` samples: a float tensor
C x H x W in [0, 1] and an int. With `augment: true` each sample is randomly shifted
(pad and crop) and its contrast jittered, drawing from torch's global generator: ptutils
seeds it per sample from (seed, epoch, index) in the loader worker, so the augmentation
is the same whichever worker reads the sample, and a resumed run sees the same images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ptutils.errors import DataError


class PngFolder(Dataset):
    """`root/split/<class>/*.png` as (image, label); `classes` picks and orders classes."""

    def __init__(
        self,
        root: str,
        split: str = "train",
        classes: list[str] | None = None,
        augment: bool = False,
        pad: int = 2,
        contrast: float = 0.2,
    ) -> None:
        folder = Path(root) / split
        if not folder.is_dir():
            raise DataError(
                f"PngFolder: no folder {folder}; make the images first: "
                f"python examples/imagefolder/make_images.py {root}"
            )
        names = sorted(p.name for p in folder.iterdir() if p.is_dir())
        chosen = [str(c) for c in classes] if classes is not None else names
        missing = sorted(set(chosen) - set(names))
        if missing:
            raise DataError(f"PngFolder: {folder} has no class folder(s) {missing}; has {names}")
        self.classes = chosen
        self.files = [
            (path, label)
            for label, name in enumerate(chosen)
            for path in sorted((folder / name).glob("*.png"))
        ]
        if not self.files:
            raise DataError(f"PngFolder: no PNG files under {folder}")
        self.augment, self.pad, self.contrast = bool(augment), int(pad), float(contrast)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.files[index]
        with Image.open(path) as img:
            array = np.asarray(img, dtype=np.float32) / 255.0
        image = torch.from_numpy(array)
        image = image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)
        if self.augment:
            image = self._augment(image)
        return image.contiguous(), label

    def _augment(self, image: torch.Tensor) -> torch.Tensor:
        _, h, w = image.shape
        p = self.pad
        padded = nn.functional.pad(image, (p, p, p, p))
        dy, dx = torch.randint(0, 2 * p + 1, (2,)).tolist()
        image = padded[:, dy:dy + h, dx:dx + w]
        scale = 1.0 + self.contrast * (2.0 * torch.rand(()) - 1.0)
        return (image * scale).clamp(0.0, 1.0)


def _features(in_channels: int, width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.1),
    )


class ConvNet(nn.Module):
    """`features` (two conv blocks with dropout) and a linear `head`."""

    def __init__(self, in_channels: int = 1, classes: int = 10, width: int = 16,
                 image_size: int = 16) -> None:
        super().__init__()
        self.features = _features(in_channels, width)
        self.head = nn.Linear(2 * width * (image_size // 4) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class TransferNet(nn.Module):
    """The same convolutions as ConvNet, named `backbone`, with a new `classifier`: a
    warm start loads ConvNet's `features.*` into `backbone.*` with `rename`."""

    def __init__(self, in_channels: int = 1, classes: int = 5, width: int = 16,
                 image_size: int = 16) -> None:
        super().__init__()
        self.backbone = _features(in_channels, width)
        self.classifier = nn.Sequential(
            nn.Linear(2 * width * (image_size // 4) ** 2, 64), nn.ReLU(), nn.Linear(64, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x).flatten(1))
