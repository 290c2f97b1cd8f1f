"""GET /metrics on the real server: parsed with prometheus-client's own parser, counters moved by real
requests (answers, refusals, uploads with failed files), live gauges read at scrape time."""

from __future__ import annotations

import io
import json
import os
import time
import zipfile

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from conftest import RunningServer, StartServer
from raw_http import RawClient, eventually, upload_head
from test_http_protocol import EVENTS_BYTES
from upload_server.errors import WorkerCrashed

Sample = tuple[str, frozenset[tuple[str, str]]]
#: 30 events by 10 actors.
EVENTS = json.dumps(
    [{"id": str(n), "type": "PushEvent", "actor": {"id": n % 10, "login": f"u{n % 10}"}} for n in range(30)]
).encode()
HEALTH = "/api/v1/health"
UPLOAD = "/api/v1/upload"


def parse(page: str) -> dict[Sample, float]:
    """Every sample on the page, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
    }


async def scrape(server: RunningServer) -> dict[Sample, float]:
    async with httpx.AsyncClient(base_url=server.url, verify=False) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


def value(samples: dict[Sample, float], name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(found for (sample, have), found in samples.items() if sample == name and wanted <= have)


def moved(before: dict[Sample, float], after: dict[Sample, float], name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def zip_with_a_bad_file() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("good.json", EVENTS)
        archive.writestr("bad.json", b'[{"id": "1", "actor": ')
    return buffer.getvalue()


async def test_counters_move_with_real_requests(start_server: StartServer) -> None:
    server = await start_server(max_upload_bytes=1 << 20)
    before = await scrape(server)
    async with httpx.AsyncClient(base_url=server.url, verify=False) as client:
        for _ in range(3):
            assert (await client.get(HEALTH)).status_code == 200
        assert (await client.get("/nowhere")).status_code == 404
        for unknown in ("abc", "def"):  # ids are one label value, not one each
            tus_head = await client.head(f"/api/v1/files/{unknown}", headers={"tus-resumable": "1.0.0"})
            assert tus_head.status_code == 404
        ok = await client.post(UPLOAD, content=EVENTS, headers={"content-type": "application/json"})
        assert ok.status_code == 200
        archive = zip_with_a_bad_file()
        mixed = await client.post(UPLOAD, content=archive, headers={"content-type": "application/zip"})
        assert mixed.json()["summary"]["files_failed"] == 1
        wrong_type = await client.post(UPLOAD, content=b"[]", headers={"content-type": "text/csv"})
        assert wrong_type.status_code == 415
    too_big = await RawClient.connect(server)
    await too_big.send(upload_head(2 << 20))
    assert (await too_big.read_response()).status == 413
    after = await scrape(server)

    total = "upload_server_requests_total"
    assert moved(before, after, total, route=HEALTH, status="200") == 3
    assert moved(before, after, total, route="unmatched", status="404") == 1
    assert moved(before, after, total, route="/api/v1/files/{id}", status="404") == 2
    assert moved(before, after, total, route=UPLOAD, status="200") == 2
    assert moved(before, after, total, route="/metrics", status="200") == 1  # the first scrape
    assert moved(before, after, "upload_server_request_duration_seconds_count", route=UPLOAD) == 4
    assert moved(before, after, "upload_server_received_bytes_total") > len(EVENTS) + len(archive)
    assert moved(before, after, "upload_server_rejections_total", status="413", code="PAYLOAD_TOO_LARGE") == 1
    assert (
        moved(before, after, "upload_server_rejections_total", status="415", code="UNSUPPORTED_MEDIA_TYPE")
        == 1
    )
    assert moved(before, after, "upload_server_upload_size_bytes_count") == 2
    assert moved(before, after, "upload_server_upload_size_bytes_sum") == len(EVENTS) + len(archive)
    assert moved(before, after, "upload_server_processing_duration_seconds_count") == 2
    assert moved(before, after, "upload_server_events_extracted_total") == 2 * 30
    assert moved(before, after, "upload_server_actors_extracted_total") == 2 * 10  # unique per upload
    assert moved(before, after, "upload_server_files_failed_total", code="INVALID_JSON") == 1


async def test_timeouts_are_counted_by_kind(start_server: StartServer) -> None:
    server = await start_server(header_timeout=0.3, body_idle_timeout=0.3)
    before = await scrape(server)
    slow_head = await RawClient.connect(server)
    await slow_head.send(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")
    assert (await slow_head.read_response()).status == 408
    slow_body = await RawClient.connect(server)
    await slow_body.send(upload_head(len(EVENTS_BYTES)) + EVENTS_BYTES[:10])
    assert (await slow_body.read_response()).status == 408
    after = await scrape(server)
    rejections = "upload_server_rejections_total"
    assert moved(before, after, rejections, status="408", reason="header_timeout") == 1
    assert moved(before, after, rejections, status="408", reason="body_idle_timeout") == 1
    # A head that never arrived has no route.
    assert moved(before, after, "upload_server_requests_total", route="none", status="408") == 1


async def test_live_gauges_are_read_at_scrape_time(start_server: StartServer) -> None:
    server = await start_server(spool_budget=len(EVENTS_BYTES) + 500)
    holder = await RawClient.connect(server)
    await holder.send(upload_head(len(EVENTS_BYTES)) + EVENTS_BYTES[:10])
    assert await eventually(lambda: server.state.stats.uploads_in_flight == 1)
    busy = await RawClient.connect(server)
    await busy.send(upload_head(len(EVENTS_BYTES)))
    assert (await busy.read_response()).status == 503

    during = await scrape(server)
    assert value(during, "upload_server_uploads_in_flight") == 1
    assert value(during, "upload_server_uploads_receiving") == 1
    assert value(during, "upload_server_uploads_queued") == 0
    assert value(during, "upload_server_uploads_processing") == 0
    assert value(during, "upload_server_connections_open") >= 2  # the holder and this scrape
    assert value(during, "upload_server_draining") == 0
    busy_refusals = value(during, "upload_server_rejections_total", status="503", code="SERVER_BUSY")
    assert busy_refusals == value(during, "upload_server_rejections_total", reason="spool_budget") == 1

    await holder.send(EVENTS_BYTES[10:])
    assert (await holder.read_response()).status == 200
    await holder.aclose()
    after = await scrape(server)
    assert value(after, "upload_server_uploads_in_flight") == 0
    assert value(after, "upload_server_uploads_receiving") == 0
    assert value(after, "upload_server_worker_jobs_running") == 0
    assert value(after, "upload_server_worker_jobs_waiting") == 0


async def test_queued_gauge_and_draining(start_server: StartServer) -> None:
    """An upload waiting for the only worker shows as queued; shutdown shows as draining."""
    server = await start_server(workers=1)
    workers = server.state.workers

    async def upload(client: httpx.AsyncClient) -> None:
        answer = await client.post(UPLOAD, content=EVENTS)
        assert answer.status_code == 200

    async with (
        httpx.AsyncClient(base_url=server.url, timeout=10, verify=False) as client,
        trio.open_nursery() as nursery,
    ):
        # Occupy the only worker, so that the upload's first job waits for it.
        nursery.start_soon(workers.run, time.sleep, 1.5)
        assert await eventually(lambda: workers.running == 1)
        nursery.start_soon(upload, client)
        assert await eventually(lambda: server.state.backlog.queued_uploads == 1)
        during = await scrape(server)
        assert value(during, "upload_server_uploads_queued") == 1
        assert value(during, "upload_server_uploads_processing") == 0
        assert value(during, "upload_server_worker_jobs_running") == 1
        assert value(during, "upload_server_worker_jobs_waiting") == 1
    after = await scrape(server)
    assert (
        value(after, "upload_server_uploads_queued") == value(after, "upload_server_uploads_processing") == 0
    )
    server.state.shutdown()
    # The listener is closed now: read the page the way the handler makes it.
    server.state.metrics.refresh(server.state.live_figures())
    assert value(parse(server.state.metrics.render().decode()), "upload_server_draining") == 1


async def test_worker_crashes_are_counted(server: RunningServer) -> None:
    before = await scrape(server)
    with pytest.raises(WorkerCrashed):
        await server.state.workers.run(os._exit, 1)
    after = await scrape(server)
    assert moved(before, after, "upload_server_worker_crashes_total") == 1
