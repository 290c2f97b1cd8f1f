"""Issue 7's classes end to end: each sample through the real server on a real socket, with real workers.
One server for all samples (a server start costs a worker spawn): every answer is checked, then that
nothing was left behind and that the server still serves."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import trio

import test_zip_hardening as samples
from conftest import RunningServer
from zipcraft import build, entry

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
    ]


async def test_every_class_through_the_real_server(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
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
