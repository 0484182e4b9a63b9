"""Summaries of statistic buckets in MongoDB, so a long curve reads a few thousand tiny
documents instead of every point (`Store.statistic_buckets`, ptutils.store.curves).

A collection `statistic_grains` holds, per bucket document of `statistics` (one grain
of `curves.GRAIN` steps, same `_id`), its counts, first and last steps and its first
minimum and maximum, and per series (session, phase, name) one document (`grain` -1,
`_id` `series_id`) with the first and last step written (`$min`/`$max`: atomic with
concurrent writers).

Every write of a bucket increments its `rev` (`$inc`, atomic with the `$set` of its
points); the writer then reads the bucket back and stores its summary only where the
stored one has a lower `rev` (an upsert whose filter includes `rev: {$lt: r}`: when a
newer summary is there the upsert's insert fails on the unique `_id`, which is the
answer "already newer"). Whichever writer read a bucket last wins, and it saw every
point written before it: the summary is never older than a finished write. A series
written before summaries existed has no series document: its curve is read from the
points. nx-27017 serves a lookup of many `_id`s ($in) without scanning the collection.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pymongo import DeleteMany, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError

from ptutils.store import curves
from ptutils.store.mongo_fields import decode_number, doc_key
from ptutils.store.mongo_retry import DUPLICATE_CODES, Retry

if TYPE_CHECKING:
    import numpy as np

Doc = dict[str, Any]

IDS_PER_QUERY = 4000
"""`_id`s per `$in` lookup."""

MAX_ID_LOOKUP = 20_000
"""Grains a curve looks up by `_id` (nx-27017 scans the collection for any other query);
a longer range is queried by its index (about 10M steps and more)."""


def series_id(session: str, phase: str, name: str) -> str:
    return doc_key(session, phase, name)


def bucket_points(
    doc: Doc, low: int | None = None, high: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A bucket document's points (in [low, high] if given) as ascending arrays."""
    import numpy as np
    pairs = sorted(
        (int(k), float(decode_number(v[0])))
        for k, v in (doc.get("points") or {}).items()
        if (low is None or int(k) >= low) and (high is None or int(k) <= high)
    )
    return (np.array([s for s, _ in pairs], np.int64), np.array([v for _, v in pairs], np.float64))


class GrainSummaries:
    """The `statistic_grains` collection."""

    def __init__(self, collection: Collection[Doc], retry: Retry) -> None:
        self.collection = self._coll = collection
        self._retry = retry

    def create_indexes(self) -> None:
        self._coll.create_index([("session", 1), ("phase", 1), ("name", 1), ("grain", 1)])

    def summarize(self, buckets: Iterable[Doc]) -> None:
        """Store the summaries of bucket documents as read back (with their `rev`)."""
        ops = []
        for doc in buckets:
            steps, values = bucket_points(doc)
            g = curves.grain_of(steps, values, int(doc["bucket"])) if steps.size else None
            fields = {
                "session": doc["session"],
                "phase": doc["phase"],
                "name": doc["name"],
                "grain": int(doc["bucket"]),
                "rev": int(doc.get("rev") or 0),
                **(_fields(g) if g else {"n": 0, "finite": 0, "first": 0, "last": 0}),
            }
            ops.append(
                UpdateOne(
                    {"_id": doc["_id"], "rev": {"$lt": fields["rev"]}},
                    {"$set": fields},
                    upsert=True,
                )
            )
        if ops:
            self._retry("summarizing statistics", lambda _: self._newer_wins(ops))

    def _newer_wins(self, ops: list[UpdateOne]) -> None:
        try:
            self._coll.bulk_write(ops, ordered=False)
        except BulkWriteError as exc:  # a newer summary is there: it stays
            if any(
                e.get("code") not in DUPLICATE_CODES for e in exc.details.get("writeErrors", [])
            ):
                raise

    def series_ops(
        self, session: str, spans: dict[tuple[str, str], tuple[int, int]]
    ) -> list[UpdateOne]:
        """Widen each series' first/last step to a batch's."""
        return [
            UpdateOne(
                {"_id": series_id(session, phase, name)},
                {
                    "$min": {"first": lo},
                    "$max": {"last": hi},
                    "$setOnInsert": {"session": session, "phase": phase, "name": name, "grain": -1},
                },
                upsert=True,
            )
            for (phase, name), (lo, hi) in spans.items()
        ]

    def new_series(self, session: str, keys: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The (phase, name) of `keys` that have no series document yet."""
        ids = {series_id(session, p, n): (p, n) for p, n in keys}
        found = self.by_ids(self._coll, list(ids))
        return [key for i, key in ids.items() if i not in {d["_id"] for d in found}]

    def delete_after(self, session: str, later_ids: list[str], after_step: int) -> None:
        ops: list[Any] = [
            DeleteMany({"_id": {"$in": later_ids[i : i + IDS_PER_QUERY]}})
            for i in range(0, len(later_ids), IDS_PER_QUERY)
        ]
        self._retry("trimming statistic summaries", lambda _: ops and self._coll.bulk_write(ops))
        self._retry(
            "trimming statistic series",
            lambda _: self._coll.update_many(
                {"session": session, "grain": -1}, {"$min": {"last": int(after_step)}}
            ),
        )

    def delete_session(self, session: str) -> None:
        self._retry(
            "deleting statistic summaries", lambda _: self._coll.delete_many({"session": session})
        )

    def series(self, session: str) -> list[tuple[str, str]] | None:
        """(phase, name) of the session's series documents, sorted; None when it has none
        (no statistics, or written before summaries)."""
        docs = self._retry(
            "listing statistic series",
            lambda _: list(self._coll.find({"session": session, "grain": -1})),
        )
        if not docs:
            return None
        return sorted((d["phase"], d["name"]) for d in docs if d["first"] <= d["last"])

    def grains(
        self, session: str, phase: str, name: str, start: int | None, end: int | None
    ) -> list[curves.Grain] | None:
        """The summaries of a series' grains in a range, by grain; None if the series
        has no series document (written before summaries: read its points)."""
        series = self._retry(
            "reading a statistic series",
            lambda _: self._coll.find_one({"_id": series_id(session, phase, name)}),
        )
        if series is None:
            return None
        low = max(int(series["first"]), start if start is not None else int(series["first"]))
        high = min(int(series["last"]), end if end is not None else int(series["last"]))
        first, last = low // curves.GRAIN, high // curves.GRAIN
        if last - first < MAX_ID_LOOKUP:
            ids = [doc_key(session, phase, name, g) for g in range(first, last + 1)]
            docs = self.by_ids(self._coll, ids)
        else:  # a long sparse range: by the index on (session, phase, name, grain)
            query = {"session": session, "phase": phase, "name": name,
                     "grain": {"$gte": first, "$lte": last}}  # fmt: skip
            docs = self._retry("reading statistic summaries",
                               lambda _: list(self._coll.find(query)))  # fmt: skip
        return sorted((_grain(d) for d in docs if d.get("n")), key=lambda g: g.grain)

    def by_ids(self, coll: Collection[Doc], ids: list[str]) -> list[Doc]:
        out: list[Doc] = []
        for i in range(0, len(ids), IDS_PER_QUERY):
            part = ids[i : i + IDS_PER_QUERY]
            out += self._retry(
                "reading statistics", lambda _, p=part: list(coll.find({"_id": {"$in": p}}))
            )
        return out


_GRAIN_FIELDS = (
    "grain",
    "n",
    "finite",
    "first",
    "last",
    "ffirst",
    "flast",
    "low",
    "low_step",
    "high",
    "high_step",
)


def _fields(g: curves.Grain) -> Doc:
    """The summary's fields, the minimum and maximum as `repr` text: nx-27017 keeps a
    double `$set` by an update to 15 significant digits (a curve must show the stored
    value, as read point by point); `repr` gives back the same float anywhere."""
    fields = {k: getattr(g, k) for k in _GRAIN_FIELDS}
    for k in ("low", "high"):
        fields[k] = None if fields[k] is None else repr(fields[k])
    return fields


def _grain(doc: Doc) -> curves.Grain:
    fields = {k: doc.get(k) for k in _GRAIN_FIELDS}
    for k in ("low", "high"):
        fields[k] = None if fields[k] is None else float(fields[k])
    return curves.Grain(**fields)
