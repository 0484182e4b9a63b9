"""Retrying MongoDB calls through transient faults, with passwords kept out of messages.

Transient server errors (connection refused or reset, primary stepping down, timeouts)
are retried with exponential backoff for a time budget, then `StoreUnavailable` names
the URL without its password. A retried call must be idempotent, or check whether an
earlier attempt applied: `Retry` tells it whether an attempt came before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import unquote, urlsplit

from gridfs.errors import FileExists
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)

from ptutils.errors import StoreError, StoreUnavailable

# The store's logger: one name to configure for everything MongoStore logs.
log = logging.getLogger("ptutils.store.mongo")
T = TypeVar("T")

# Server error codes that mean "try again" (shutdown, stepdown, not primary, ...).
_TRANSIENT_CODES = frozenset({6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436})
DUPLICATE_CODES = (11000, 11001)
"""Server error codes of a unique-index violation."""


class Interrupted(StoreUnavailable):
    """A transient server error raised from inside `codec.decode` (which lets ptutils
    errors through unchanged); `Retry` unwraps and retries it."""

    def __init__(self, cause: PyMongoError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def is_transient(exc: BaseException) -> bool:
    """True for errors a retry can cure: lost connections, elections, shutdowns."""
    if isinstance(exc, Interrupted | ConnectionFailure):
        return True
    if isinstance(exc, OperationFailure) and not isinstance(exc, BulkWriteError):
        return exc.code in _TRANSIENT_CODES or exc.has_error_label("RetryableWriteError")
    return False


def is_duplicate(exc: PyMongoError) -> bool:
    """A unique-index violation, however the server words it (nx-27017 sends no code)."""
    if isinstance(exc, FileExists | DuplicateKeyError):
        return True
    if isinstance(exc, BulkWriteError):
        errors = exc.details.get("writeErrors", [])
        return bool(errors) and all(e.get("code") in DUPLICATE_CODES for e in errors)
    return isinstance(exc, OperationFailure) and (
        exc.code in DUPLICATE_CODES or "UNIQUE constraint" in str(exc)
    )


def redact_url(url: str) -> str:
    """`url` with the password replaced by `***` (`mongodb://user:***@host/db`)."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{hosts}").geturl()


def is_redacted(url: str) -> bool:
    """Whether `url` is one `redact_url` wrote (its password is `***`): it cannot open the
    store."""
    return password_of(url) == "***"


def password_of(url: str) -> str:
    """The password in `url` as written there (percent-encoded), or ""."""
    userinfo, at, _ = urlsplit(url).netloc.rpartition("@")
    return userinfo.split(":", 1)[1] if at and ":" in userinfo else ""


class Retry:
    """Calls `fn(retried)` until it succeeds, retrying transient errors for `seconds`.

    Messages name the server by `url` with its password redacted, and `scrub` removes
    the password from any server text quoted in them.
    """

    def __init__(self, url: str, seconds: float) -> None:
        self.url = redact_url(url)
        self.seconds = float(seconds)
        self._secret = password_of(url)

    def scrub(self, text: str) -> str:
        """`text` with the password (raw or URL-decoded) replaced by ***."""
        for secret in {self._secret, unquote(self._secret)} - {""}:
            text = text.replace(secret, "***")
        return text

    def __call__(self, what: str, fn: Callable[[bool], T]) -> T:
        """`fn(retried)` until it succeeds, retrying transient errors with backoff.

        `retried` tells `fn` that an earlier attempt may have applied before its
        connection failed. Past the budget: StoreUnavailable. Other server errors
        become StoreError; neither message ever contains the password.
        """
        deadline = time.monotonic() + self.seconds
        delay, retried = 0.05, False
        while True:
            try:
                return fn(retried)
            except PyMongoError as exc:
                if not is_transient(exc):
                    raise StoreError(
                        f"MongoDB at {self.url}: {what} failed: {self.scrub(str(exc))}"
                    ) from None
                error = exc
            except Interrupted as exc:
                error = exc.cause
            if time.monotonic() + delay > deadline:
                raise StoreUnavailable(
                    f"MongoDB at {self.url} unavailable: {what} still failing after "
                    f"{self.seconds:g}s of retries ({type(error).__name__}: "
                    f"{self.scrub(str(error))})"
                ) from None
            log.warning("%s: %s; retrying in %.2fs", what, self.scrub(str(error)), delay)
            time.sleep(delay)
            delay, retried = min(delay * 2, 2.0), True
