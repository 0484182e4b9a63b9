"""`Store.statistic_buckets`: curves downsampled by the store (ptutils/store/curves.py),
on a local store and on MongoDB (nx-27017), equal to the numpy reference over the raw
points whatever was written, overwritten, rolled back or written concurrently."""

from __future__ import annotations

import math
import sqlite3
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptutils.errors import StoreError
from ptutils.store import curves
from ptutils.store.base import StatPoint, Store, new_session_doc
from ptutils.store.local import LocalStore


@pytest.fixture
def store(each_store: Store) -> Store:
    """An empty store of each backend (tests/servers.py `each_store`)."""
    return each_store


def reference(
    store: Store,
    sid: str,
    phase: str,
    name: str,
    buckets: int,
    start: int | None = None,
    end: int | None = None,
) -> curves.Curve:
    """The curve from every raw point of the range (the generic fallback)."""
    points = store.query_statistics(sid, phase=phase, name=name, step_min=start, step_max=end)
    return curves.from_points(points, buckets)


def same(got: curves.Curve, want: curves.Curve) -> None:
    assert got.steps == want.steps
    assert got.values == want.values
    assert (got.points, got.first, got.last) == (want.points, want.first, want.last)
    assert got.nonfinite == want.nonfinite
    assert got.bucket_steps == want.bucket_steps


def session(store: Store, name: str = "run") -> str:
    return store.create_session(new_session_doc(name, {}, "h", 10))["_id"]


def series(rng: np.random.Generator, steps: np.ndarray, ties: bool) -> np.ndarray:
    values = rng.integers(0, 5, steps.size).astype(float) if ties else rng.normal(size=steps.size)
    spikes = rng.choice(steps.size, size=min(5, steps.size), replace=False)
    values[spikes] = rng.choice([50.0, -50.0, math.nan, math.inf, -math.inf], spikes.size)
    return values


def write(
    store: Store,
    sid: str,
    steps: np.ndarray,
    values: np.ndarray,
    name: str = "loss",
    batch: int = 20_000,
) -> None:
    for i in range(0, steps.size, batch):
        store.write_statistics(
            sid,
            [
                StatPoint("train", int(s), name, float(v))
                for s, v in zip(steps[i : i + batch], values[i : i + batch])
            ],
        )


def test_a_million_points_wide_and_zoomed_keep_every_spike(store):
    sid = session(store)
    steps = np.arange(1, 300_001)
    values = np.sin(steps / 5000.0)
    values[123_456], values[234_566] = 50.0, -50.0  # one-point spikes at steps 123457, 234567
    values[77] = math.nan
    write(store, sid, steps, values, batch=100_000)
    store.write_statistics(sid, [StatPoint("eval", 5, "loss", 9.0)])  # another phase, same name
    got = store.statistic_buckets(sid, "train", "loss", 1000)
    same(got, reference(store, sid, "train", "loss", 1000))
    assert len(got.steps) <= 2000 and got.bucket_steps == 512  # whole grains
    assert (123_457, 50.0) in zip(got.steps, got.values)
    assert (234_567, -50.0) in zip(got.steps, got.values)
    assert got.nonfinite == [78] and got.points == 300_000 and got.last == 300_000
    for start, end in [(1000, 60_000), (100_000, 300_000), (123_000, 124_000), (None, 5)]:
        zoom = store.statistic_buckets(sid, "train", "loss", 500, start=start, end=end)
        same(zoom, reference(store, sid, "train", "loss", 500, start, end))
    assert store.statistic_buckets(sid, "eval", "loss", 10).steps == [5]


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 2**32 - 1),
    size=st.sampled_from([30, 3000, 80_000]),
    gap=st.sampled_from([1, 3, 40]),
    ties=st.booleans(),
    buckets=st.sampled_from([1, 7, 400]),
    rollback=st.booleans(),
)
def test_any_series_equals_the_numpy_reference(store, seed, size, gap, ties, buckets, rollback):
    rng = np.random.default_rng(seed)
    sid = session(store, f"run-{seed}-{size}-{gap}-{ties}-{buckets}-{rollback}")
    steps = np.cumsum(rng.integers(1, gap + 1, size)) + int(rng.integers(0, 2000))
    values = series(rng, steps, ties)
    write(store, sid, steps, values)
    if rollback:  # a restarted chunk: points after a step removed, then written again
        cut = int(steps[size // 2])
        store.delete_statistics(sid, after_step=cut)
        again = steps[steps > cut][: size // 4]
        write(store, sid, again, series(rng, again, ties))
    write(store, sid, steps[::7], series(rng, steps[::7], ties))  # overwritten points
    lo, hi = int(steps[0]), int(steps[-1])
    ranges = [
        (None, None),
        (lo + (hi - lo) // 3, None),
        (None, lo + (hi - lo) // 5),
        (int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))),
        (hi + 1, None),
    ]
    for start, end in ranges:
        same(
            store.statistic_buckets(sid, "train", "loss", buckets, start=start, end=end),
            reference(store, sid, "train", "loss", buckets, start, end),
        )


def test_an_empty_or_missing_series_and_bad_arguments(store):
    sid = session(store)
    empty = store.statistic_buckets(sid, "train", "loss", 100)
    assert (empty.steps, empty.points, empty.last) == ([], 0, None)
    store.write_statistics(sid, [StatPoint("train", 3, "loss", math.nan)])
    only_nan = store.statistic_buckets(sid, "train", "loss", 100)
    assert (only_nan.steps, only_nan.nonfinite, only_nan.points) == ([], [3], 1)
    for bad in ({"buckets": 0}, {"buckets": 10, "start": "5"}):
        with pytest.raises(StoreError, match="statistic_buckets"):
            store.statistic_buckets(sid, "train", "loss", **bad)


def test_the_series_of_a_session_as_written_and_rolled_back(store):
    sid, other = session(store), session(store, "other")
    store.write_statistics(other, [StatPoint("train", 1, "other", 1.0)])
    store.write_statistics(
        sid, [StatPoint("train", s, n, 1.0) for s in range(1, 21) for n in ("loss", "lr")]
    )
    store.write_statistics(sid, [StatPoint("eval", 10, "acc", 0.5)])
    assert store.statistic_series(sid) == [("eval", "acc"), ("train", "loss"), ("train", "lr")]
    store.delete_statistics(sid, after_step=5)
    assert store.statistic_series(sid) == [("train", "loss"), ("train", "lr")]
    store.delete_session(sid)
    assert store.statistic_series(sid) == []
    assert store.statistic_series(other) == [("train", "other")]


def test_a_deleted_session_leaves_no_curve(store):
    sid = session(store)
    write(store, sid, np.arange(1, 5001), np.linspace(0, 1, 5000))
    store.delete_session(sid)
    assert store.statistic_buckets(sid, "train", "loss", 100).points == 0


def test_concurrent_writers_of_the_same_buckets_and_a_reader(store):
    """Writers filling the same grains at once (interleaved steps) while a reader polls:
    every read is well-formed, and once they are done the curve is exact."""
    sid = session(store)
    n_writers, per = 4, 6000
    errors: list[BaseException] = []
    done = threading.Event()

    def writer(k: int) -> None:
        try:
            steps = np.arange(1 + k, n_writers * per + 1, n_writers)
            values = np.cos(steps / 300.0) + k
            for i in range(0, steps.size, 500):
                store.write_statistics(
                    sid,
                    [
                        StatPoint("train", int(s), "loss", float(v))
                        for s, v in zip(steps[i : i + 500], values[i : i + 500])
                    ],
                )
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def reader() -> None:
        try:
            while not done.is_set():
                got = store.statistic_buckets(sid, "train", "loss", 50)
                assert got.steps == sorted(got.steps) and len(got.steps) <= max(100, got.points)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(n_writers)]
    poll = threading.Thread(target=reader)
    poll.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    done.set()
    poll.join(60)
    assert not errors, errors
    got = store.statistic_buckets(sid, "train", "loss", 50)
    assert got.points == n_writers * per
    same(got, reference(store, sid, "train", "loss", 50))


def test_a_local_store_of_schema_1_gets_its_grains(tmp_path):
    """A database written before grain summaries: opening it summarizes its points."""
    local = LocalStore(tmp_path / "store")
    sid = session(local)
    write(local, sid, np.arange(1, 100_001), np.sin(np.arange(1, 100_001) / 77.0))
    want = local.statistic_buckets(sid, "train", "loss", 300)
    local.close()
    with sqlite3.connect(tmp_path / "store" / "ptutils.db") as conn:
        conn.execute("DELETE FROM statistic_grains")
        conn.execute("PRAGMA user_version = 1")
    again = LocalStore(tmp_path / "store")
    same(again.statistic_buckets(sid, "train", "loss", 300), want)
    again.close()


def test_a_mongo_series_written_before_summaries_is_read_from_its_points(mongo_store):
    """Then continued by this ptutils: the older buckets get their summaries too."""
    sid = session(mongo_store)
    write(mongo_store, sid, np.arange(1, 3001), np.linspace(5, 1, 3000))
    mongo_store.db["statistic_grains"].delete_many({})  # as an older ptutils left it
    same(
        mongo_store.statistic_buckets(sid, "train", "loss", 100),
        reference(mongo_store, sid, "train", "loss", 100),
    )
    write(mongo_store, sid, np.arange(3001, 100_001), np.linspace(1, 0, 97_000))
    grains = 100_000 // curves.GRAIN + 1  # steps 1..100000, every grain summarized
    assert mongo_store.db["statistic_grains"].count_documents({"session": sid}) == grains + 1
    same(
        mongo_store.statistic_buckets(sid, "train", "loss", 100),
        reference(mongo_store, sid, "train", "loss", 100),
    )


def test_a_long_sparse_mongo_range_is_read_through_the_index(mongo_store, monkeypatch):
    """More grains than `MAX_ID_LOOKUP` between the first and last step: the summaries
    come from a query on the index, not a list of `_id`s; the same curve."""
    from ptutils.store import mongo_grains

    sid = session(mongo_store)
    steps = np.arange(0, 400 * curves.GRAIN, 37 * curves.GRAIN // 10)
    write(mongo_store, sid, steps, np.cos(steps / 1000.0))
    want = mongo_store.statistic_buckets(sid, "train", "loss", 20)
    monkeypatch.setattr(mongo_grains, "MAX_ID_LOOKUP", 50)
    got = mongo_store.statistic_buckets(sid, "train", "loss", 20)
    same(got, want)
    same(got, reference(mongo_store, sid, "train", "loss", 20))
