"""The MongoDB server's clock, as leases are judged by it (DESIGN §4.6).

Every worker and reconciler compares lease expiries with the server's time, not its
own: a machine whose clock runs an hour fast must not take a live lease. The offset
between this client's clock and the server's is measured with one `hello` round trip
and kept for CLOCK_REFRESH_S, so `now()` costs no round trip in between.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from typing import Any

from pymongo.errors import OperationFailure, PyMongoError

from ptutils.store.mongo_retry import Retry, log

__all__ = ["CLOCK_REFRESH_S", "ServerClock"]

CLOCK_REFRESH_S = 60.0
"""How often `now()` asks the server for its time again (it keeps the offset between)."""


class ServerClock:
    """`now()`: the server's time, from this client's clock and a measured offset."""

    def __init__(self, db: Any, retry: Retry, url: str, skew: float = 0.0) -> None:
        """`skew` (seconds) offsets this client's own clock: a test hook that plays a
        machine whose clock is wrong; `now()` still tells the server's time."""
        self._db, self._retry, self._url, self._skew = db, retry, url, float(skew)
        self._offset: float | None = None
        self._offset_at = -math.inf

    def now(self) -> float:
        """This client's clock plus the offset measured with `hello` (`localTime`),
        measured again every CLOCK_REFRESH_S. No round trip otherwise."""
        mono = time.monotonic()
        if self._offset is None or mono - self._offset_at > CLOCK_REFRESH_S:
            self._refresh_offset(mono)
        return self._local_time() + (self._offset or 0.0)

    def _local_time(self) -> float:
        return time.time() + self._skew

    def _refresh_offset(self, mono: float) -> None:
        """Measure the offset; on a failure keep the last one (if any) and try later."""
        if self._offset is None:
            self._offset = self._retry("reading the server's clock", lambda _: self._measure())
        else:
            try:
                self._offset = self._measure()
            except PyMongoError as exc:
                log.warning("reading the server's clock failed (%s); keeping the last offset",
                            self._retry.scrub(str(exc)))
        self._offset_at = mono

    def _measure(self) -> float:
        """Server time minus local time, at the midpoint of one `hello` round trip."""
        before = self._local_time()
        try:
            reply = self._db.command("hello")
        except OperationFailure:  # servers before MongoDB 4.4.2 know only isMaster
            reply = self._db.command("isMaster")
        after = self._local_time()
        server = reply.get("localTime")
        if not isinstance(server, _dt.datetime):
            log.warning("MongoDB at %s reports no localTime; leases use this machine's clock",
                        self._url)
            return 0.0
        stamp = server if server.tzinfo else server.replace(tzinfo=_dt.UTC)
        return stamp.timestamp() - (before + after) / 2
