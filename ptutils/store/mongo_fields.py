"""How values are spelled in MongoDB documents, and how queries name them.

Enums are stored as their plain values, non-finite floats as strings, ids built from
fields are percent-quoted, and equality on a sub-document is spelled field by field:
forms that MongoDB and the nx-27017 stand-in store and match the same way.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any
from urllib.parse import quote


def plain(value: Any) -> Any:
    """Enums (SessionStatus, CheckpointKind) as their plain values, recursively."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def doc_key(*parts: Any) -> str:
    """A deterministic `_id` from fields: each percent-quoted, so `/` cannot collide."""
    return "/".join(quote(str(p), safe="") for p in parts)


def match(expect: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Equality conditions with sub-documents spelled as dotted fields.

    `{"lease": {"worker": w, "expires": t}}` becomes `lease.worker == w and
    lease.expires == t`: the same test for a lease (always exactly these fields), and a
    form every MongoDB-compatible server evaluates (nx-27017 rejects a query on a whole
    sub-document). `None` keeps MongoDB's meaning: null or missing.
    """
    out: dict[str, Any] = {}
    for k, v in expect.items():
        if isinstance(v, dict) and v and not any(str(x).startswith("$") for x in v):
            out.update(match(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def get_path(doc: Any, key: str) -> Any:
    """The value at a dotted `key` of a nested document, or None."""
    for part in key.split("."):
        if not isinstance(doc, dict):
            return None
        doc = doc.get(part)
    return doc


def encode_number(value: Any) -> Any:
    """NaN and ±inf as the strings "nan", "inf", "-inf"; other values unchanged.

    BSON stores them natively, but nx-27017 (JSON inside) refuses them; strings are
    stored and read back the same by every server.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def decode_number(value: Any) -> Any:
    """The inverse of `encode_number`."""
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return value


def encode_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's metrics as stored."""
    return {k: encode_number(v) for k, v in metrics.items()}


def decode_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """A checkpoint's metrics as read back."""
    return {k: decode_number(v) for k, v in (metrics or {}).items()}
