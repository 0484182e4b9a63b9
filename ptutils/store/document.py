"""Dotted-path access to plain-dict documents (`lease.expires`), as MongoDB reads them.

Shared by the backends that keep documents as dicts: a CAS expectation on
`lease.worker`, or an update of `metrics.loss`, means the same on every store.
"""

from __future__ import annotations

from typing import Any


def get_path(doc: Any, key: str) -> Any:
    """doc[a][b] for "a.b"; None when a level is missing or not a dict."""
    cur: Any = doc
    for part in key.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def set_path(doc: dict[str, Any], key: str, value: Any) -> None:
    """doc[a][b] = value for "a.b", creating (or replacing non-dict) levels."""
    *parents, last = key.split(".")
    cur = doc
    for part in parents:
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            nxt = cur[part] = {}
        cur = nxt
    cur[last] = value
