"""Curves downsampled where they are stored: min and max per bucket of steps.

`Store.statistic_buckets` returns one statistic of a session as at most two points per
bucket (the first point holding the bucket's minimum and the first holding its
maximum, in step order), so a chart of a million points receives a few thousand and a
one-step spike stays visible at any zoom-out. Non-finite values (NaN, inf) are left out
of the buckets and reported by step instead (a chart cannot draw them).

The buckets (`plan`), the same on every backend:
  * few points (finite ones at most twice the buckets): every finite point, no buckets;
  * a narrow span (at most `RAW_SPAN` steps, a zoom): `buckets` equal step ranges over
    [lo, hi], the first and last finite step: a point at step s falls in bucket
    ((s - lo) * buckets) // (hi - lo + 1);
  * a wide span: ranges of `width` steps, a multiple of `GRAIN`, starting at a multiple
    of `GRAIN` (s // width after that origin), as few as fit in `buckets`. A store may
    then keep one summary per `GRAIN` steps (MongoDB does) and read the summaries, not
    the points: a grain never straddles two buckets.

`downsample` is the reference in numpy over raw points; the stores must agree with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ptutils.errors import StoreError

if TYPE_CHECKING:
    import numpy as np

GRAIN = 512
"""Steps per summary a store may keep; wide buckets are whole multiples of it."""

RAW_SPAN = 65_536
"""Spans of at most this many steps are bucketed exactly over [lo, hi] (from points)."""

NONFINITE_SHOWN = 100
"""Steps of non-finite values a curve reports, the first ones."""


@dataclass(frozen=True)
class Plan:
    """A point at step s falls in bucket ((s - origin) * scale) // divisor."""

    origin: int
    scale: int
    divisor: int

    def bucket(self, steps: np.ndarray) -> np.ndarray:
        return ((steps - self.origin) * self.scale) // self.divisor

    @property
    def aligned(self) -> bool:
        """Whether buckets are whole grains (summaries per grain can serve them)."""
        return self.scale == 1 and self.origin % GRAIN == 0 and self.divisor % GRAIN == 0


def plan(lo: int, hi: int, finite: int, buckets: int) -> Plan | None:
    """The buckets for `finite` points between steps lo and hi; None: keep every point."""
    if finite <= 2 * buckets:
        return None
    span = hi - lo + 1
    if span <= RAW_SPAN:
        return Plan(lo, buckets, span)
    origin = lo - lo % GRAIN
    width = -(-(hi + 1 - origin) // buckets)
    return Plan(origin, 1, -(-width // GRAIN) * GRAIN)


@dataclass
class Curve:
    """One statistic downsampled: `steps`/`values` the points kept (finite, ascending);
    `points` the stored points in the range (non-finite ones too) and `first`/`last`
    their first and last step; `nonfinite` the first steps of NaN/inf values;
    `bucket_steps` the steps per bucket (None: every finite point is kept)."""

    steps: list[int]
    values: list[float]
    points: int
    first: int | None
    last: int | None
    nonfinite: list[int]
    bucket_steps: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_request(buckets: int, start: int | None, end: int | None) -> None:
    """`StoreError` naming a bad argument of `statistic_buckets`."""
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
        raise StoreError(f"statistic_buckets: buckets={buckets!r}, a whole number >= 1")
    for label, value in (("start", start), ("end", end)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise StoreError(f"statistic_buckets: {label}={value!r}, a step (int) or None")


def select(steps: np.ndarray, values: np.ndarray, buckets: Plan) -> tuple[np.ndarray, np.ndarray]:
    """The first point of each bucket's minimum and of its maximum, in step order.

    `steps` ascending and `values` finite. Candidates may be summaries (each grain's
    own first minimum and first maximum) when the buckets are whole grains.
    """
    import numpy as np
    if steps.size == 0:
        return steps, values
    bucket = buckets.bucket(steps)
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    counts = np.diff(np.r_[starts, steps.size])
    mins = np.minimum.reduceat(values, starts)
    maxs = np.maximum.reduceat(values, starts)
    owner = np.repeat(np.arange(starts.size), counts)
    first_min = _first_true(values == mins[owner], owner, starts.size)
    first_max = _first_true(values == maxs[owner], owner, starts.size)
    picks = np.unique(np.concatenate([first_min, first_max]))
    return steps[picks], values[picks]


def _first_true(mask: np.ndarray, owner: np.ndarray, groups: int) -> np.ndarray:
    """The first index where `mask` holds, per group (every group has one)."""
    import numpy as np
    idx = np.flatnonzero(mask)
    _, first = np.unique(owner[idx], return_index=True)
    assert first.size == groups
    return idx[first]


def downsample(
    steps: np.ndarray, values: np.ndarray, buckets: int
) -> tuple[np.ndarray, np.ndarray]:
    """The finite points kept of a series (steps ascending, values finite) by `plan`."""
    found = plan(int(steps[0]), int(steps[-1]), steps.size, buckets) if steps.size else None
    return (steps, values) if found is None else select(steps, values, found)


def from_arrays(steps: np.ndarray, values: np.ndarray, buckets: int) -> Curve:
    """The curve of raw points (steps ascending, any values): the reference."""
    import numpy as np
    finite = np.isfinite(values)
    kept, kept_values = steps[finite], values[finite]
    found = plan(int(kept[0]), int(kept[-1]), kept.size, buckets) if kept.size else None
    xs, ys = (kept, kept_values) if found is None else select(kept, kept_values, found)
    return Curve(
        steps=[int(s) for s in xs],
        values=[float(v) for v in ys],
        points=int(steps.size),
        first=int(steps[0]) if steps.size else None,
        last=int(steps[-1]) if steps.size else None,
        nonfinite=[int(s) for s in steps[~finite][:NONFINITE_SHOWN]],
        bucket_steps=None if found is None else found.divisor / found.scale,
    )


def from_points(points: Sequence[dict[str, Any]], buckets: int) -> Curve:
    """The curve of points as `query_statistics` returns them (one series, by step)."""
    import numpy as np
    steps = np.fromiter((p["step"] for p in points), dtype=np.int64, count=len(points))
    values = np.fromiter((p["value"] for p in points), dtype=np.float64, count=len(points))
    return from_arrays(steps, values, buckets)


# --- from summaries per grain -----------------------------------------------------------------
@dataclass(frozen=True)
class Grain:
    """What a store keeps of the points of one statistic in steps [grain * GRAIN,
    (grain + 1) * GRAIN): counts, first and last steps (of any point and of finite
    ones), and the first points holding the minimum and the maximum."""

    grain: int
    n: int
    finite: int
    first: int
    last: int
    ffirst: int | None
    flast: int | None
    low: float | None
    low_step: int | None
    high: float | None
    high_step: int | None


def grain_of(steps: np.ndarray, values: np.ndarray, grain: int) -> Grain:
    """The summary of one grain's points (steps ascending, any values)."""
    import numpy as np
    ok = np.isfinite(values)
    fs, fv = steps[ok], values[ok]
    low = high = None
    if fs.size:
        low, high = int(np.argmin(fv)), int(np.argmax(fv))  # the first of equal ones
    return Grain(
        grain,
        int(steps.size),
        int(fs.size),
        int(steps[0]),
        int(steps[-1]),
        int(fs[0]) if fs.size else None,
        int(fs[-1]) if fs.size else None,
        None if low is None else float(fv[low]),
        None if low is None else int(fs[low]),
        None if high is None else float(fv[high]),
        None if high is None else int(fs[high]),
    )


Raw = Any  # (start, end) -> (steps, values): every point in [start, end], by step


def assemble(
    grains: list[Grain], raw: Raw, buckets: int, start: int | None, end: int | None
) -> Curve:
    """The curve of a range from the summaries of its grains (ascending) and raw points
    where needed: the grains the range cuts, a narrow span, few points, NaN steps."""
    import numpy as np
    low = _MIN if start is None else start
    high = _MAX if end is None else end
    inner = [g for g in grains if g.n and g.first >= low and g.last <= high]
    cut = [g for g in grains if g.n and not (g.first >= low and g.last <= high)]
    edge = [raw(max(low, g.grain * GRAIN), min(high, (g.grain + 1) * GRAIN - 1)) for g in cut]
    steps = np.concatenate([s for s, _ in edge] or [np.zeros(0, np.int64)])
    values = np.concatenate([v for _, v in edge] or [np.zeros(0)])
    ok = np.isfinite(values)
    count = int(steps.size) + sum(g.n for g in inner)
    finite = int(ok.sum()) + sum(g.finite for g in inner)
    firsts = [int(s) for s in steps[:1]] + [g.first for g in inner]
    lasts = [int(s) for s in steps[-1:]] + [g.last for g in inner]
    ffirst = min([int(s) for s in steps[ok][:1]] + [g.ffirst for g in inner if g.finite], default=0)
    flast = max([int(s) for s in steps[ok][-1:]] + [g.flast for g in inner if g.finite], default=0)
    found = plan(ffirst, flast, finite, buckets) if finite else None
    if found is None or not found.aligned:
        if finite:
            steps, values = raw(ffirst, flast)
            ok = np.isfinite(values)
        xs, ys = (steps[ok], values[ok]) if found is None else select(steps[ok], values[ok], found)
    else:
        cand = [(g.low_step, g.low) for g in inner if g.finite]
        cand += [(g.high_step, g.high) for g in inner if g.finite]
        cand += zip(steps[ok].tolist(), values[ok].tolist())
        cand = sorted(set(cand))
        xs, ys = select(
            np.array([s for s, _ in cand], np.int64),
            np.array([v for _, v in cand], np.float64),
            found,
        )
    nonfinite: list[int] = []
    for g in grains:
        if len(nonfinite) >= NONFINITE_SHOWN:
            break
        if g.n > g.finite:
            s, v = raw(max(low, g.grain * GRAIN), min(high, (g.grain + 1) * GRAIN - 1))
            nonfinite += [int(x) for x in s[~np.isfinite(v)]]
    return Curve(
        steps=[int(s) for s in xs],
        values=[float(v) for v in ys],
        points=count,
        first=min(firsts, default=None),
        last=max(lasts, default=None),
        nonfinite=nonfinite[:NONFINITE_SHOWN],
        bucket_steps=None if found is None else found.divisor / found.scale,
    )


_MIN, _MAX = -(2**63), 2**63 - 1
"""Step bounds of an unbounded range."""
