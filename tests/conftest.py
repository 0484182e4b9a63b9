"""Shared fixtures: real servers (tests/servers.py) and small helpers."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("PTUTILS_TEST", "1")
# Hypothesis caches the constants it finds in our sources under its home directory;
# keep that out of the checkout (nothing in it changes which examples run).
os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY",
    os.path.join(tempfile.gettempdir(), f"ptutils-hypothesis-{os.getuid()}"),
)

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests run the same examples on a fresh clone and on a warm checkout: no
# example database (nothing saved from an earlier run is replayed), and examples derived
# from each test's name, not from a random seed. A failure found this way reproduces on
# every run; keep it as a plain regression test as well.
settings.register_profile("ptutils", database=None, derandomize=True)
settings.load_profile("ptutils")

from tests.servers import *  # noqa: E402,F401,F403  (fixtures: redis_url, mongo_uri, mongo_store, ...)


def _torch_modes() -> tuple[bool, bool, int]:
    import torch

    return (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_num_threads())


def _set_torch_modes(modes: tuple[bool, bool, int]) -> None:
    import torch

    torch.use_deterministic_algorithms(modes[0], warn_only=modes[1])
    torch.set_num_threads(modes[2])


_TORCH_DEFAULTS = _torch_modes()  # at import: before any fixture has run a session


@pytest.fixture(autouse=True)
def _torch_global_modes():
    """A session switches torch's global modes (deterministic algorithms, threads) in
    the process that runs it, and so can a module fixture that runs one: every test
    starts from the process's defaults and leaves them behind."""
    _set_torch_modes(_TORCH_DEFAULTS)
    yield
    _set_torch_modes(_TORCH_DEFAULTS)
