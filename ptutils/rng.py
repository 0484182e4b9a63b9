"""Every random number generator a run touches, captured and restored (DESIGN §4.4)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states as codec-friendly values."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [
            np_state[0],
            np_state[1].copy(),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `get_rng_state` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


class RNG:
    """Stateful wrapper so the RNG states take part in a Module's State."""

    def state_dict(self) -> dict[str, Any]:
        return get_rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


LIBRARY_RNG_USERS = (
    "pymongo.message", "pymongo.helpers_shared", "pymongo.synchronous.topology",
    "pymongo.synchronous.client_session", "redis.backoff", "kombu.utils.functional",
    "celery.utils.time",
)
"""Modules that draw from Python's global `random` in a process's other threads."""


def isolate_library_rngs(*, import_missing: bool = False) -> None:
    """Give the libraries of LIBRARY_RNG_USERS a generator of their own.

    Python's global `random` is part of a session's State (DESIGN §4.4), and the training
    thread shares it with every other thread (lease heartbeat, broker, reconcile): pymongo
    draws operation ids from it when command monitoring is on, and pymongo, redis-py,
    kombu and Celery draw retry jitter. Left alone, such draws would land between training
    steps in an order that depends on timing, and a run would not be bit-identical. Only
    modules already imported are patched unless `import_missing`.
    """
    import importlib
    import sys

    private = random.Random()
    for name in LIBRARY_RNG_USERS:
        module = sys.modules.get(name)
        if module is None and import_missing:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
        if module is not None and getattr(module, "random", None) is random:
            module.random = private  # type: ignore[attr-defined]
    description = sys.modules.get("pymongo.topology_description")
    if description is not None and getattr(description, "sample", None) is random.sample:
        description.sample = private.sample  # type: ignore[attr-defined]
