"""Quick checks before a store is opened: is the server there, is the folder a store.

A command line tool should fail within seconds, in one line, when the store is down;
a worker or a long run instead rides out outages with the store's retry budget. So the
CLI probes first (`open_store(url, connect_timeout=...)`) and the store keeps its
budget for the operations that follow.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from ptutils.errors import SessionNotFound, StoreError, StoreUnavailable

_NOISE = re.compile(r" \(configured timeouts:.*|, Timeout: .*", re.DOTALL)
"""The tail of a pymongo server-selection error: timeouts and the topology dump."""


def short_reason(text: str, limit: int = 200) -> str:
    """The first line of a server error, without pymongo's topology dump."""
    line = _NOISE.sub("", str(text)).strip().splitlines()
    reason = line[0] if line else ""
    return reason if len(reason) <= limit else reason[: limit - 1] + "…"


def ping_mongo(url: str, seconds: float) -> None:
    """Raise StoreUnavailable (one line, no password) unless the server answers a ping
    within `seconds` (or the URL's own serverSelectionTimeoutMS); StoreError if the URL
    itself is malformed."""
    import pymongo
    from pymongo.errors import ConfigurationError, OperationFailure, PyMongoError

    from ptutils.store.mongo_retry import Retry

    retry = Retry(url, seconds)
    given = {k.lower() for k in parse_qs(urlsplit(url).query)}
    ms = int(seconds * 1000)
    options = {k: ms for k in ("serverSelectionTimeoutMS", "connectTimeoutMS")
               if k.lower() not in given}
    quiet = logging.getLogger("pymongo")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # pymongo's own warnings would repeat the reason at length
    try:
        client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(url, **options)
    except (ConfigurationError, ValueError) as exc:  # malformed URL, unresolvable SRV
        quiet.setLevel(level)
        raise StoreError(f"cannot open MongoDB at {retry.url}: {retry.scrub(str(exc))}") from None
    try:
        client.admin.command("ping")
    except OperationFailure as exc:  # e.g. authentication failed: the URL is wrong
        raise StoreError(f"MongoDB at {retry.url} refused us: "
                         f"{retry.scrub(short_reason(str(exc)))}") from None
    except PyMongoError as exc:
        waited = (options.get("serverSelectionTimeoutMS") or ms) / 1000
        raise StoreUnavailable(
            f"cannot reach the store at {retry.url} within {waited:g}s "
            f"({retry.scrub(short_reason(str(exc)))}): is the MongoDB server running and "
            "reachable from here? (--store or $PTUTILS_STORE)"
        ) from None
    finally:
        client.close()
        quiet.setLevel(level)


def require_local_store(root: Path) -> None:
    """SessionNotFound (nothing to find) unless `root` already holds a local store."""
    from ptutils.store.local import DB_NAME

    if root.exists() and (not root.is_dir() or (root / DB_NAME).is_file()):
        return  # a store, or a file that LocalStore refuses with its own message
    why = "does not exist" if not root.exists() else "holds no ptutils store"
    raise SessionNotFound(
        f"no sessions at {root}: the folder {why}. Pass the folder your runs are in as "
        "--store (or set $PTUTILS_STORE); `ptutils run` and `ptutils submit` create it."
    )
