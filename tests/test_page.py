"""The upload page in a real browser: Debian's headless Chromium, driven by Playwright, against the real
server on a real socket.

Playwright's sync API runs on the browser's own thread (``in_browser``, the ``chromium`` fixture: one browser
per test process, a new context per test) while the server keeps serving in the test's Trio loop; the
browser side reads server state through ``on_server``. A missing browser fails these tests: CI installs it
(.ci/run), and a skipped browser test would pass for nothing.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import threading
import zipfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import trio
from playwright.sync_api import Browser, ConsoleMessage, Locator, Page, expect

from browser import BrowserThread
from conftest import RunningServer, StartServer, wait_until
from events_factory import as_ndjson, make_events, make_zip
from raw_http import RawClient, assert_no_leftovers, assert_still_serving, upload_head
from test_uploads import events_json

ROOT = Path(__file__).resolve().parent.parent
#: Where the result view's screenshots go: ``PAGE_SCREENSHOT_DIR=docs`` refreshes the README's.
SCREENSHOT_DIR = os.environ.get("PAGE_SCREENSHOT_DIR")
WAIT_MS = 60_000  # upper bound on any one wait in the page; a passing test is far below it
# expect()'s own bound too (5 s by default): a progress line took longer to show with the suite running in
# parallel on a loaded machine. A hang guard, like WAIT_MS: a passing check returns as soon as it holds.
expect.set_options(timeout=WAIT_MS)

T = TypeVar("T")


#: The running test's Trio token, for the browser thread's calls into the test's loop (``on_server``).
_test_loop = threading.local()


def _run_browser(
    browser: Browser,
    script: Callable[[Page], T],
    context_options: dict[str, Any],
    token: trio.lowlevel.TrioToken,
) -> T:
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        # Chromium logs every non-2xx answer to an XHR as "Failed to load resource"; the tests cause
        # those on purpose. Anything else at error level (a CSP violation, an exception) is a defect.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            problems.append(message.text)

    _test_loop.token = token
    context = browser.new_context(**{"locale": "en-US", **context_options})
    try:
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.on("console", on_console)
        page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
        result = script(page)
    finally:
        context.close()
        _test_loop.token = None
    assert problems == [], problems
    return result


async def in_browser(chromium: BrowserThread, script: Callable[[Page], T], **context_options: Any) -> T:
    """Run ``script(page)`` in a new context of the process's headless Chromium, on the browser's thread
    (the server keeps serving)."""
    token = trio.lowlevel.current_trio_token()
    job = functools.partial(_run_browser, script=script, context_options=context_options, token=token)
    return await trio.to_thread.run_sync(chromium.run, job)


def on_server(function: Callable[..., T], *args: Any) -> T:
    """In a browser script: ``function(*args)`` in the test's Trio loop, where the server runs."""
    return trio.from_thread.run_sync(function, *args, trio_token=_test_loop.token)


def on_server_async(function: Callable[..., Awaitable[T]], *args: Any) -> T:
    """In a browser script: ``await function(*args)`` in the test's Trio loop."""
    return trio.from_thread.run(function, *args, trio_token=_test_loop.token)


def server_stats(server: RunningServer) -> dict[str, int]:
    """The server's upload counters and worker jobs, read inside its Trio loop (for the browser thread)."""

    def read() -> dict[str, int]:
        stats = server.state.stats
        return {
            "in_flight": stats.uploads_in_flight,
            "completed": stats.uploads_completed,
            "failed": stats.uploads_failed,
            "jobs_running": server.state.workers.snapshot()["jobs_running"],
        }

    return on_server(read)


def throttle(page: Page, *, up: int = -1, down: int = -1) -> None:
    """Chromium's own network emulation: at most ``up`` / ``down`` bytes a second (-1: no limit)."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    conditions = {"offline": False, "latency": 0, "downloadThroughput": down, "uploadThroughput": up}
    cdp.send("Network.emulateNetworkConditions", conditions)


# ------------------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def sample_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GH-Archive-like hours from the project's generator, plus what the result view must explain: a file
    that is not JSON, a file with events that have no actor, and entries the server ignores."""
    out = tmp_path_factory.mktemp("page") / "2024-01-01.zip"
    cmd = [sys.executable, str(ROOT / "loadtest" / "gen_dataset.py"), "--out", str(out), "--kind", "zip"]
    cmd += ["--events", "3000", "--files", "3", "--seed", "5"]
    subprocess.run(cmd, check=True, timeout=60, capture_output=True)
    without_actors, _ = make_events(40, seed=3, without_actor_every=4)
    with zipfile.ZipFile(out, "a") as archive:
        archive.writestr("2024-01-01-16.json", b'{"id": "1", "type": "PushEvent"}\n{"id": 2, oops\n')
        archive.writestr("2024-01-01-17.json", as_ndjson(without_actors))
        archive.writestr("__MACOSX/._2024-01-01-15-000.json", b"\0")
        archive.writestr("README.txt", b"not events")
    return out


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where screenshots go: the test's temp dir, or ``PAGE_SCREENSHOT_DIR`` when set."""
    return Path(SCREENSHOT_DIR) if SCREENSHOT_DIR else tmp_path


async def json_answer(server: RunningServer, path: Path) -> dict[str, Any]:
    """The server's JSON answer for the same file, sent as a plain client would."""
    async with httpx.AsyncClient(base_url=server.url, timeout=60, verify=False) as client:
        response = await client.post(
            "/api/v1/upload",
            content=await trio.Path(path).read_bytes(),
            headers={"content-type": "application/zip"},
        )
    assert response.status_code == 200, response.text
    return response.json()


def en(number: int) -> str:
    return f"{number:,}"


def de(number: int) -> str:
    return f"{number:,}".replace(",", ".")


def upload_through_page(page: Page, server: RunningServer, path: Path, *, tap: bool = False) -> Locator:
    """Open the page, choose ``path`` with the keyboard (focus the button, Enter) or a finger; return
    its card."""
    page.goto(server.url)
    button = page.get_by_role("button", name="Choose files…")
    with page.expect_file_chooser() as chooser:
        if tap:
            button.tap()
        else:
            button.focus()
            page.keyboard.press("Enter")
    chooser.value.set_files(str(path))
    return page.locator("article.upload").first


# ------------------------------------------------------------------------------------ the result
async def test_a_zip_uploaded_through_the_page_shows_the_servers_answer(
    chromium: BrowserThread, start_server: StartServer, sample_zip: Path, shots: Path
) -> None:
    server = await start_server()
    expected = await json_answer(server, sample_zip)

    def script(page: Page) -> dict[str, Any]:
        page.set_viewport_size({"width": 1000, "height": 900})
        card = upload_through_page(page, server, sample_zip)
        expect(card.locator(".result")).to_be_visible()
        shown = read_result(card)
        for scheme in ("light", "dark"):
            page.emulate_media(color_scheme=scheme)
            card.screenshot(path=shots / f"page-result-{scheme}.png")
        shown["downloads"] = read_downloads(page, card)
        shown["sorting"] = exercise_actor_table(card, expected["actors"])
        return shown

    shown = await in_browser(chromium, script)
    summary = expected["summary"]
    skipped = sum(summary["skipped"].values())
    assert skipped > 0 and summary["files_failed"] == 1 and summary["files_ignored"] == 2
    assert shown["status"] == f"Done: {en(summary['events'])} events read."
    assert shown["counts"] == {
        key: en(summary[key]) for key in ("events", "unique_actors", "files", "files_failed", "files_ignored")
    } | {"skipped": en(skipped)}
    assert shown["bars"] == {name: (n, f"{en(n)} (") for name, n in summary["event_types"].items()}
    _assert_tables(shown, expected)
    _assert_downloads(shown["downloads"], expected)
    for scheme in ("light", "dark"):
        assert (shots / f"page-result-{scheme}.png").read_bytes().startswith(b"\x89PNG")


def read_result(card: Locator) -> dict[str, Any]:
    bars = {}
    for bar in card.locator("g.bar").all():
        value = bar.locator(".bar-value").text_content() or ""
        bars[bar.get_attribute("data-type")] = (
            int(bar.get_attribute("data-count") or -1),
            value[: value.index("(") + 1],
        )
    return {
        "status": card.locator(".status").inner_text(),
        "counts": {
            dd.get_attribute("data-count"): dd.inner_text() for dd in card.locator("dd[data-count]").all()
        },
        "bars": bars,
        "actors": [
            row.locator("td").all_inner_texts() for row in card.locator("table.actors tbody tr").all()
        ],
        "actors_shown": card.locator(".actors-shown").inner_text(),
        "files": [row.locator("td").all_inner_texts() for row in card.locator("table.files tbody tr").all()],
    }


def read_downloads(page: Page, card: Locator) -> dict[str, Any]:
    texts = {}
    for link in ("download-json", "download-ndjson"):
        with page.expect_download() as download:
            card.locator(f".{link}").click()
        texts[link] = (download.value.suggested_filename, Path(download.value.path()).read_text())
    return texts


def _assert_tables(shown: dict[str, Any], expected: dict[str, Any]) -> None:
    actors = sorted(expected["actors"], key=lambda a: -a["events"])
    assert len(shown["actors"]) == min(100, len(actors))
    assert shown["actors"][0][1] == en(actors[0]["events"])
    assert [int(events.replace(",", "")) for _, events in shown["actors"]] == [
        a["events"] for a in actors[:100]
    ]
    by_login = {a["login"]: a["events"] for a in expected["actors"]}
    assert all(by_login[login] == int(events.replace(",", "")) for login, events in shown["actors"])
    assert shown["actors_shown"] == f"Showing 100 of {en(len(actors))} actors."
    rows = {row[0]: row for row in shown["files"]}
    assert set(rows) == {f["name"] for f in expected["files"]} | {i["name"] for i in expected["ignored"]}
    for file in expected["files"]:
        if file["error"] is None:
            assert rows[file["name"]][2] == en(file["events"])
    assert rows["2024-01-01-16.json"][3].startswith("Failed: not valid JSON (line 2, byte ")
    assert rows["2024-01-01-17.json"][3] == "Read; skipped 10 events without an actor."
    assert rows["README.txt"][3] == "Ignored: not named .json, .ndjson or .jsonl."
    assert rows["__MACOSX/._2024-01-01-15-000.json"][3] == "Ignored: macOS metadata."
    assert shown["sorting"]["events_ascending"][0] == min(a["events"] for a in actors)
    assert shown["sorting"]["events_ascending"] == sorted(shown["sorting"]["events_ascending"])
    assert shown["sorting"]["login_sorted"] and shown["sorting"]["login_first_is_least"]
    bots = [a for a in actors if "bot" in a["login"].lower()]
    assert shown["sorting"]["filtered"] == (
        f"{en(len(bots))} of {en(len(actors))} actors match; all shown.",
        True,
    )


def _assert_downloads(downloads: dict[str, Any], expected: dict[str, Any]) -> None:
    name, text = downloads["download-json"]
    assert name == "2024-01-01.answer.json"
    answer = json.loads(text)
    volatile = {"upload_id", "timing_ms"}
    assert list(answer) == list(expected)  # the same document, keys in the same order
    assert {k: v for k, v in answer.items() if k not in volatile} == {
        k: v for k, v in expected.items() if k not in volatile
    }
    name, text = downloads["download-ndjson"]
    assert name == "2024-01-01.events.ndjson"
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == expected["summary"]["events"]
    assert {line["kind"] for line in lines} == {"event"}


def exercise_actor_table(card: Locator, actors: list[dict[str, Any]]) -> dict[str, Any]:
    """Sort with the keyboard (focus a column's button, Enter) and filter; report what the table showed."""
    events = card.get_by_role("button", name="Events", exact=True)
    events.focus()
    events.press("Enter")
    expect(events.locator("xpath=..")).to_have_attribute("aria-sort", "ascending")
    ascending = [int(t.replace(",", "")) for t in card.locator("table.actors tbody td.num").all_inner_texts()]
    login = card.get_by_role("button", name="Login", exact=True)
    login.focus()
    login.press("Enter")
    expect(login.locator("xpath=..")).to_have_attribute("aria-sort", "ascending")
    expect(events.locator("xpath=..")).to_have_attribute("aria-sort", "none")
    logins = card.locator("table.actors tbody tr td:first-child").all_inner_texts()
    compare = "(a, b) => a.localeCompare(b, undefined, {sensitivity: 'base', numeric: true})"
    # Sorted by the page's own rule, and its first row is the least of *all* actors, not of the top 100.
    ordered = card.evaluate(
        f"(_, logins) => logins.every((l, i) => i === 0 || ({compare})(logins[i - 1], l) <= 0)", logins
    )
    least = card.evaluate(
        f"(_, all) => all.reduce((m, l) => ({compare})(l, m) < 0 ? l : m)", [a["login"] for a in actors]
    )
    card.get_by_label("Filter by login").fill("BOT")
    rows = card.locator("table.actors tbody tr td:first-child").all_inner_texts()
    filtered = (card.locator(".actors-shown").inner_text(), all("bot" in r.lower() for r in rows))
    return {
        "events_ascending": ascending,
        "login_sorted": ordered,
        "login_first_is_least": logins[0] == least,
        "filtered": filtered,
    }


# ---------------------------------------------------------------------------- processing progress
WATCH_PROGRESS = """() => {
    window.progressSeen = [];
    new MutationObserver(() => {
        const detail = document.querySelector(".detail-process");
        const bar = document.querySelector(".bar-process");
        if (!detail || !bar || !detail.textContent) return;
        const seen = [detail.textContent, bar.hasAttribute("value") ? bar.value : null, bar.max];
        const last = window.progressSeen[window.progressSeen.length - 1];
        if (!last || last[0] !== seen[0]) window.progressSeen.push(seen);
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


async def test_the_processing_bar_follows_the_progress_lines(
    chromium: BrowserThread, start_server: StartServer, sample_zip: Path
) -> None:
    server = await start_server()
    expected = await json_answer(server, sample_zip)

    def script(page: Page) -> list[list[Any]]:
        page.goto(server.url)
        throttle(page, down=256 * 1024)  # the answer (about 1 MB) is read in several pieces
        page.evaluate(WATCH_PROGRESS)
        page.set_input_files("#file-input", str(sample_zip))
        expect(page.locator("article.upload .result")).to_be_visible()
        return page.evaluate("() => window.progressSeen")

    seen = await in_browser(chromium, script)
    pattern = re.compile(r"^(\d+) of (\d+) files · ([\d.]+ \S+) of ([\d.]+ \S+) · ([\d,]+) events$")
    states = [(pattern.match(text), value, top) for text, value, top in seen if pattern.match(text)]
    assert len(states) >= 3, seen  # the start, some jobs done, the end
    done = [int(m.group(1)) for m, _, _ in states]
    assert done == sorted(done) and done[0] < done[-1], seen
    last, value, top = states[-1]
    processed = expected["summary"]["files"]
    assert (int(last.group(1)), int(last.group(2))) == (processed, processed)
    assert last.group(3) == last.group(4)
    assert last.group(5) == en(expected["summary"]["events"])
    assert value == top and all(v is not None for _, v, _ in states)  # determinate, full at the end


# ---------------------------------------------------------------------------- a phone, in German
async def test_a_375_px_screen_in_german_fits_and_formats_numbers_for_its_reader(
    chromium: BrowserThread, start_server: StartServer, sample_zip: Path, shots: Path
) -> None:
    server = await start_server()
    expected = await json_answer(server, sample_zip)

    def script(page: Page) -> tuple[int, list[str], dict[str, Any]]:
        card = upload_through_page(page, server, sample_zip, tap=True)
        expect(card.locator(".result")).to_be_visible()
        page.screenshot(path=shots / "page-result-375.png", full_page=True)
        width = page.evaluate("document.documentElement.scrollWidth")
        # Anything drawn past the right edge (outside a scrolling region) would need a sideways scroll.
        sticking_out = page.evaluate(
            """() => [...document.querySelectorAll('body *')]
                 .filter(e => e.getBoundingClientRect().right > innerWidth + 0.5)
                 .map(e => `${e.tagName.toLowerCase()}.${e.getAttribute('class') || ''}`)"""
        )
        return width, sticking_out, read_result(card)

    width, sticking_out, shown = await in_browser(
        chromium,
        script,
        viewport={"width": 375, "height": 812},
        locale="de-DE",
        is_mobile=True,
        has_touch=True,
    )
    assert width <= 375
    assert sticking_out == []
    summary = expected["summary"]
    assert summary["events"] >= 1000  # so that the grouping separator shows
    assert shown["counts"]["events"] == de(summary["events"])
    assert shown["counts"]["unique_actors"] == de(summary["unique_actors"])
    assert shown["status"] == f"Done: {de(summary['events'])} events read."
    assert shown["bars"] == {name: (n, f"{de(n)} (") for name, n in summary["event_types"].items()}


# ----------------------------------------------------------------------------------------- cancel
def poll(predicate: Callable[[], bool], within: float = 30.0) -> None:
    """In the browser thread: wait for server state to reach ``predicate``; fail after ``within``."""
    deadline = on_server(trio.current_time) + within
    while not predicate():
        assert on_server(trio.current_time) < deadline, "the server never got there"
        on_server_async(trio.sleep, 0.02)


async def assert_let_go(server: RunningServer) -> None:
    """After a Cancel: nothing in flight, the upload counted as failed, no worker busy, no temp file, and
    the server still answers."""
    await wait_until(lambda: server.state.stats.uploads_in_flight == 0, within=10)
    assert (server.state.stats.uploads_completed, server.state.stats.uploads_failed) == (0, 1)
    assert server.state.workers.snapshot()["jobs_running"] == 0
    await assert_no_leftovers(server)
    await assert_still_serving(server)


async def test_cancel_aborts_the_upload_and_the_server_lets_it_go(
    chromium: BrowserThread, start_server: StartServer, tmp_path: Path
) -> None:
    server = await start_server()
    big = tmp_path / "big.zip"
    # 6 MiB: under the page's RESUMABLE_FROM_BYTES, so this is the POST path's Cancel.
    big.write_bytes(make_zip({"big.json": os.urandom(6 << 20)}, zipfile.ZIP_STORED))

    def script(page: Page) -> tuple[str, float, str, bool]:
        page.goto(server.url)
        throttle(page, up=1 << 20)  # the 6 MiB upload is still going when Cancel is pressed
        page.set_input_files("#file-input", str(big))
        card = page.locator("article.upload").first
        poll(lambda: server_stats(server)["in_flight"] == 1 and bool(server.leftover_files()))
        expect(card.locator(".detail-upload")).to_contain_text("left")
        during = card.locator(".detail-upload").inner_text()
        bar = card.get_by_role("progressbar", name="Upload")
        sent = float(bar.evaluate("(bar) => bar.value / bar.max"))
        card.get_by_role("button", name="Cancel big.zip").press("Enter")
        expect(card.locator(".status")).to_contain_text("Cancelled")
        return during, sent, card.locator(".status").inner_text(), card.locator(".cancel").is_hidden()

    during, sent, status, cancel_hidden = await in_browser(chromium, script)
    assert " of 6 MiB sent (" in during and "/s · " in during, during
    assert 0 < sent < 1
    assert status == "Cancelled. The server stops its work on this upload when the connection closes."
    assert cancel_hidden
    await assert_let_go(server)


@pytest.fixture(scope="module")
def long_answer_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five hours of 7,200 events: ~11 MB of event lines, streamed as each file's job ends.

    Many times what the kernel's socket buffers and the browser's read-ahead take from a reader throttled to
    32 KiB/s: the server is still sending the lines, so still processing and in flight, when Cancel comes.
    With ``sample_zip``'s 1 MB of lines, CI once found the work ended (nothing in flight) before Cancel.
    """
    out = tmp_path_factory.mktemp("page") / "2024-01-02.zip"
    hours = {f"2024-01-02-{hour}.json": as_ndjson(make_events(7200, seed=hour)[0]) for hour in range(5)}
    out.write_bytes(make_zip(hours))
    return out


async def test_cancel_while_the_answer_streams_ends_the_servers_work_too(
    chromium: BrowserThread, start_server: StartServer, long_answer_zip: Path
) -> None:
    server = await start_server()

    def script(page: Page) -> None:
        page.goto(server.url)
        throttle(page, down=32 * 1024)
        page.set_input_files("#file-input", str(long_answer_zip))
        card = page.locator("article.upload").first
        expect(card.locator(".detail-process")).to_contain_text(" of 5 files")
        assert server_stats(server)["in_flight"] == 1
        card.get_by_role("button", name=f"Cancel {long_answer_zip.name}").press("Enter")
        expect(card.get_by_role("status")).to_contain_text("Cancelled")

    await in_browser(chromium, script)
    await assert_let_go(server)


# ----------------------------------------------------------------------------------------- refusals
async def test_a_name_not_accepted_is_refused_before_upload_and_unknown_content_gets_415(
    chromium: BrowserThread, server: RunningServer, tmp_path: Path
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not events")
    fake = tmp_path / "events.json"
    fake.write_bytes(b"hello, this is not JSON\n")

    def script(page: Page) -> dict[str, Any]:
        page.goto(server.url)
        page.set_input_files("#file-input", str(notes))
        refused = page.locator("#refused")
        expect(refused).to_contain_text("notes.txt")
        seen = {"refused": refused.inner_text(), "cards": page.locator("article.upload").count()}
        seen["stats_after_refusal"] = server_stats(server)
        page.set_input_files("#file-input", str(fake))
        card = page.locator("article.upload").first
        alert = card.get_by_role("alert")  # what a screen reader announces
        expect(alert).not_to_be_empty()
        seen |= {"error": alert.inner_text(), "status": card.get_by_role("status").inner_text()}
        seen["refused_after"] = refused.inner_text()
        return seen

    seen = await in_browser(chromium, script)
    assert (
        seen["refused"]
        == "Not uploaded: “notes.txt”. Only .zip, .gz, .json, .ndjson or .jsonl files are accepted."
    )
    assert seen["cards"] == 0
    assert seen["stats_after_refusal"] == {"in_flight": 0, "completed": 0, "failed": 0, "jobs_running": 0}
    assert seen["error"] == (
        "The server did not recognise this file as a ZIP archive, a gzip file or JSON text. "
        "It judges by the first bytes, not by the name."
    )
    assert seen["status"] == "Failed."
    assert seen["refused_after"] == ""
    assert server.state.stats.uploads_failed == 1
    await assert_no_leftovers(server)


async def test_a_file_over_the_limit_gets_413_with_the_limit_in_words(
    chromium: BrowserThread, start_server: StartServer, tmp_path: Path
) -> None:
    server = await start_server(max_upload_bytes=64 * 1024)
    big = tmp_path / "hour.json"
    big.write_bytes(b"[" + b" " * (256 * 1024 - 2) + b"]")

    def script(page: Page) -> tuple[str, str]:
        page.goto(server.url)
        expect(page.locator("#limit")).to_have_text(", up to 64 KiB each.")
        page.set_input_files("#file-input", str(big))
        error = page.locator("article.upload .error-text")
        expect(error).not_to_be_empty()
        return error.inner_text(), page.locator("#accepted").inner_text()

    error, accepted = await in_browser(chromium, script)
    assert error == "This file is 256 KiB; the server accepts at most 64 KiB in one upload."
    assert accepted == "Accepted: .zip, .gz, .json, .ndjson, .jsonl, up to 64 KiB each."
    await assert_no_leftovers(server)
    await assert_still_serving(server)


async def test_a_busy_server_gets_a_countdown_from_retry_after_then_a_retry(
    chromium: BrowserThread, start_server: StartServer, tmp_path: Path
) -> None:
    events, truth = make_events(20, seed=1)
    body = as_ndjson(events)
    hour = tmp_path / "hour.ndjson"
    hour.write_bytes(body)
    # The holder's declared size takes all but a few bytes of the spool budget: the page's upload, which
    # declares its own size, does not fit until the holder's upload is done.
    holding = events_json(1, pad=48 * 1024)
    server = await start_server(spool_budget=len(holding) + len(body) // 2)
    holder = await RawClient.connect(server)
    await holder.send(upload_head(len(holding)) + holding[:10])
    await wait_until(lambda: server.state.stats.uploads_in_flight == 1)

    def script(page: Page) -> tuple[str, str]:
        page.goto(server.url)
        page.set_input_files("#file-input", str(hour))
        card = page.locator("article.upload").first
        alert = card.get_by_role("alert")
        expect(alert).to_contain_text("Retrying in")
        busy = alert.inner_text()
        expect(card.get_by_role("button", name="Retry now")).to_be_visible()
        on_server_async(holder.send, holding[10:])  # the budget frees once that upload is answered
        expect(card.locator(".result")).to_be_visible()
        return busy, card.locator("dd[data-count=events]").inner_text()

    busy, shown_events = await in_browser(chromium, script)
    assert busy == "The server's storage for uploads is taken by uploads in progress. Retrying in 1 second…"
    assert shown_events == en(truth.events)
    assert (await holder.read_response()).status == 200
    await holder.aclose()


async def test_files_dropped_on_the_page_are_sorted_into_uploads_and_refusals(
    chromium: BrowserThread, server: RunningServer
) -> None:
    events, truth = make_events(30, seed=2)

    def script(page: Page) -> dict[str, Any]:
        page.goto(server.url)
        # What a drop from a file manager delivers: a DataTransfer holding File objects.
        drop = page.evaluate_handle(
            """(text) => {
                 const data = new DataTransfer();
                 data.items.add(new File([text], "hour.ndjson", {type: ""}));
                 data.items.add(new File(["\\x89PNG"], "photo.png", {type: "image/png"}));
                 return data;
               }""",
            as_ndjson(events).decode(),
        )
        zone = page.locator("#drop-zone")
        zone.dispatch_event("dragenter", {"dataTransfer": drop})
        dragging = "is-dragging" in (zone.get_attribute("class") or "")
        zone.dispatch_event("drop", {"dataTransfer": drop})
        card = page.locator("article.upload").first
        expect(card.locator(".result")).to_be_visible()
        return {
            "dragging": dragging,
            "after_drop": zone.get_attribute("class"),
            "cards": page.locator("article.upload").count(),
            "name": card.locator(".upload-name").inner_text(),
            "events": card.locator("dd[data-count=events]").inner_text(),
            "refused": page.locator("#refused").inner_text(),
        }

    seen = await in_browser(chromium, script)
    assert seen["dragging"] and seen["after_drop"] == "drop-zone"
    assert (seen["cards"], seen["name"], seen["events"]) == (1, "hour.ndjson", en(truth.events))
    assert (
        seen["refused"]
        == "Not uploaded: “photo.png”. Only .zip, .gz, .json, .ndjson or .jsonl files are accepted."
    )
