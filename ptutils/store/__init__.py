"""Stores: where sessions, checkpoints and statistics live. `open_store(url)` picks one."""

from __future__ import annotations

import os
from pathlib import Path

from ptutils.store.base import (  # noqa: F401
    CheckpointKind,
    SessionQuery,
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


def open_store(
    url: str | os.PathLike[str] | None = None,
    *,
    create: bool = True,
    connect_timeout: float | None = None,
) -> Store:
    """A MongoStore for mongodb:// and mongodb+srv:// URLs, else a LocalStore folder.

    `create=False`: a folder that holds no store is not created (`SessionNotFound`: there
    is nothing to read). `connect_timeout`: first check that a MongoDB server answers
    within this many seconds (`StoreUnavailable` in one line otherwise), for commands
    that should fail fast rather than ride out an outage.
    """
    target = resolve_store_url(url)
    if target.startswith(("mongodb://", "mongodb+srv://")):
        if connect_timeout is not None:
            from ptutils.store.probe import ping_mongo

            ping_mongo(target, connect_timeout)  # before importing the store (and torch)
        from ptutils.store.mongo import MongoStore

        return MongoStore(target)
    from ptutils.store.local import LocalStore

    if target.startswith("file://"):
        target = target[len("file://") :]
    if not create:
        from ptutils.store.probe import require_local_store

        require_local_store(Path(target).expanduser().absolute())
    return LocalStore(Path(target))
