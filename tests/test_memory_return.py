"""The serving process gives its allocator's kept memory back when the last upload in flight ends, and never
while one is in flight (``server._return_freed_memory``): under a steady load the same memory is used again at
once, and each page given back costs a page fault when touched again (BENCH_NOTES.md).

The real server on a real socket; ``return_free_memory`` is wrapped to count its calls (it still runs).
"""

from __future__ import annotations

import time

import pytest
import trio

from conftest import StartServer, wait_until
from events_factory import as_ndjson, make_events
from test_admission import assert_idle
from test_ingest_server import post
from upload_server import server as server_module


@pytest.fixture
def returns(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """When ``return_free_memory`` was called (``time.monotonic``)."""
    calls: list[float] = []
    give_back = server_module.return_free_memory

    def counted() -> None:
        calls.append(time.monotonic())
        give_back()

    monkeypatch.setattr(server_module, "return_free_memory", counted)
    return calls


async def test_memory_goes_back_when_the_last_upload_ends_not_before(
    start_server: StartServer, returns: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "RETURN_MEMORY_INTERVAL", 0.05)
    server = await start_server()
    stats = server.state.stats
    body = as_ndjson(make_events(50, seed=1)[0])
    # One upload stays in flight: its head and half its body are sent, the rest is held back.
    held = await trio.open_tcp_stream("127.0.0.1", server.port)
    head = f"POST /api/v1/upload HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    await held.send_all(head.encode() + body[: len(body) // 2])
    await wait_until(lambda: stats.uploads_receiving == 1)
    for _ in range(3):  # others come and go meanwhile, each given time to be given back after
        answer = await post(server, body, content_type="application/x-ndjson")
        assert answer.status_code == 200, answer.text
        await trio.sleep(0.2)
    assert returns == [], "memory was given back while an upload was in flight"
    await held.aclose()  # the last one in flight ends (failed: its client left)
    await wait_until(lambda: len(returns) == 1, 5)
    assert stats.uploads_failed == 1 and stats.uploads_completed == 3
    await assert_idle(server)


async def test_memory_goes_back_at_most_once_an_interval(
    start_server: StartServer, returns: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uploads one after another: each end leaves the server idle, but a trim (~1 ms, and page faults after
    it) is not repeated within ``RETURN_MEMORY_INTERVAL``; the idle moment that came meanwhile still gets
    one when the interval is over."""
    interval = 1.0
    monkeypatch.setattr(server_module, "RETURN_MEMORY_INTERVAL", interval)
    server = await start_server()
    body = as_ndjson(make_events(50, seed=2)[0])
    for _ in range(2):
        answer = await post(server, body, content_type="application/x-ndjson")
        assert answer.status_code == 200, answer.text
        await wait_until(lambda: server.state.stats.uploads_in_flight == 0, 5)
    await wait_until(lambda: len(returns) == 2, 5)
    assert returns[1] - returns[0] >= interval
    await assert_idle(server)
