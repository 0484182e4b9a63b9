"""A real `ptutils ui` subprocess and a headless Chromium driving it (selenium).

Shared by tests/test_ui.py and bench/bench_ui.py. Chromium and its driver are the
Debian packages `chromium` and `chromium-driver` (.ci/run installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = Path(os.environ.get("PTUTILS_SCREENSHOTS") or ROOT / "build" / "screenshots")
"""Where the tests write a screenshot of each page (build/ is not tracked; the reviewed
set is docs/ui/, written with PTUTILS_SCREENSHOTS=docs/ui)."""
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
DRIVER = ("/usr/bin/chromedriver",)


def free_port() -> int:
    from tests.servers import free_port as pick

    return pick()


class UiServer:
    """`ptutils ui --store STORE --host HOST --port PORT`, its output in a log file."""

    def __init__(self, store: str, folder: Path, *, host: str = "127.0.0.1") -> None:
        self.host, self.port = host, free_port()
        self.log_path = folder / f"ui-{self.port}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "orchestrator.cli", "ui", "--store", store,
               "--host", host, "--port", str(self.port)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        try:
            wait_until(self._answers, 60, "ptutils ui to answer", alive=self)
        except BaseException:
            self.stop()  # never leave a server behind a failed start
            raise

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _answers(self) -> bool:
        try:
            self.api("/api/info")
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    @property
    def token(self) -> str | None:
        """The token printed at start-up (a server bound beyond localhost)."""
        for line in self.log.splitlines():
            if "?token=" in line:
                return line.rsplit("?token=", 1)[1].strip()
        return None

    def api(self, path: str, *, method: str = "GET", headers: dict[str, str] | None = None
            ) -> Any:
        """The JSON answer; an HTTPError (with `.code`) for 4xx/5xx."""
        req = urllib.request.Request(self.url + path, method=method, headers=headers or {})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def wait_until(pred: Callable[[], Any], timeout: float, what: str, *,
               alive: UiServer | None = None, interval: float = 0.05) -> Any:
    """`pred()` once it is true; an element redrawn under it (stale) counts as not yet."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = pred()
        except StaleElementReferenceException:
            value = None
        if value:
            return value
        if alive is not None and alive.proc.poll() is not None:
            raise AssertionError(f"ptutils ui exited ({alive.proc.returncode}):\n{alive.log}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def chromium() -> Any:
    """A headless Chromium (1280x900) through chromedriver; fails clearly if missing."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = next((p for p in CHROMIUM if os.path.exists(p)), shutil.which("chromium"))
    driver = next((p for p in DRIVER if os.path.exists(p)), shutil.which("chromedriver"))
    if not binary or not driver:
        raise AssertionError("headless Chromium is needed: apt-get install -y chromium "
                             "chromium-driver (.ci/run does it)")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(arg)
    options.binary_location = binary
    return webdriver.Chrome(options=options, service=Service(driver))


def renders(browser: Any) -> int:
    """How many times the page has finished drawing its data (ui.rendered in common.js)."""
    return int(browser.execute_script("return +(document.body.dataset.renders || 0)"))


def wait_render(browser: Any, after: int, timeout: float = 30) -> int:
    """Wait until the page drew its data more than `after` times; the new count."""
    return wait_until(lambda: renders(browser) > after and renders(browser), timeout,
                      f"the page to render (more than {after} times)")


def texts(browser: Any, css: str) -> list[str]:
    """The text of every element matching `css`, read at one instant (the pages redraw
    their tables while they poll, so element handles go stale)."""
    return list(browser.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.innerText)", css))


def click(browser: Any, css: str) -> None:
    """Click the element matching `css` as it is now (found and clicked in one go)."""
    browser.execute_script("document.querySelector(arguments[0]).click()", css)


def screenshot(browser: Any, name: str, folder: Path | None = None) -> Path:
    folder = folder or SCREENSHOTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    browser.save_screenshot(str(path))
    return path
