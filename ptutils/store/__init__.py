"""Stores: where sessions, checkpoints and statistics live. `open_store(url)` picks one."""

from __future__ import annotations

import os
from pathlib import Path

from ptutils.store.base import (  # noqa: F401
    CheckpointKind,
    SessionStatus,
    StatPoint,
    Store,
    new_session_doc,
)

DEFAULT_STORE = "./ptutils-runs"
"""The embedded store's folder when neither --store nor $PTUTILS_STORE is given."""

STORE_ENV = "PTUTILS_STORE"
"""Environment variable naming the store (a folder path or a mongodb:// URL)."""


def resolve_store_url(url: str | os.PathLike[str] | None = None) -> str:
    """The store URL to use: the argument, else $PTUTILS_STORE, else ./ptutils-runs."""
    if url:
        return os.fspath(url)
    return os.environ.get(STORE_ENV) or DEFAULT_STORE


def open_store(url: str | os.PathLike[str] | None = None) -> Store:
    """A MongoStore for mongodb:// and mongodb+srv:// URLs, else a LocalStore folder."""
    target = resolve_store_url(url)
    if target.startswith(("mongodb://", "mongodb+srv://")):
        from ptutils.store.mongo import MongoStore

        return MongoStore(target)
    from ptutils.store.local import LocalStore

    if target.startswith("file://"):
        target = target[len("file://") :]
    return LocalStore(Path(target))
