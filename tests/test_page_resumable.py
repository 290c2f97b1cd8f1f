"""The upload page's resumable path in a real browser: a file of the page's tus threshold and more goes
through tus-js-client; after a reload mid-upload the same file chosen again continues from the server's
offset; its errors read as the POST path's, and Cancel deletes what the server held. Debian's headless
Chromium, driven by Playwright, against the real server on a real socket (the harness is
tests/test_page.py's)."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Page, Request, Route, expect

from browser import BrowserThread
from conftest import RunningServer, StartServer, wait_until
from test_page import WAIT_MS, en, in_browser, on_server, read_downloads, read_result
from test_tus import FILES, TUS, dataset

APP_JS = Path(__file__).resolve().parent.parent / "src" / "upload_server" / "static" / "app.js"


def page_constant(name: str) -> int:
    """One of app.js's byte sizes (``const NAME = 8 * 1024 * 1024;``), so the test follows the page."""
    found = re.search(rf"const {name} = ([\d *]+);", APP_JS.read_text())
    assert found, f"{name} is not in app.js"
    return math.prod(int(factor) for factor in found.group(1).split("*"))


RESUMABLE_FROM = page_constant("RESUMABLE_FROM_BYTES")
CHUNK = page_constant("RESUMABLE_CHUNK_BYTES")

STORED_UPLOADS = """() => Object.keys(localStorage)
    .filter((key) => key.startsWith("tus::"))
    .map((key) => JSON.parse(localStorage.getItem(key)).uploadUrl)"""

WATCH_STATUS = """() => {
    window.statusSeen = [];
    new MutationObserver(() => {
        const status = document.querySelector("article.upload .status");
        const last = window.statusSeen[window.statusSeen.length - 1];
        if (status && status.textContent !== last) window.statusSeen.push(status.textContent);
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def incomplete_uploads(server: RunningServer) -> dict[str, int]:
    """The server's incomplete tus uploads (id → durable offset), read inside its Trio loop."""

    def read() -> dict[str, int]:
        assert server.state.resumable is not None
        return dict(server.state.resumable.incomplete)

    return on_server(read)


Hold = Callable[[Request], bool]


def later_chunk(request: Request) -> bool:
    """Every PATCH but an upload's first (at offset 0): held, a reload or a Cancel comes at a known
    offset, one chunk, acknowledged and so durable on the server."""
    return request.method == "PATCH" and request.headers.get("upload-offset") != "0"


def result_read(request: Request) -> bool:
    """The first look at a result: held, a reload comes after the last byte and before the answer."""
    return request.method == "GET" and request.url.endswith("/result")


def hold_requests(page: Page, should_hold: Hold) -> list[Route]:
    """From now on, requests to the tus routes that ``should_hold`` picks are held in the browser, never
    sent (a reload or an abort ends them); the others go on. Returns the held ones, as they come."""
    held: list[Route] = []

    def hold(route: Route) -> None:
        if should_hold(route.request):
            held.append(route)
        else:
            route.continue_()

    page.route("**/api/v1/files/*", hold)
    page.route("**/api/v1/files/*/result", hold)
    return held


def choose_until_held(page: Page, source: Path, should_hold: Hold) -> None:
    """Choose ``source`` and wait until the page sends a request ``should_hold`` picks (held)."""
    held = hold_requests(page, should_hold)
    page.set_input_files("#file-input", str(source))
    wait_for_held(page, held)


def wait_for_held(page: Page, held: list[Route]) -> None:
    deadline = time.monotonic() + 30
    while not held:
        assert time.monotonic() < deadline, "the page never sent the request to hold"
        page.wait_for_timeout(20)  # Playwright dispatches the route handler while it waits


def reload(page: Page, requests: list[Request], loads: list[int]) -> None:
    page.reload()
    page.unroute_all(behavior="ignoreErrors")  # only now: a held request let go of would be sent
    page.evaluate(WATCH_STATUS)
    loads.append(len(requests))


async def test_a_large_file_goes_through_tus_and_resumes_after_a_reload(
    chromium: BrowserThread, start_server: StartServer, tmp_path: Path
) -> None:
    """Reloaded between its two chunks, the file chosen again sends only the second; reloaded again
    between its last byte and its result, chosen again it sends no byte and shows the result."""
    server = await start_server()
    body, truth = dataset(files=4, events=5200)
    assert RESUMABLE_FROM <= CHUNK < len(body) < 2 * CHUNK  # two chunks: the first reload between them
    source = tmp_path / "day.zip"
    source.write_bytes(body)

    def script(page: Page) -> dict[str, Any]:
        requests: list[Request] = []
        page.on("request", lambda request: requests.append(request))
        loads = [0]
        page.goto(server.url)
        choose_until_held(page, source, later_chunk)
        seen: dict[str, Any] = {"before_reload": incomplete_uploads(server)}
        reload(page, requests, loads)
        seen["stored"] = page.evaluate(STORED_UPLOADS)
        # What the server holds for the stored URL, asked as any tus client would.
        seen["head"] = httpx.head(server.url + seen["stored"][0], headers=TUS, verify=False).headers[
            "upload-offset"
        ]
        choose_until_held(page, source, result_read)  # the same file, chosen again
        seen["statuses"] = page.evaluate("window.statusSeen")
        reload(page, requests, loads)
        page.set_input_files("#file-input", str(source))  # and again
        card = page.locator("article.upload").first
        expect(card.locator(".result")).to_be_visible(timeout=WAIT_MS)
        page.wait_for_function(f"() => ({STORED_UPLOADS})().length === 0")  # forgotten once shown
        seen |= {"shown": read_result(card), "statuses_after": page.evaluate("window.statusSeen")}
        seen["answer"] = json.loads(read_downloads(page, card)["download-json"][1])
        bounds = [*loads, len(requests)]
        seen["loads"] = [
            [(r.method, r.url, r.headers.get("upload-offset")) for r in requests[start:end]]
            for start, end in itertools.pairwise(bounds)
        ]
        return seen

    seen = await in_browser(chromium, script)
    # Before the reload the server held exactly the first chunk, and said so to the resuming page.
    [(upload_id, offset)] = seen["before_reload"].items()
    assert offset == CHUNK
    url = f"{server.url}{FILES}/{upload_id}"
    assert seen["stored"] == [f"{FILES}/{upload_id}"]  # as the server's Location said it
    assert seen["head"] == str(CHUNK)
    _assert_resumed(seen, url, len(body))
    # The result is the dataset's ground truth, shown as the POST path shows it.
    answer = seen["answer"]
    assert answer["sha256"] == hashlib.sha256(body).hexdigest()
    assert answer["summary"]["events"] == truth.events
    assert {a["id"]: a["events"] for a in answer["actors"]} == dict(truth.actor_events)
    assert answer["summary"]["event_types"] == dict(truth.event_types)
    assert seen["shown"]["status"] == f"Done: {en(truth.events)} events read."
    assert seen["shown"]["counts"]["events"] == en(truth.events)
    assert seen["shown"]["counts"]["unique_actors"] == en(len(truth.actor_events))
    # The page deleted the server's copy once it held the answer: nothing is left on disk.
    await wait_until(lambda: not any((server.tmp_dir / "resumable").iterdir()), within=5)
    assert server.leftover_files() == ["resumable"]
    assert server.state.resumable is not None and server.state.resumable.incomplete == {}


def _assert_resumed(seen: dict[str, Any], url: str, size: int) -> None:
    """The later page loads created nothing and sent only what the server lacked: one PATCH from the
    first chunk's end, then none at all. Every request of every load went to the page's own origin."""
    origin = url.split(FILES)[0] + "/"
    first, second, third = seen["loads"]
    assert all(request_url.startswith(origin) for _, request_url, _ in first + second + third)

    def tus(load: list[tuple[str, str, str | None]]) -> list[tuple[str, str, str | None]]:
        return [(m, u.removeprefix(url) or "/", o) for m, u, o in load if u.startswith(origin + FILES[1:])]

    assert tus(first) == [
        ("POST", f"{origin}{FILES[1:]}", None),
        ("PATCH", "/", "0"),
        ("PATCH", "/", str(CHUNK)),  # held in the browser, never sent
    ]
    assert tus(second) == [("HEAD", "/", None), ("PATCH", "/", str(CHUNK)), ("GET", "/result", None)]
    assert tus(third)[0] == ("HEAD", "/", None)
    assert {request[:2] for request in tus(third)[1:-1]} == {("GET", "/result")}  # 202s, then the answer
    assert tus(third)[-1] == ("DELETE", "/", None)
    resumed = f"Resumed at {_mib(CHUNK)} of {_mib(size)}: the server kept what it had received."
    assert resumed in seen["statuses"]
    assert "The server has all of this file already; its result follows." in seen["statuses_after"]


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}".removesuffix(".0") + " MiB"


async def test_the_resumable_paths_errors_in_words_and_cancel_leave_nothing_behind(
    chromium: BrowserThread, start_server: StartServer, tmp_path: Path
) -> None:
    """One page for three files (a page's start is much of a test's time): two refused as the
    server's JSON errors say, in the POST path's words; the third cancelled with a chunk on the server."""
    server = await start_server(max_upload_bytes=RESUMABLE_FROM + (2 << 20))
    too_large = tmp_path / "big.zip"  # refused at creation, before a byte is sent
    too_large.write_bytes(b"\0" * (RESUMABLE_FROM + (3 << 20)))
    not_events = tmp_path / "hour.json"  # one chunk, received whole, then refused by processing
    not_events.write_bytes((b"this is not JSON\n" * (RESUMABLE_FROM // 17 + 1))[:RESUMABLE_FROM])
    cancelled = tmp_path / "day.zip"  # two chunks; the second is held, then Cancel
    cancelled.write_bytes(b"PK\3\4" + b"\0" * (CHUNK + (1 << 20)))

    def script(page: Page) -> dict[str, Any]:
        requests: list[tuple[str, str]] = []
        page.on("request", lambda r: requests.append((r.method, r.url.removeprefix(server.url))))
        held = hold_requests(page, later_chunk)
        page.goto(server.url)
        page.set_input_files("#file-input", [str(too_large), str(not_events), str(cancelled)])
        seen: dict[str, Any] = {}
        for path in (too_large, not_events):
            card = page.locator("article.upload").filter(has_text=path.name)
            expect(card.locator(".status")).to_have_text("Failed.", timeout=WAIT_MS)
            seen[path.name] = card.locator(".error-text").inner_text()
        wait_for_held(page, held)
        seen |= {"held": incomplete_uploads(server), "stored": page.evaluate(STORED_UPLOADS)}
        with page.expect_request(lambda r: r.method == "DELETE" and r.url == held[0].request.url):
            page.get_by_role("button", name=f"Cancel {cancelled.name}").press("Enter")
        seen["cancelled"] = page.locator("article.upload .status").first.inner_text()
        page.wait_for_function(f"() => ({STORED_UPLOADS})().length === 0")
        return seen | {"requests": requests}

    seen = await in_browser(chromium, script)
    _assert_the_errors_went_through_tus(seen.pop("requests"))
    [(upload_id, offset)] = seen.pop("held").items()
    assert offset == CHUNK  # the server held the cancelled file's first chunk when Cancel was pressed
    assert seen.pop("stored") == [f"{FILES}/{upload_id}"]
    assert seen == {
        "big.zip": "This file is 11 MiB; the server accepts at most 10 MiB in one upload.",
        "hour.json": (
            "The server did not recognise this file as a ZIP archive, a gzip file or JSON text. "
            "It judges by the first bytes, not by the name."
        ),
        "cancelled": "Cancelled. The server removes what it received of this file.",
    }
    await wait_until(lambda: not any((server.tmp_dir / "resumable").iterdir()), within=5)
    assert server.leftover_files() == ["resumable"]
    assert server.state.resumable is not None and server.state.resumable.incomplete == {}


def _assert_the_errors_went_through_tus(requests: list[tuple[str, str]]) -> None:
    """Three creations (the first refused); one PATCH for the one-chunk file, its result read (after 202s
    while queued) and, being final, deleted; the cancelled file's first PATCH, then its DELETE. Per
    upload, in order (the page deletes a result while the next file starts)."""
    assert [method for method, path in requests if path == FILES] == ["POST"] * 3
    by_upload: dict[str, list[str]] = {}
    for method, path in requests:
        if path.startswith(f"{FILES}/"):
            methods = by_upload.setdefault(path.split("/")[4], [])
            if (method, methods[-1:]) != ("GET", ["GET"]):  # a result read again after a 202
                methods.append(method)
    assert sorted(by_upload.values()) == [["PATCH", "GET", "DELETE"], ["PATCH", "PATCH", "DELETE"]]
    assert all(path != "/api/v1/upload" for _, path in requests)
