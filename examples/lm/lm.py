"""A small transformer language model over the Python standard library's own source files.

`StdlibText` reads a fixed list of `.py` files from this interpreter's standard library
(text that ships on every machine: nothing to download) as one byte string and serves
windows of `seq_len + 1` bytes as (input, next-byte target) pairs; the last
`test_fraction` of the bytes is the test split. With `augment: true` every window
starts at a random offset within its slot, drawing from torch's global generator:
ptutils seeds it per sample from (seed, epoch, index) in the loader worker.

`TinyLM` is a byte-level causal transformer (pre-norm encoder layers with a causal
mask); `TokenCrossEntropy` is the criterion over its (batch, time, vocab) logits.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from ptutils.errors import DataError

FILES = ("textwrap.py", "string.py", "shlex.py", "fnmatch.py", "heapq.py", "bisect.py",
         "colorsys.py", "glob.py", "queue.py", "sched.py")
"""Modules of the standard library that every Python 3.10+ has as plain source."""


class StdlibText(Dataset):
    """Byte windows of standard library sources: x = bytes[s:s+T], y = bytes[s+1:s+T+1]."""

    def __init__(
        self,
        split: str = "train",
        seq_len: int = 64,
        files: list[str] | None = None,
        test_fraction: float = 0.1,
        augment: bool = False,
    ) -> None:
        if split not in ("train", "test"):
            raise DataError(f"StdlibText: split must be train or test, got {split!r}")
        root = Path(sysconfig.get_paths()["stdlib"])
        chunks = []
        for name in files or FILES:
            path = root / name
            if not path.is_file():
                raise DataError(f"StdlibText: {path} is not in this Python's standard library")
            chunks.append(path.read_bytes())
        data = torch.frombuffer(bytearray(b"\n".join(chunks)), dtype=torch.uint8)
        cut = int(len(data) * (1.0 - test_fraction))
        self.data = data[:cut] if split == "train" else data[cut:]
        self.seq_len = int(seq_len)
        self.augment = bool(augment)
        self.count = (len(self.data) - 1) // self.seq_len - 1
        if self.count < 1:
            raise DataError(f"StdlibText: the {split} split is shorter than seq_len={seq_len}")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.seq_len
        if self.augment:
            start += int(torch.randint(0, self.seq_len, ()))
        window = self.data[start:start + self.seq_len + 1].long()
        return window[:-1], window[1:]


class TinyLM(nn.Module):
    """Byte embedding + learned positions, `layers` pre-norm causal encoder layers, head."""

    def __init__(self, vocab: int = 256, dim: int = 64, heads: int = 4, layers: int = 2,
                 seq_len: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(seq_len, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.embed(x) + self.position(torch.arange(t, device=x.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=x.device)
        h = self.blocks(h, mask=mask, is_causal=True)
        return self.head(self.norm(h))


class TokenCrossEntropy(nn.Module):
    """Mean cross-entropy of every next-byte prediction of (batch, time, vocab) logits."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten())
