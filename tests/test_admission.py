"""Admission and scheduling end to end: the real server, real sockets, real worker processes.

Each rule of issue 11 has its own test: fairness, a client leaving while queued, the spool budget before
and during the body, the minimum body rate, the queue timeout and the busy estimate, a worker crash while
others wait, and the shutdown's last words on a stream. Every test also checks that nothing is left: no
temp file, and counters back at zero.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator

import httpx
import orjson
import trio

from conftest import RunningServer, StartServer, wait_until
from events_factory import as_ndjson, make_events, make_zip
from raw_http import RawClient
from test_ingest_server import SLOW_WORK, _gzip_of_spaces, _workers_reading, post

UPLOAD = "/api/v1/upload"
#: A gzip of spaces one worker takes seconds to read (see test_ingest_server.SLOW_WORK).
SLOW_BODY = _gzip_of_spaces(2 << 30)


async def assert_idle(server: RunningServer) -> None:
    """Counters back at zero, nothing reserved or queued, no temp file."""
    state = server.state
    stats = state.stats
    await wait_until(
        lambda: stats.uploads_in_flight == stats.answers_sending == state.workers.running == 0, 15
    )
    assert state.stats.uploads_receiving == 0
    assert state.spool_budget.reserved == 0
    assert state.backlog.bytes == 0 and state.backlog.queued_uploads == 0
    assert state.backlog.processing_uploads == 0
    assert state.workers.slots.waiting == 0
    assert server.leftover_files() == []


async def raw_upload(server: RunningServer, body: bytes, *extra: str) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    head = "\r\n".join(
        [f"POST {UPLOAD} HTTP/1.1", "Host: x", "Content-Type: application/octet-stream", *extra]
    )
    await stream.send_all(head.encode() + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return stream


async def test_a_small_upload_is_not_held_behind_a_big_one(start_server: StartServer) -> None:
    """One worker; a zip of 24 files is being processed when a one-file upload arrives: the jobs take
    turns, so the small one is answered long before the big one."""
    server = await start_server(workers=1)
    files = {f"f{n}.ndjson": as_ndjson(make_events(1500, seed=n)[0]) for n in range(24)}
    big = make_zip(files)
    small_events, _ = make_events(10, seed=99)
    finished: list[str] = []

    async def upload(name: str, body: bytes) -> None:
        response = await post(server, body)
        assert response.status_code == 200, response.text
        finished.append(name)

    slots = server.state.workers.slots
    async with trio.open_nursery() as nursery:
        nursery.start_soon(upload, "big", big)
        # Big's jobs queued behind the one running: the worker is held (SIGSTOP) at once, so that they stay
        # queued (at least three), and until the small upload's job is queued too: on a loaded machine the
        # small upload's way in took longer than the big one's last jobs, and the order it was testing never
        # arose. (Waiting for three queued jobs and a reading worker at one poll's instant timed out under
        # load: the jobs went by between polls.)
        await wait_until(lambda: slots.waiting >= 1 and bool(_workers_reading(server.tmp_dir)))
        (worker,) = _workers_reading(server.tmp_dir)
        os.kill(worker, signal.SIGSTOP)
        try:
            big_waiting = slots.waiting
            assert big_waiting >= 3, f"held too late: {big_waiting} of the big upload's jobs still queued"
            nursery.start_soon(upload, "small", as_ndjson(small_events))
            await wait_until(lambda: slots.waiting == big_waiting + 1)
        finally:
            os.kill(worker, signal.SIGCONT)
    assert finished == ["small", "big"]
    await assert_idle(server)


async def test_timing_reports_the_queue(server: RunningServer) -> None:
    events, _ = make_events(20, seed=3)
    answer = (await post(server, as_ndjson(events))).json()
    assert set(answer["timing_ms"]) == {"receive", "queue", "process"}
    assert all(value >= 0 for value in answer["timing_ms"].values())


async def test_a_client_leaving_while_queued_leaves_the_queue_at_once(start_server: StartServer) -> None:
    server = await start_server(**SLOW_WORK)
    holder = await raw_upload(server, SLOW_BODY)
    await wait_until(lambda: server.state.workers.running == 1)
    events, _ = make_events(50, seed=4)
    queued = await raw_upload(server, as_ndjson(events))
    await wait_until(lambda: server.state.backlog.queued_uploads == 1)
    async with httpx.AsyncClient(base_url=server.url, verify=False) as client:
        assert (await client.get("/api/v1/health")).json()["queue"]["length"] == 1
    await queued.aclose()
    # Out of the queue and its spool file gone while the first upload still holds the worker.
    await wait_until(lambda: server.state.backlog.queued_uploads == 0, 5)
    await wait_until(lambda: len(server.leftover_files()) <= 2, 5)  # only the holder's spool (+ results)
    assert server.state.workers.running == 1
    assert server.state.stats.uploads_failed == 1
    await holder.aclose()
    await assert_idle(server)


async def test_queue_timeout_answers_503_without_eating_into_process_timeout(
    start_server: StartServer,
) -> None:
    server = await start_server(queue_timeout=0.5, process_timeout=30, **SLOW_WORK)
    holder = await raw_upload(server, SLOW_BODY)
    await wait_until(lambda: server.state.workers.running == 1)
    events, _ = make_events(50, seed=5)
    started = trio.current_time()
    response = await post(server, as_ndjson(events))
    waited = trio.current_time() - started
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "QUEUE_TIMEOUT"
    assert int(response.headers["retry-after"]) >= 1
    assert 0.4 <= waited < 5, waited
    await holder.aclose()
    await assert_idle(server)


async def test_busy_only_when_the_estimated_wait_exceeds_the_queue_timeout(
    start_server: StartServer,
) -> None:
    """With a 2 GiB-of-spaces gzip (2 MB on the wire) processing, the backlog is tiny by the estimate:
    more uploads are queued, not refused. Once the backlog's estimated wait passes --queue-timeout, the
    next upload is refused at once with Retry-After from the estimate."""
    server = await start_server(queue_timeout=0.5, **SLOW_WORK)
    holder = await raw_upload(server, SLOW_BODY)
    await wait_until(lambda: server.state.workers.running == 1)
    async with httpx.AsyncClient(base_url=server.url, verify=False) as client:
        health = (await client.get("/api/v1/health")).json()["queue"]
        assert health["estimated_wait_s"] < 0.5  # a small backlog: the next upload would be queued
        server.state.backlog.rate = 1024.0  # as if the workers had proved slow: 2 MB is ~2,000 s of work
        response = await client.post(UPLOAD, content=b'{"a": 1}')
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "SERVER_BUSY" and error["detail"]["reason"] == "queue_full"
        assert error["detail"]["estimated_wait_s"] > 1000
        assert 1000 < int(response.headers["retry-after"]) <= 3600
    await holder.aclose()
    await assert_idle(server)


async def test_budget_exceeded_mid_stream_is_507_and_leaves_nothing(start_server: StartServer) -> None:
    server = await start_server(spool_budget=64 << 10)
    events, _ = make_events(2000, seed=6)
    body = as_ndjson(events)
    assert len(body) > 64 << 10

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    async with httpx.AsyncClient(base_url=server.url, verify=False) as client:
        response = await client.post(UPLOAD, content=pieces())  # chunked: no declared size
        assert response.status_code == 507
        assert response.json()["error"]["detail"]["reason"] == "spool_budget"
        declared = await client.post(UPLOAD, content=body)  # declared: refused before the body is read
        assert declared.status_code == 507
        small, _ = make_events(5, seed=7)
        assert (await client.post(UPLOAD, content=as_ndjson(small))).status_code == 200
    await assert_idle(server)


async def test_a_body_below_the_minimum_rate_is_cut(start_server: StartServer) -> None:
    """On a real socket (the steady case, and the rule's arithmetic, run in memory in
    test_admission_rules.py): 1,000 B/s against a 5,000 B/s minimum is cut once the 0.5 s grace is over."""
    server = await start_server(min_body_rate=5000, min_body_rate_window=0.5)
    events, _ = make_events(200, seed=8)
    body = as_ndjson(events)
    head = f"POST {UPLOAD} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    slow = await RawClient.connect(server)
    await slow.send(head)

    async def trickle() -> None:  # the body would take 30 s at this rate; the server answers long before
        with contextlib.suppress(trio.BrokenResourceError):  # it may reset the sends once it answered
            for start in range(0, len(body), 100):
                await slow.send(body[start : start + 100])
                await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        answer = await slow.read_response()  # head and body, however the segments arrive
        nursery.cancel_scope.cancel()  # the answer is in: stop sending rather than trickle on for seconds
    assert answer.status == 408 and answer.error_code() == "REQUEST_TIMEOUT"
    assert answer.json()["error"]["detail"]["reason"] == "min_body_rate"
    await slow.aclose()
    await assert_idle(server)


async def test_queued_uploads_complete_when_a_worker_crashes(start_server: StartServer) -> None:
    server = await start_server(**SLOW_WORK)
    results: dict[str, httpx.Response] = {}
    queued_events, truth = make_events(30, seed=9)

    async def upload(name: str, body: bytes) -> None:
        results[name] = await post(server, body)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(upload, "crashing", SLOW_BODY)
        await wait_until(lambda: bool(_workers_reading(server.tmp_dir)))
        for n in range(3):
            nursery.start_soon(upload, f"queued-{n}", as_ndjson(queued_events))
        await wait_until(lambda: server.state.backlog.queued_uploads == 3)
        for worker in _workers_reading(server.tmp_dir):
            os.kill(worker, signal.SIGKILL)
    assert results["crashing"].json()["error"]["code"] == "WORKER_CRASHED"
    for n in range(3):
        answer = results[f"queued-{n}"]
        assert answer.status_code == 200, answer.text
        assert answer.json()["summary"]["events"] == truth.events
    await assert_idle(server)


async def test_shutdown_ends_a_running_stream_with_an_error_line(start_server: StartServer) -> None:
    """When the grace runs out, an NDJSON stream still running ends with a SHUTTING_DOWN error line
    (and no summary), and the request gets its access-log line."""
    server = await start_server(shutdown_grace=0.5, **SLOW_WORK)
    body = make_zip({"spaces.json.gz": SLOW_BODY})
    lines: list[dict] = []
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=30, verify=False) as client,
        client.stream("POST", UPLOAD, content=body, headers={"accept": "application/x-ndjson"}) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            lines.append(orjson.loads(line))
            if len(lines) == 1:
                server.state.shutdown()
    assert lines[0]["kind"] == "progress"
    assert lines[-1]["kind"] == "error" and lines[-1]["error"]["code"] == "SHUTTING_DOWN"
    assert not any(line["kind"] == "summary" for line in lines)
    await wait_until(lambda: server.state.stats.uploads_in_flight == 0, 5)
    assert server.leftover_files() == []
