"""Statistics in MongoDB as buckets: one document per (session, phase, name, bucket).

MongoDB's bucket pattern for time series. A bucket holds the points of one statistic
for `BUCKET_STEPS` consecutive steps (bucket = step // BUCKET_STEPS) in a sub-document
keyed by step:

    {_id, session, phase, name, bucket, points: {"<step>": [value, time], ...}}

with a deterministic `_id` (`bucket_id`). A batch of thousands of points is a handful of
upserts by `_id`, each `$set`ting `points.<step>`, in one unordered `bulk_write`.
Writing a point again sets the same key: writes are idempotent on (session, phase,
step, name) and a replayed chunk never duplicates. Queries ask for the buckets that
overlap the step range and filter the points here.
Non-finite values are stored as strings (see `mongo_fields.encode_number`).
Every write of a bucket also `$inc`s its `rev`, and the writer then stores the bucket's
summary for curves in `statistic_grains` (mongo_grains.py).

Both MongoDB and nx-27017 (checked) create the `points` sub-document on the first
`$set` of `points.<step>`, treat the numeric key as a field name (not an array index,
since `points` is a document), and `$unset` keys that are absent as a no-op. Where the
stand-in differs, the code keeps to what both do: it projects `points.<step>` as a
flat field named "points.<step>" and matches `{"points": {}}` against any bucket, so
buckets are read whole and filtered here (empty ones are left, harmless); and it
ignores an `$unset` of more than 126 fields, so trims are split (`UNSET_FIELDS`).
The stand-in also scans the whole collection for any query but one on `_id` (MongoDB
uses the indexes), which is why writes find buckets by `_id`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pymongo import UpdateOne
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError

from ptutils.errors import StoreError
from ptutils.store.base import StatPoint
from ptutils.store.curves import GRAIN, Curve, assemble
from ptutils.store.mongo_fields import decode_number, doc_key, encode_number, plain
from ptutils.store.mongo_grains import GrainSummaries, bucket_points
from ptutils.store.mongo_retry import DUPLICATE_CODES, Retry

BUCKET_STEPS = GRAIN
"""Steps per bucket document: a few hundred points per document, as MongoDB advises;
one grain of a curve (ptutils.store.curves), summarized in `statistic_grains`."""

STAT_BATCH = 5000
"""Statistic points per `bulk_write` (the unit a transient error makes us retry)."""

UNSET_FIELDS = 100
"""Fields per `$unset`: nx-27017 silently ignores an `$unset` of more than 126 fields
(one SQLite json_remove call, at most 127 arguments); MongoDB has no such limit."""

_UPSERT_ATTEMPTS = 4

Doc = dict[str, Any]
BucketKey = tuple[str, str, int]  # phase, name, bucket


class StatisticBuckets:
    """The `statistics` collection, read and written as buckets of points."""

    def __init__(self, collection: Collection[Doc], retry: Retry) -> None:
        self._coll = collection
        self._retry = retry
        self.grains = GrainSummaries(collection.database["statistic_grains"], retry)

    def create_indexes(self) -> None:
        """Unique per bucket; a second index serves queries by session and name."""
        indexes = self._coll.index_information().values()
        if any(field == "step" for index in indexes for field, _ in index["key"]):
            raise StoreError(
                f"the `statistics` collection of {self._coll.database.name} at "
                f"{self._retry.url} holds one document per point (an older layout); "
                "move it aside (rename or drop the collection) to use buckets"
            )
        self._coll.create_index(
            [("session", 1), ("phase", 1), ("name", 1), ("bucket", 1)], unique=True
        )
        self._coll.create_index([("session", 1), ("name", 1), ("bucket", 1)])
        self.grains.create_indexes()

    def write(self, session_id: str, points: Iterable[StatPoint]) -> int:
        """Upsert points, a batch of buckets per `bulk_write`; the distinct points written."""
        buckets = _buckets(points)
        created: set[str] = set()
        for batch in _batches(session_id, buckets):
            created |= self._retry(f"writing statistics of {session_id}",
                                   lambda _, b=batch: self._upsert(b))
        if buckets:
            self._summarize(session_id, buckets, created)
        return sum(len(fields) for fields in buckets.values())

    def _summarize(self, session_id: str, buckets: dict[BucketKey, Doc], created: set[str]
                   ) -> None:
        """Store the summaries of the buckets written and widen their series' step range.

        A bucket this write created (`rev` 1) holds just its points; any other is read
        back as it is now. A series new to `statistic_grains` whose older buckets were
        written by a ptutils without summaries gets theirs too.
        """
        ids = [bucket_id(session_id, *key) for key in buckets]
        new = [{"_id": i, "session": session_id, "phase": phase, "name": name, "bucket": b,
                "rev": 1, "points": {k.partition(".")[2]: v for k, v in fields.items()}}
               for i, ((phase, name, b), fields) in zip(ids, buckets.items()) if i in created]
        self.grains.summarize(new + self.grains.by_ids(self._coll, [i for i in ids
                                                                    if i not in created]))
        spans: dict[tuple[str, str], tuple[int, int]] = {}
        for (phase, name, _), fields in buckets.items():
            steps = [int(k.partition(".")[2]) for k in fields]
            lo, hi = spans.get((phase, name), (min(steps), max(steps)))
            spans[(phase, name)] = (min(lo, *steps), max(hi, *steps))
        for phase, name in self.grains.new_series(session_id, list(spans)):
            query = {"session": session_id, "phase": phase, "name": name}
            found = self._retry(f"reading statistics of {session_id}",
                                lambda _, q=query: list(self._coll.find(q, {"bucket": 1})))
            older = [d for d in found if d["_id"] not in set(ids)]
            if older:
                self.grains.summarize(self.grains.by_ids(self._coll, [d["_id"] for d in older]))
                lo, hi = spans[(phase, name)]
                spans[(phase, name)] = (min(lo, *(d["bucket"] * BUCKET_STEPS for d in older)),
                                        max(hi, *(d["bucket"] * BUCKET_STEPS + BUCKET_STEPS - 1
                                                  for d in older)))  # fmt: skip
        ops = self.grains.series_ops(session_id, spans)
        self._retry(f"writing statistics of {session_id}",
                    lambda _: self._upsert(ops, self.grains.collection))

    def _upsert(self, ops: list[UpdateOne], coll: Collection[Doc] | None = None) -> set[str]:
        """Run `ops` unordered; again for those that lost a race to create their bucket.
        The `_id`s of the documents the upserts created.

        Two writers upserting the same new bucket at once can both miss it, and the
        later insert fails on the unique `_id`; run again, its upsert finds the bucket.
        (MongoDB >= 4.2 retries such upserts itself; other servers may not.)
        """
        created: set[str] = set()
        for _ in range(_UPSERT_ATTEMPTS):
            try:
                done = (coll if coll is not None else self._coll).bulk_write(ops, ordered=False)
                return created | set(done.upserted_ids.values())
            except BulkWriteError as exc:
                created |= {u["_id"] for u in exc.details.get("upserted", [])}
                errors = exc.details.get("writeErrors", [])
                if not errors or any(e.get("code") not in DUPLICATE_CODES for e in errors):
                    raise
                ops = [ops[e["index"]] for e in errors]
        raise StoreError(
            f"MongoDB at {self._retry.url}: statistic buckets kept colliding on their "
            "unique index; is the `statistics` index on (session, phase, name, bucket)?"
        )

    def delete_after(self, session_id: str, after_step: int) -> int:
        """Remove points with step > `after_step`; how many there were.

        Buckets entirely after the step are deleted; in the bucket holding the step, the
        later keys are `$unset` (points up to the step that a concurrent writer adds to
        it are kept). Idempotent: a second call finds nothing to remove.
        """
        step = int(after_step)
        first = step // BUCKET_STEPS
        docs = self._retry(
            f"reading statistics of {session_id}",
            lambda _: list(self._coll.find(
                {"session": session_id, "bucket": {"$gte": first}}, {"bucket": 1, "points": 1}
            )),
        )  # fmt: skip
        later = [d for d in docs if d["bucket"] > first]
        trims = {
            d["_id"]: keys
            for d in docs
            if d["bucket"] == first and (keys := [k for k in _points(d) if int(k) > step])
        }
        if later:
            self._retry(
                f"deleting statistics of {session_id}",
                lambda _: self._coll.delete_many({"session": session_id, "bucket": {"$gt": first}}),
            )
        self.grains.delete_after(session_id, [d["_id"] for d in later], step)
        if trims:
            ops = [
                UpdateOne({"_id": i}, {"$unset": {f"points.{k}": "" for k in part},
                                       "$inc": {"rev": 1}})
                for i, keys in trims.items()
                for part in _parts(keys, UNSET_FIELDS)
            ]
            self._retry(
                f"trimming statistics of {session_id}",
                lambda _: self._coll.bulk_write(ops, ordered=False),
            )
            self.grains.summarize(self.grains.by_ids(self._coll, list(trims)))
        return sum(len(_points(d)) for d in later) + sum(len(k) for k in trims.values())

    def delete_session(self, session_id: str) -> None:
        """Remove every bucket of a session."""
        self._retry(
            f"deleting statistics of {session_id}",
            lambda _: self._coll.delete_many({"session": session_id}),
        )
        self.grains.delete_session(session_id)

    def query(
        self,
        session_id: str | Sequence[str] | None = None,
        *,
        name: str | None = None,
        phase: str | None = None,
        step_min: int | None = None,
        step_max: int | None = None,
    ) -> list[Doc]:
        """Points matching every filter, ordered by session, step, name (then phase).

        Only buckets overlapping the step range are fetched; points outside it are
        dropped here.
        """
        low = None if step_min is None else int(step_min)
        high = None if step_max is None else int(step_max)
        query = _bucket_query(session_id, name, phase, low, high)
        docs = self._retry(
            "querying statistics", lambda _: list(self._coll.find(query, {"_id": 0}))
        )
        rows = [
            _row(doc, int(key), pair)
            for doc in docs
            for key, pair in _points(doc).items()
            if (low is None or int(key) >= low) and (high is None or int(key) <= high)
        ]
        rows.sort(key=lambda r: (r["session"], r["step"], r["name"], r["phase"]))
        return rows

    def curve(self, session_id: str, phase: str, name: str, buckets: int,
              start: int | None, end: int | None) -> Curve | None:
        """A curve from the grain summaries and the buckets the range cuts; None for a
        series written before summaries were kept."""
        import numpy as np
        grains = self.grains.grains(session_id, str(plain(phase)), name, start, end)
        if grains is None:
            return None

        def raw(low: int, high: int) -> tuple[Any, Any]:
            ids = [bucket_id(session_id, str(plain(phase)), name, b)
                   for b in range(low // BUCKET_STEPS, high // BUCKET_STEPS + 1)]
            docs = self.grains.by_ids(self._coll, ids)
            parts = [bucket_points(d, low, high) for d in sorted(docs, key=lambda d: d["bucket"])]
            return (np.concatenate([p[0] for p in parts] or [np.zeros(0, np.int64)]),
                    np.concatenate([p[1] for p in parts] or [np.zeros(0)]))

        return assemble(grains, raw, buckets, start, end)


def _buckets(points: Iterable[StatPoint]) -> dict[BucketKey, Doc]:
    """`$set` fields per bucket, `points.<step>: [value, time]`; a repeated point: last wins."""
    buckets: dict[BucketKey, Doc] = {}
    for p in points:
        step = int(p.step)
        key = (str(plain(p.phase)), str(p.name), step // BUCKET_STEPS)
        pair = [encode_number(float(p.value)), encode_number(float(p.time))]
        buckets.setdefault(key, {})[f"points.{step}"] = pair
    return buckets


def bucket_id(session: str, phase: str, name: str, bucket: int) -> str:
    """The `_id` of a bucket document: upserts find it by `_id`, the cheapest lookup on
    MongoDB and the only one nx-27017 does without scanning the collection."""
    return doc_key(session, phase, name, bucket)


def _batches(session_id: str, buckets: dict[BucketKey, Doc]) -> Iterable[list[UpdateOne]]:
    """One upsert per bucket, grouped into batches of about `STAT_BATCH` points."""
    batch: list[UpdateOne] = []
    size = 0
    for (phase, name, bucket), fields in buckets.items():
        labels = {"session": session_id, "phase": phase, "name": name, "bucket": bucket}
        update = {"$set": fields, "$setOnInsert": labels, "$inc": {"rev": 1}}
        batch.append(UpdateOne({"_id": bucket_id(**labels)}, update, upsert=True))
        size += len(fields)
        if size >= STAT_BATCH:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _bucket_query(
    session_id: str | Sequence[str] | None,
    name: str | None,
    phase: str | None,
    low: int | None,
    high: int | None,
) -> Doc:
    """The buckets that may hold matching points."""
    query: Doc = {}
    if session_id is not None:
        query["session"] = session_id if isinstance(session_id, str) else {"$in": list(session_id)}
    if name is not None:
        query["name"] = name
    if phase is not None:
        query["phase"] = plain(phase)
    bounds = {}
    if low is not None:
        bounds["$gte"] = low // BUCKET_STEPS
    if high is not None:
        bounds["$lte"] = high // BUCKET_STEPS
    if bounds:
        query["bucket"] = bounds
    return query


def _parts(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _points(doc: Doc) -> Doc:
    return doc.get("points") or {}


def _row(doc: Doc, step: int, pair: list[Any]) -> Doc:
    value, stamp = pair
    return {
        "session": doc["session"], "phase": doc["phase"], "step": step, "name": doc["name"],
        "value": float(decode_number(value)),
        "time": None if stamp is None else float(decode_number(stamp)),
    }  # fmt: skip


def summary_ops(session_id: str, batch: Any) -> list[UpdateOne]:
    """The session-document updates that fold a batch (`summary.BatchSummary`) into
    `summary`, to run as one ordered `bulk_write` (one round trip).

    Per part: create `summary.<part>.step` = -1 where it is missing, then `$set` the part
    where the stored step is `$lte` the batch's; `summary.time` moves by `$max`. Only
    documented MongoDB semantics, in forms nx-27017 also applies: no `$or` (the stand-in
    drops the `_id` condition beside one) and no `$max` on a sub-document (it cannot
    compare them).
    """
    ops = []
    for part in ("train", "eval"):
        new = getattr(batch, part)
        if new is None:
            continue
        field = f"summary.{part}.step"
        ops.append(UpdateOne({"_id": session_id, field: {"$exists": False}},
                             {"$set": {field: -1}}))
        ops.append(UpdateOne({"_id": session_id, field: {"$lte": new["step"]}},
                             {"$set": {f"summary.{part}": new}}))
    if batch.time is not None:
        ops.append(UpdateOne({"_id": session_id}, {"$max": {"summary.time": batch.time}}))
    return ops


def trim_summary_ops(session_id: str, after_step: int) -> list[UpdateOne]:
    """Drop the summary parts whose step is above `after_step` (their points are gone)
    and clear `summary.complete` (readers query the statistics for a missing part)."""
    return [UpdateOne({"_id": session_id, f"summary.{part}.step": {"$gt": int(after_step)}},
                      {"$unset": {f"summary.{part}": ""}, "$set": {"summary.complete": False}})
            for part in ("train", "eval")]
