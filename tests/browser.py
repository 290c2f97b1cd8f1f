"""Debian's headless Chromium under Playwright: the one launch that tests/test_page.py and
loadtest/bench_page.py share. Playwright's own browser download cannot work here; the system browser can.

The browser is Chromium's headless shell (Debian's ``chromium-headless-shell``, built from the same source
as ``chromium``): the same Blink and V8 without the desktop browser around them, which is what Playwright
itself runs for headless Chromium. The page tests used 13.5-13.9 s of CPU with it against 21.1-22.7 s with
the full ``/usr/bin/chromium`` in its new headless mode (test_page.py and test_page_resumable.py, ``-n 0``,
in a cpuacct cgroup, alternating runs), with the same 11 tests passing: on 2 cores the suite's CPU is its
wall time (issue 13)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from playwright.sync_api import Browser, Playwright, sync_playwright

CHROMIUM = Path("/usr/bin/chromium-headless-shell")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

T = TypeVar("T")


def launch(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


class BrowserThread:
    """One Playwright driver and one Chromium for a whole test process, on a thread of their own.

    Starting the driver and the browser costs about 0.8 s of CPU; the page tests, each with a browser of its
    own, paid it eleven times. Each test still gets a new browser context (its own cookies, storage, cache,
    locale and viewport), as Playwright's own test runner gives one per test. Playwright's sync API must be
    used from the thread that started it: every job runs on this one thread, started on first use.
    """

    def __init__(self) -> None:
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="chromium")
        self._playwright: Playwright | None = None
        self._browser: Browser | None = None

    def run(self, job: Callable[[Browser], T]) -> T:
        """``job(browser)`` on the browser's thread; blocks the calling thread until it returns."""
        return self._thread.submit(self._run, job).result()

    def _run(self, job: Callable[[Browser], T]) -> T:
        if self._browser is None or not self._browser.is_connected():  # first use, or a browser crash
            if self._playwright is None:
                self._playwright = sync_playwright().start()
            self._browser = launch(self._playwright)
        return job(self._browser)

    def close(self) -> None:
        self._thread.submit(self._stop).result()
        self._thread.shutdown()

    def _stop(self) -> None:
        if self._browser is not None:
            self._browser.close()
        if self._playwright is not None:
            self._playwright.stop()
