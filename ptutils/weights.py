"""Network weights as files other tools read: a torch `.pt` state_dict or safetensors."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ptutils.errors import PtutilsError

FORMATS = ("safetensors", "pt")


def format_for(path: str | os.PathLike[str], fmt: str | None = None) -> str:
    """`fmt` when given, else from the suffix: `.safetensors` -> safetensors, else pt."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise PtutilsError(f"unknown weights format {fmt!r}; use one of {', '.join(FORMATS)}")
        return fmt
    return "safetensors" if os.fspath(path).endswith(".safetensors") else "pt"


def standalone(weights: Mapping[str, Any]) -> dict[str, Any]:
    """Every tensor copied to its own contiguous storage: tied (shared) weights become
    separate equal tensors and strided views dense ones, as safetensors requires."""
    import torch

    out: dict[str, Any] = {}
    for key, value in weights.items():
        if not isinstance(value, torch.Tensor):
            raise PtutilsError(
                f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor; "
                "safetensors holds tensors only (export with --format pt instead)")
        out[key] = value.detach().clone(memory_format=torch.contiguous_format)
    return out


def save_weights(weights: Mapping[str, Any], path: str | os.PathLike[str], fmt: str,
                 metadata: Mapping[str, str]) -> None:
    """Write `weights` to `path` atomically (a `.tmp` file renamed into place).

    safetensors: `metadata` goes into the header (read it with `safe_open(...).metadata()`).
    pt: a plain dict of tensors for `torch.load(path, weights_only=True)`.
    """
    tensors = standalone(weights)
    tmp = Path(f"{os.fspath(path)}.tmp")
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, os.fspath(tmp), metadata={k: str(v) for k, v in metadata.items()})
    else:
        import torch

        torch.save(tensors, tmp)
    os.replace(tmp, path)
