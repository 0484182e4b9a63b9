"""`ptutils ui` at scale, measured in headless Chromium: 10,000 sessions and one session
of 1,000,000 statistic points, on a local store and on nx-27017.

Times are read in the page (performance.now(), from navigation start or from the
filter's input event to the table or chart drawn with the server's data), so they cover
the request, the store, the JSON and the drawing. The store downsamples the curve itself
(`Store.statistic_buckets`) from the per-grain summaries that `write_statistics` keeps,
built here by writing the points through the store API as a run does (`fill`): a first
visit (cold: a fresh server) and later ones (warm) are reported. Goals: each < 1 s.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_store import nx_server
from bench.harness import Goal, report
from ptutils.store import open_store
from ptutils.store.base import SessionStatus, StatPoint, Store, new_session_doc
from tests.ui_browser import UiServer, chromium, renders, screenshot, wait_render

SHOTS = Path(__file__).resolve().parent / "results" / "ui"
"""The benchmark's screenshots (the tests' go to build/screenshots)."""

FULL = {"sessions": 10_000, "points": 1_000_000, "repeat": 3}
QUICK = {"sessions": 1_000, "points": 100_000, "repeat": 2}
TARGET_S = 1.0
STATUSES = [SessionStatus.COMPLETED] * 6 + [SessionStatus.FAILED, SessionStatus.CANCELLED,
                                            SessionStatus.QUEUED, SessionStatus.PAUSED]


def fill(store: Store, p: dict[str, Any]) -> dict[str, float]:
    """`sessions` small sessions and one named `big` with `points` train losses."""
    started = time.perf_counter()
    for i in range(p["sessions"]):
        doc = new_session_doc(
            f"run-{i:05d}", {"model": {"lr": 10 ** -(1 + i % 4), "width": 32 * (1 + i % 8)}},
            f"h{i}", 1000, tags=[f"group{i % 10}"], sweep=f"sweep-{i % 50}",
            status=STATUSES[i % len(STATUSES)])
        doc["step"] = 1000 if doc["status"] == "completed" else i % 1000
        store.create_session(doc)
    sessions_s = time.perf_counter() - started
    big = new_session_doc("big", {"model": {"lr": 0.1}}, "hbig", p["points"],
                          status=SessionStatus.COMPLETED)
    big["step"] = p["points"]
    store.create_session(big)
    started = time.perf_counter()
    batch = 50_000
    for lo in range(1, p["points"] + 1, batch):
        store.write_statistics(big["_id"], [
            StatPoint("train", s, "loss", _loss(s)) for s in range(lo, min(lo + batch,
                                                                        p["points"] + 1))])
    return {"sessions_s": sessions_s, "points_s": time.perf_counter() - started}


def _loss(step: int) -> float:
    spike = 25.0 if step % 99_991 == 0 else 0.0  # rare one-point spikes the chart must keep
    return 2.0 / math.sqrt(step) + 0.05 * math.sin(step / 97.0) ** 2 + spike


def _ms(browser: Any, key: str) -> float:
    return float(browser.execute_script(f"return +document.body.dataset.{key}"))


def first_paint(browser: Any, url: str) -> float:
    """Seconds from navigation start to the page's first drawing of its data."""
    browser.get("about:blank")
    browser.get(url)
    wait_render(browser, 0, timeout=120)
    return _ms(browser, "firstPaint") / 1000.0


def filter_time(browser: Any, text: str) -> tuple[float, int]:
    """Seconds from typing `text` in the name filter to the table redrawn; rows shown."""
    before = renders(browser)
    browser.execute_script(
        "const el = document.getElementById('f-name'); el.value = arguments[0];"
        "window.benchT0 = performance.now();"
        "el.dispatchEvent(new Event('input', {bubbles: true}));", text)
    wait_render(browser, before, timeout=120)
    t0 = float(browser.execute_script("return window.benchT0"))
    total = int(browser.execute_script("return +document.getElementById('total').textContent"))
    return (_ms(browser, "renderedAt") - t0) / 1000.0, total


def measure(store_url: str, folder: Path, browser: Any, p: dict[str, Any], label: str
            ) -> dict[str, float]:
    server = UiServer(store_url, folder)
    try:
        curve_cold = first_paint(browser, f"{server.url}/session/big")
        drawn = int(browser.execute_script(
            "return +document.getElementById('chart').dataset.points"))
        screenshot(browser, f"bench-{label}-session-1M", SHOTS)
        curve_warm = [first_paint(browser, f"{server.url}/session/big")
                      for _ in range(p["repeat"])]
        paint = [first_paint(browser, server.url + "/") for _ in range(p["repeat"])]
        screenshot(browser, f"bench-{label}-sessions", SHOTS)
        filters = []
        for i in range(p["repeat"]):
            filters.append(filter_time(browser, f"run-00{i}1")[0])
            filter_time(browser, "")
        one, shown = filter_time(browser, "run-00421")
        assert shown == 1, f"the filter shows {shown} sessions, not 1"
        screenshot(browser, f"bench-{label}-sessions-filtered", SHOTS)
        return {"sessions page first paint": statistics.median(paint),
                "filter by name": statistics.median(filters),
                "session page curve, first visit (cold)": curve_cold,
                "session page curve, again (warm)": statistics.median(curve_warm),
                "points drawn": float(drawn)}
    finally:
        server.stop()


def run(quick: bool = False) -> dict[str, Any]:
    p = QUICK if quick else FULL
    rows: list[dict[str, Any]] = []
    goals: list[Goal] = []
    fills: dict[str, dict[str, float]] = {}
    browser = chromium()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ui-") as tmp:
            folder = Path(tmp)
            targets = {"local": str(folder / "runs")}
            with nx_server(folder) as uri:
                targets["nx-27017"] = f"{uri}/benchui"
                for label, url in targets.items():
                    with open_store(url) as store:
                        fills[label] = fill(store, p)
                    figures = measure(url, folder, browser, p, label)
                    for case, value in figures.items():
                        unit = "points" if case == "points drawn" else "s"
                        rows.append({"store": label, "case": case, "value": value,
                                     "unit": unit})
                        if unit == "s":
                            goals.append(Goal(f"{label}: {case}", value, TARGET_S, "<="))
    finally:
        browser.quit()
    return report("ui", rows, goals, params=p, fill_seconds=fills,
                  browser="headless Chromium (selenium), 1280x900")


if __name__ == "__main__":
    run()
