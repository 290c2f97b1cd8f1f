"""Issue 7's classes end to end: each sample through the real server on a real socket, with real workers.
One server for all samples (a server start costs a worker spawn): every answer is checked, then that
nothing was left behind and that the server still serves."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import trio

import test_zip_hardening as samples
from conftest import RunningServer, StartServer, wait_until
from server_process import descendants
from upload_server.ingest.extract import MAX_EVENT_TYPES
from zipcraft import STORED, build, entry

UPLOAD = "/api/v1/upload"
Check = Callable[[dict[str, Any]], bool]


def answered(events: int) -> Check:
    return lambda body: body["summary"]["events"] == events and body["summary"]["files_failed"] == 0


def refused(code: str, reason: str | None = None, *, without: str = "Errno") -> Check:
    def check(body: dict[str, Any]) -> bool:
        error = body["error"]
        detail = error["detail"]
        return (
            error["code"] == code
            and (reason is None or detail.get("reason") == reason)
            and without not in error["message"]
        )

    return check


def actors_json() -> bytes:
    return (
        b'{"type":"A","actor":{"id":1}}\n{"type":"A","actor":{"id":1e400}}\n'
        b'{"type":"A","actor":{"id":' + b"9" * 5000 + b"}}\n"
    )


def invalid_actors(body: dict[str, Any]) -> bool:
    return body["summary"]["events"] == 3 and body["summary"]["skipped"] == {"invalid_actor": 2}


def lone_surrogate(body: dict[str, Any]) -> bool:
    (file,) = body["files"]
    return "surrogate" in file["error"]["message"] and "truncated" not in file["error"]["message"]


def typed(names: list[str], pad_to: int = 0) -> bytes:
    """One event per type name, then events of the first type up to ``pad_to`` bytes."""
    lines = b"".join(b'{"type":"%s","actor":{"id":1}}\n' % name.encode() for name in names)
    pad = b'{"type":"%s","actor":{"id":2}}\n' % names[0].encode()
    return lines + pad * max(0, (pad_to - len(lines)) // len(pad))


def types_apart(count: int, *, pad_to: int = 0) -> bytes:
    """Two files of ``count`` distinct types each, none shared. Padded past 1 MiB each (stored, so under
    every ratio guard), they are two jobs (dispatch.batch_entries) and meet only in the final merge."""
    halves = [typed([f"{side}{i}" for i in range(count)], pad_to) for side in "AB"]
    return build([entry(f"{side}.json", half, STORED) for side, half in zip("ab", halves, strict=True)])


def one_file_failed(code: str) -> Check:
    def check(body: dict[str, Any]) -> bool:
        (file,) = body["files"]
        return body["summary"]["files_failed"] == 1 and file["error"]["code"] == code

    return check


def too_long(body: dict[str, Any]) -> bool:
    return body["summary"]["event_types"] == {"<too-long>": 2, "PushEvent": 1}


def cases() -> list[tuple[str, bytes, int, Check]]:
    drain, drain_events = samples.drain_sample()
    stub = b"MZ" + b"\0" * 510 + build([entry("a.json", samples.LINE)])  # a self-extractor's stub first
    return [
        ("version needed 25.5", samples.version_needed_sample(), 200, answered(3)),
        ("zip64 offset near 2**64", samples.zip64_offset_sample(), 422, refused("BAD_ZIP", "bad_offset")),
        ("deflate ending in a back-reference", drain, 200, answered(drain_events)),
        ("gzip in zip, ratios multiplied", samples.layered_sample(), 422, refused("ZIP_BOMB")),
        (
            "entries under the floor",
            samples.under_the_floor_sample(),
            422,
            refused("ZIP_BOMB", "upload_ratio"),
        ),
        (
            "local header names another file",
            build([entry("a.json", samples.LINE, local={"name": b"b.json"})]),
            422,
            refused("ZIP_BOMB", "header_mismatch"),
        ),
        ("actor ids no integer holds", actors_json(), 200, invalid_actors),
        ("lone surrogate", b'{"a": "\\ud800"}\n', 200, lone_surrogate),
        (
            "plain gzip bomb",
            samples.gzip_bomb(),
            422,
            refused("ZIP_BOMB", "ratio", without="archive"),
        ),
        ("zip behind a self-extractor stub", stub, 415, refused("UNSUPPORTED_MEDIA_TYPE")),
        (
            "a file past the distinct event types",
            typed([f"T{i}" for i in range(MAX_EVENT_TYPES + 1)]),
            200,
            one_file_failed("TOO_MANY_EVENT_TYPES"),
        ),
        (
            "files past the distinct event types together, one job",
            types_apart(MAX_EVENT_TYPES // 2 + 1),
            422,
            refused("TOO_MANY_EVENT_TYPES"),
        ),
        (
            "files past the distinct event types together, two jobs",
            types_apart(MAX_EVENT_TYPES // 2 + 1, pad_to=(1 << 20) + 4096),
            422,
            refused("TOO_MANY_EVENT_TYPES"),
        ),
        ("megabyte event types", typed(["x" * (1 << 20), "y" * (1 << 20), "PushEvent"]), 200, too_long),
    ]


async def test_every_class_through_the_real_server(start_server: StartServer, inflater: str) -> None:
    server = await start_server(inflater=inflater)
    async with httpx.AsyncClient(base_url=server.url, timeout=60, verify=False) as client:
        for name, body, status, check in cases():
            started = time.perf_counter()
            response = await client.post(
                UPLOAD, content=body, headers={"content-type": "application/octet-stream"}
            )
            seconds = time.perf_counter() - started
            assert response.status_code == status, (name, response.text[:300])
            assert check(response.json()), (name, response.text[:300])
            assert seconds < 10, (name, seconds)  # bombs are cut within their budget, not after minutes
        health = await client.get("/api/v1/health")
        assert health.status_code == 200
    with trio.fail_after(5):
        while server.state.stats.uploads_in_flight:  # noqa: ASYNC110 - counters move after the last byte
            await trio.sleep(0.01)
    assert server.leftover_files() == []


async def test_too_many_event_types_ends_an_ndjson_stream_with_its_error_line(server: RunningServer) -> None:
    """Found in the final merge, after the stream began: the error line, no summary, nothing left."""
    body = types_apart(MAX_EVENT_TYPES // 2 + 1, pad_to=(1 << 20) + 4096)
    headers = {"content-type": "application/zip", "accept": "application/x-ndjson"}
    async with httpx.AsyncClient(base_url=server.url, timeout=60, verify=False) as client:
        response = await client.post(UPLOAD, content=body, headers=headers)
        assert response.status_code == 200
        lines = [orjson.loads(line) for line in response.content.splitlines()]
        assert lines[-1]["kind"] == "error", lines[-1]
        assert lines[-1]["error"]["code"] == "TOO_MANY_EVENT_TYPES"
        assert lines[-1]["error"]["detail"] == {"limit": MAX_EVENT_TYPES}
        assert not any(line["kind"] == "summary" for line in lines)
        good = await client.post(
            UPLOAD, content=typed(["PushEvent"]), headers={"content-type": "application/json"}
        )
        assert good.status_code == 200 and good.json()["summary"]["event_types"] == {"PushEvent": 1}
    await wait_until(lambda: not server.state.stats.uploads_in_flight, within=5)
    assert server.leftover_files() == []


def _worker_pids() -> set[int]:
    """This test process's worker processes (the servers' pools run SCHED_IDLE, and only they do)."""
    workers = set()
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            if os.sched_getscheduler(pid) == os.SCHED_IDLE:
                workers.add(pid)
    return workers


async def test_too_many_event_types_in_a_render_in_parts_kills_no_worker(start_server: StartServer) -> None:
    """The refusal is found by the part that frames the answer while the other part merges its actors: it
    waits for that part instead of cancelling it, which would kill (and respawn) its worker."""
    server = await start_server(workers=2)
    await server.state.workers.warm_up()
    before = _worker_pids()
    assert len(before) == 2
    # Two jobs of 501 types each, and 40,000 distinct actors each: 80 chunks of 1,024 rows, two parts, the
    # second merging for tens of milliseconds after the first has found the refusal.
    halves = [
        b"".join(
            b'{"type":"%s%d","actor":{"id":%d}}\n' % (side.encode(), n % (MAX_EVENT_TYPES // 2 + 1), base + n)
            for n in range(40_000)
        ).ljust(3 << 20, b" ")  # past the small path's 4 MiB of work together
        for side, base in (("A", 0), ("B", 40_000))
    ]
    body = build([entry(f"{side}.json", half, STORED) for side, half in zip("ab", halves, strict=True)])
    async with httpx.AsyncClient(base_url=server.url, timeout=60, verify=False) as client:
        response = await client.post(UPLOAD, content=body, headers={"content-type": "application/zip"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "TOO_MANY_EVENT_TYPES"
    await wait_until(lambda: not server.state.stats.uploads_in_flight and not server.state.workers.running)
    assert _worker_pids() == before
    assert server.leftover_files() == []
