"""Shared fixtures: real servers (tests/servers.py) and small helpers."""

from __future__ import annotations

import os

os.environ.setdefault("PTUTILS_TEST", "1")

from tests.servers import *  # noqa: E402,F401,F403  (fixtures: redis_url, mongo_uri, mongo_store, ...)
