"""ptutils: composable PyTorch experiments that run locally or on a Celery cluster."""

from __future__ import annotations

__version__ = "0.1.0"

from ptutils.errors import (  # noqa: F401,E402
    CodecError,
    ConfigError,
    HiLossError,
    LoadError,
    NanLossError,
    PtutilsError,
    RegistryError,
)
from ptutils.module import Module, RestoreReport, Stateful, build  # noqa: F401,E402
from ptutils.registry import register  # noqa: F401,E402
from ptutils.state import History, State, Statistic, Status  # noqa: F401,E402
