"""ptutils: composable PyTorch experiments that run locally or on a Celery cluster.

Names below load lazily (PEP 562), so `import ptutils.store` or the CLI's status
commands do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "PtutilsError": "ptutils.errors", "ConfigError": "ptutils.errors",
    "CodecError": "ptutils.errors", "LoadError": "ptutils.errors",
    "NanLossError": "ptutils.errors", "HiLossError": "ptutils.errors",
    "RegistryError": "ptutils.errors",
    "Module": "ptutils.module", "RestoreReport": "ptutils.module",
    "Stateful": "ptutils.module", "build": "ptutils.module",
    "register": "ptutils.registry",
    "State": "ptutils.state", "Status": "ptutils.state", "Statistic": "ptutils.state",
    "History": "ptutils.state",
    "Session": "ptutils.session", "Model": "ptutils.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ptutils' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
