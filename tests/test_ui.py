"""`ptutils ui` in a real browser: a `ptutils ui` subprocess over real stores (a local
folder filled by `ptutils run`, and nx-27017 with a session training on a Celery worker),
driven by headless Chromium. Screenshots of each page go to build/screenshots/ ($PTUTILS_SCREENSHOTS; the
reviewed set is docs/ui/)."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from ptutils.store import open_store
from ptutils.store.base import new_session_doc
from ptutils.store.curves import downsample
from ptutils.ui import data
from tests import test_workers as cluster
from tests.helpers import digits_config
from tests.ui_browser import (
    UiServer,
    chromium,
    click,
    renders,
    screenshot,
    texts,
    wait_render,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"alpha-1": 1, "alpha-2": 2, "beta-1": 3}

redis_db = cluster.redis_db  # fixtures: a fresh redis database, MongoDB, worker processes
store_uri = cluster.store_uri
workers = cluster.workers


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local store holding three finished `ptutils run` sessions of the digits config."""
    folder = tmp_path_factory.mktemp("ui-runs")
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(digits_config(imports=[], callbacks=[])))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "run", str(path), "--name", name,
         "--set", f"session.seed={seed}", "--store", str(folder / "runs"), "-q"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, seed in RUNS.items()]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    with open_store(folder / "runs") as store:  # one sweep over the seed, as submit makes
        for name in RUNS:
            assert store.cas_session(store.get_session(name)["_id"], {}, {"sweep": "seeds"})
    return folder / "runs"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = chromium()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def ui_local(local_runs: Path, tmp_path: Path) -> Iterator[UiServer]:
    server = UiServer(str(local_runs), tmp_path)
    try:
        yield server
    finally:
        server.stop()


def ui_local_store(server: UiServer) -> str:
    return server.api("/api/info")["store"]


def table_names(browser: Any) -> list[str]:
    return texts(browser, "#sessions tbody td:nth-child(2) a")


def test_sessions_table_filters_sorts_and_pages(browser, ui_local):
    browser.get(ui_local.url + "/")
    wait_render(browser, 0)
    assert sorted(table_names(browser)) == sorted(RUNS)
    assert set(texts(browser, "#sessions tbody td:nth-child(3)")) == {"completed"}
    assert set(texts(browser, "#sessions tbody td:nth-child(4)")) == {"60/60"}
    assert all(float(loss) > 0 for loss in texts(browser, "#sessions tbody td:nth-child(5)"))
    assert all("test/accuracy=" in e for e in texts(browser, "#sessions tbody td:nth-child(6)"))
    screenshot(browser, "sessions")

    seen = renders(browser)
    browser.find_element(By.ID, "f-name").send_keys("alpha")
    wait_until(lambda: sorted(table_names(browser)) == ["alpha-1", "alpha-2"], 30,
               "the name filter to leave the two alpha sessions")
    assert browser.find_element(By.ID, "total").text == "2"
    browser.find_element(By.CSS_SELECTOR, "th[data-key=name]").click()  # name, ascending
    wait_until(lambda: table_names(browser) == ["alpha-1", "alpha-2"], 30, "ascending names")
    browser.find_element(By.CSS_SELECTOR, "th[data-key=name]").click()
    wait_until(lambda: table_names(browser) == ["alpha-2", "alpha-1"], 30, "descending names")
    Select(browser.find_element(By.ID, "f-status")).select_by_visible_text("failed")
    wait_until(lambda: browser.find_element(By.ID, "total").text == "0", 30,
               "no failed alpha session")
    assert renders(browser) > seen
    screenshot(browser, "sessions-filtered")

    # Paging and bad input, as the page asks for them.
    page = ui_local.api("/api/sessions?per_page=10&sort=name&order=asc&page=1")
    assert page["total"] == 3 and [r["name"] for r in page["rows"]] == sorted(RUNS)
    assert ui_local.api("/api/sessions?per_page=10&page=2")["rows"] == []
    # Sorted by time, pages come from the store's index: same order, totals on every page.
    oldest = ui_local.api("/api/sessions?per_page=10&sort=created&order=asc")["rows"]
    order = [r["name"] for r in oldest]  # the three runs started at once: any order
    assert sorted(order) == sorted(RUNS) and [r["created"] for r in oldest] == sorted(
        r["created"] for r in oldest)
    later = ui_local.api("/api/sessions?per_page=10&sort=updated&page=2")
    assert later["total"] == 3 and later["rows"] == []
    with open_store(ui_local_store(ui_local)) as store:  # pages smaller than the API's
        for page, want in ((1, order[:2]), (2, order[2:])):
            got = data.list_sessions(store, {}, "created", False, page, 2, data.Hooks())
            assert got["total"] == 3 and [r["name"] for r in got["rows"]] == want
        got = data.list_sessions(store, {}, "created", True, 1, 2, data.Hooks())
        assert [r["name"] for r in got["rows"]] == order[:0:-1]
    assert ui_local.api("/api/sessions?name=alph")["total"] == 2  # a name prefix
    assert ui_local.api("/api/sessions?name=lpha")["total"] == 0
    assert ui_local.api("/api/sessions?q=beta")["total"] == 1
    with pytest.raises(urllib.error.HTTPError) as bad:
        ui_local.api("/api/sessions?sort=password")
    assert bad.value.code == 400 and "sort on one of" in bad.value.read().decode()


def test_session_page_shows_its_curves_config_and_checkpoints(browser, ui_local):
    browser.get(ui_local.url + "/session/alpha-1")
    wait_render(browser, 0)
    chart = browser.find_element(By.ID, "chart")
    assert chart.get_attribute("data-points") == "60"  # every train/loss step, drawn
    assert chart.find_elements(By.TAG_NAME, "canvas"), "uPlot drew no canvas"
    assert "completed" in browser.find_element(By.ID, "state").text
    assert "DigitsReader" in browser.find_element(By.ID, "config").text
    ckpt_steps = [td.text for td in
                  browser.find_elements(By.CSS_SELECTOR, "#checkpoints tbody td:first-child")]
    assert "60" in ckpt_steps
    assert "ptutils run --resume alpha-1" in browser.find_element(By.ID, "commands").text
    assert browser.find_element(By.ID, "cancel").get_attribute("hidden")  # finished
    screenshot(browser, "session")

    options = [o.text for o in Select(browser.find_element(By.ID, "series")).options]
    assert options[0] == "train/loss" and "eval/test/accuracy" in options
    seen = renders(browser)
    browser.find_element(By.ID, "log").click()
    Select(browser.find_element(By.ID, "series")).select_by_visible_text("eval/test/accuracy")
    wait_until(lambda: chart.get_attribute("data-points") == "3", 30,
               "the eval accuracy curve (3 evals)")
    assert renders(browser) >= seen
    screenshot(browser, "session-eval-log")


def test_compare_overlays_the_chosen_sessions(browser, ui_local):
    browser.get(ui_local.url + "/?name=")
    wait_render(browser, 0)
    with open_store(ui_local_store(ui_local)) as store:
        ids = [store.get_session(name)["_id"] for name in ("alpha-1", "beta-1")]
    for sid in ids:
        click(browser, f"tr[data-id='{sid}'] input.pick")
    click(browser, "#compare")
    wait_until(lambda: "/compare?ids=" in browser.current_url, 30, "the compare page")
    wait_render(browser, 0)
    chart = browser.find_element(By.ID, "chart")
    assert chart.get_attribute("data-series") == "2"
    legend = browser.find_element(By.CSS_SELECTOR, ".u-legend").text
    assert "alpha-1" in legend and "beta-1" in legend
    screenshot(browser, "compare")


def test_sweep_page_plots_the_parameter_against_the_metric(browser, ui_local):
    browser.get(ui_local.url + "/")
    wait_render(browser, 0)
    click(browser, "#sessions a[href='/sweep?sweep=seeds']")
    wait_until(lambda: "/sweep?sweep=seeds" in browser.current_url, 30, "the sweep page")
    wait_render(browser, 0)
    assert [o.text for o in Select(browser.find_element(By.ID, "param")).options] == [
        "session.seed"]
    assert Select(browser.find_element(By.ID, "metric")).first_selected_option.text \
        == "eval/test/accuracy"
    assert browser.find_element(By.ID, "chart").get_attribute("data-points") == "3"
    screenshot(browser, "sweep")


def test_downsampling_keeps_every_spike_and_bounds_the_points():
    steps = np.arange(1, 1_000_001)
    values = np.sin(steps / 5000.0)
    values[123_457] = 50.0   # one-point spikes, up and down
    values[876_543] = -50.0
    xs, ys = downsample(steps, values, 1000)
    assert len(xs) <= 2000 and list(xs) == sorted(xs)
    assert 50.0 in ys and -50.0 in ys
    assert xs[list(ys).index(50.0)] == 123_458
    short = downsample(steps[:100], values[:100], 1000)
    assert list(short[0]) == list(range(1, 101))  # few points: all of them


def test_actions_beyond_localhost_need_the_printed_token(local_runs, tmp_path):
    with open_store(local_runs) as store:
        doc = store.create_session(new_session_doc("queued-one", {"a": 1}, "h", 10))
    server = UiServer(str(local_runs), tmp_path, host="0.0.0.0")
    try:
        token = server.token
        assert token, f"no token printed:\n{server.log}"
        assert token not in server.api("/api/info").values()
        path = f"/api/sessions/{doc['_id']}/cancel"
        for headers in ({"X-Ptutils-Action": "1"},
                        {"X-Ptutils-Action": "1", "X-Ptutils-Token": "wrong"},
                        {"X-Ptutils-Action": "1", "Cookie": "ptutils_token=wrong"},
                        {"X-Ptutils-Token": token}):  # no action header: a cross-site form
            with pytest.raises(urllib.error.HTTPError) as refused:
                server.api(path, method="POST", headers=headers)
            assert refused.value.code == 403, headers
        with open_store(local_runs) as store:
            assert store.get_session(doc["_id"])["status"] == "queued"
        done = server.api(path, method="POST",
                          headers={"X-Ptutils-Action": "1", "Cookie": f"ptutils_token={token}"})
        assert done["row"]["status"] == "cancelled"
        with open_store(local_runs) as store:
            assert store.get_session(doc["_id"])["status"] == "cancelled"
    finally:
        server.stop()
        with open_store(local_runs) as store:
            store.delete_session(doc["_id"])


def test_running_session_updates_live_and_cancel_stops_it_on_the_worker(
        browser, tmp_path, store_uri, redis_db, workers, monkeypatch):
    """nx-27017 + redis + a real `ptutils worker`: the page gets new points without a
    reload; its pause and resume buttons (no token: localhost) stop the run on the worker
    and send it back; its cancel button stops it for good."""
    monkeypatch.setenv("PTUTILS_BROKER", redis_db)  # `ptutils ui` resumes through it
    worker = workers("w1", redis_db, store_uri, step_seconds=0.1)
    with open_store(store_uri) as store:
        [sid] = cluster.submit_configs(store, redis_db, tmp_path / "cfg", 1, name="live",
                               total_steps=400, chunk_steps=10, eval_every=100)
        worker.wait_ready()
        server = UiServer(store_uri, tmp_path)
        try:
            browser.get(f"{server.url}/session/{sid}")
            browser.execute_script("window.sameDocument = true")
            chart = browser.find_element(By.ID, "chart")

            def last_step() -> int:
                return int(chart.get_attribute("data-last-step") or 0)

            first = wait_until(last_step, 120, "the first points of the running session")
            wait_until(lambda: last_step() > first, 60, "new points without a reload")
            assert browser.execute_script("return window.sameDocument") is True
            wait_until(lambda: browser.find_element(By.ID, "state").text == "running", 30,
                       "the page to show the session running")
            screenshot(browser, "session-live")

            browser.get(f"{server.url}/workers")  # the worker, what it runs, its lease
            wait_until(lambda: "live-1" in "".join(texts(browser, "#workers tbody")), 30,
                       "the workers page to list the worker running live-1")
            assert texts(browser, "#workers tbody td")[0].startswith("w1-")
            screenshot(browser, "workers")

            browser.get(f"{server.url}/session/{sid}")
            wait_render(browser, 0)
            wait_until(lambda: browser.find_element(By.ID, "pause").is_displayed(), 30,
                       "the pause button of the running session")
            click(browser, "#pause")
            wait_until(lambda: browser.find_element(By.ID, "state").text == "paused", 30,
                       "the page to show the session paused")
            assert store.get_session(sid)["lease"] is None
            name = store.get_session(sid)["name"]  # a cluster session: resumed by `ptutils resume`
            assert f"ptutils resume {name} --store" in browser.find_element(By.ID, "commands").text
            screenshot(browser, "session-paused")
            wait_until(lambda: browser.find_element(By.ID, "resume").is_displayed(), 10,
                       "the resume button of the paused session")
            click(browser, "#resume")
            wait_until(lambda: browser.find_element(By.ID, "state").text == "running", 60,
                       "the resumed session to run on the worker again")
            dropped = worker.log.count(f"of {sid[:8]}: no-op")  # the paused chunk's, by now
            wait_until(lambda: browser.find_element(By.ID, "cancel").is_displayed(), 30,
                       "the cancel button (offered on localhost without a token)")
            click(browser, "#cancel")
            wait_until(lambda: browser.find_element(By.ID, "state").text == "cancelled", 30,
                       "the page to show the session cancelled")
            doc = store.get_session(sid)
            assert doc["status"] == "cancelled" and doc["lease"] is None
            stopped_at = doc["step"]
            assert stopped_at < 400
            # The chunk running then is fenced out (its work discarded), none follows.
            wait_until(lambda: worker.log.count(f"of {sid[:8]}: no-op") > dropped, 60,
                       "the worker to drop the running chunk", interval=0.2)
            after = store.get_session(sid)
            assert (after["status"], after["step"]) == ("cancelled", stopped_at)
            screenshot(browser, "session-cancelled")
        finally:
            server.stop()


def test_ui_refuses_a_folder_that_holds_no_store(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "ui", "--store", str(tmp_path / "nothing")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "nothing" in proc.stderr and not (tmp_path / "nothing").exists()
