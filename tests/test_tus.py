"""Resumable uploads (tus 1.0.0) on the real server: the protocol's answers with httpx, and a real tus
client (tuspy) that survives a ``kill -9`` of the server between two halves of its upload."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import signal
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio
from tusclient import client as tus_client
from tusclient.exceptions import TusUploadFailed
from tusclient.uploader import Uploader

from conftest import RunningServer, StartServer, wait_until
from events_factory import Truth, as_ndjson, make_events, make_zip
from server_process import ServerProcess, Spawn, server_command
from test_ingest_server import SLOW_WORK, SPILL_OFTEN, _gzip_of_spaces, _many_actors
from upload_server.resumable import ResumableStore, UploadState

FILES = "/api/v1/files"
TUS = {"Tus-Resumable": "1.0.0"}
OFFSET_STREAM = {"Content-Type": "application/offset+octet-stream"}
NDJSON_TYPE = "application/x-ndjson"


def dataset(files: int = 4, events: int = 800) -> tuple[bytes, Truth]:
    truth = Truth()
    contents = {}
    for n in range(files):
        made, part = make_events(events, seed=100 + n)
        truth.merge(part)
        contents[f"hour-{n}.ndjson"] = as_ndjson(made)
    return make_zip(contents, compression=zipfile.ZIP_STORED), truth


def lock_holders(lock_file: Path) -> set[int]:
    """The pids holding a flock on ``lock_file``, from the kernel's own list (/proc/locks)."""
    status = lock_file.stat()
    key = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    holders = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()  # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:2146853 0 EOF"
        if fields[1] == "FLOCK" and fields[5] == key:
            holders.add(int(fields[4]))
    return holders


async def create(client: httpx.AsyncClient, length: int, **headers: str) -> str:
    response = await client.post(FILES, headers={**TUS, "Upload-Length": str(length), **headers})
    assert response.status_code == 201, response.text
    assert response.headers["tus-resumable"] == "1.0.0"
    assert response.headers["upload-expires"]
    return response.headers["location"]


async def patch(
    client: httpx.AsyncClient, url: str, offset: int, data: bytes, **headers: str
) -> httpx.Response:
    return await client.patch(
        url, content=data, headers={**TUS, **OFFSET_STREAM, "Upload-Offset": str(offset), **headers}
    )


async def result_when_ready(
    client: httpx.AsyncClient, url: str, accept: str = "application/json"
) -> httpx.Response:
    with trio.fail_after(60):
        while True:
            response = await client.get(f"{url}/result", headers={"Accept": accept})
            if response.status_code != 202:
                return response
            assert int(response.headers["retry-after"]) >= 1
            await trio.sleep(0.05)


async def test_options_advertises_the_protocol(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, verify=False) as client:
        response = await client.options(FILES)
    assert response.status_code == 204
    assert response.headers["tus-version"] == "1.0.0"
    assert set(response.headers["tus-extension"].split(",")) == {
        "creation",
        "creation-with-upload",
        "termination",
        "expiration",
        "checksum",
    }
    assert int(response.headers["tus-max-size"]) == server.state.config.max_upload_bytes
    assert set(response.headers["tus-checksum-algorithm"].split(",")) == {"sha1", "sha256"}


async def test_an_upload_in_pieces_is_processed_like_a_post(server: RunningServer) -> None:
    body, truth = dataset()
    async with httpx.AsyncClient(base_url=server.url, timeout=30, verify=False) as client:
        url = await create(
            client, len(body), **{"Upload-Metadata": "filename " + base64.b64encode(b"day.zip").decode()}
        )
        assert len(url.rsplit("/", 1)[1]) == 32  # 128 random bits
        for offset in range(0, len(body), 100_000):
            response = await patch(client, url, offset, body[offset : offset + 100_000])
            assert response.status_code == 204, response.text
            assert int(response.headers["upload-offset"]) == min(len(body), offset + 100_000)
        head = await client.head(url, headers=TUS)
        assert head.status_code == 200 and head.headers["cache-control"] == "no-store"
        assert int(head.headers["upload-offset"]) == int(head.headers["upload-length"]) == len(body)
        assert head.headers["upload-metadata"] == "filename " + base64.b64encode(b"day.zip").decode()
        answer = await result_when_ready(client, url)
        assert answer.status_code == 200, answer.text
        document = answer.json()
        assert document["sha256"] == hashlib.sha256(body).hexdigest()
        assert document["summary"]["events"] == truth.events
        assert {a["id"]: a["events"] for a in document["actors"]} == dict(truth.actor_events)
        lines = [
            json.loads(line)
            for line in (await result_when_ready(client, url, "application/x-ndjson")).text.splitlines()
        ]
        assert sum(line["kind"] == "event" for line in lines) == truth.events
        assert lines[-1]["kind"] == "summary" and lines[-1]["summary"]["events"] == truth.events
        deleted = await client.delete(url, headers=TUS)
        assert deleted.status_code == 204
        assert (await client.head(url, headers=TUS)).status_code == 404
        assert (await client.get(f"{url}/result")).status_code == 404
    assert list((server.tmp_dir / "resumable").iterdir()) == []


async def test_creation_with_upload_and_a_checksum(server: RunningServer) -> None:
    events, truth = make_events(30, seed=3)
    body = as_ndjson(events)
    digest = base64.b64encode(hashlib.sha1(body).digest()).decode()
    async with httpx.AsyncClient(base_url=server.url, timeout=30, verify=False) as client:
        response = await client.post(
            FILES,
            content=body,
            headers={
                **TUS,
                **OFFSET_STREAM,
                "Upload-Length": str(len(body)),
                "Upload-Checksum": f"sha1 {digest}",
            },
        )
        assert response.status_code == 201 and int(response.headers["upload-offset"]) == len(body)
        answer = await result_when_ready(client, response.headers["location"])
        assert answer.json()["summary"]["events"] == truth.events


async def test_protocol_errors_are_answered_as_tusd_does(start_server: StartServer) -> None:
    server = await start_server(max_upload_bytes=1 << 20)
    async with httpx.AsyncClient(base_url=server.url, verify=False) as client:
        url = await create(client, 100)
        missing = await client.head(url)
        assert missing.status_code == 412 and missing.headers["tus-version"] == "1.0.0"
        wrong = await client.patch(url, content=b"x", headers={**OFFSET_STREAM, "Tus-Resumable": "0.2.2"})
        assert wrong.status_code == 412 and wrong.json()["error"]["code"] == "TUS_VERSION_MISMATCH"
        assert (await patch(client, url, 5, b"x")).status_code == 409
        typed = await client.patch(
            url, content=b"x", headers={**TUS, "Upload-Offset": "0", "Content-Type": "text/plain"}
        )
        assert typed.status_code == 415
        assert (await patch(client, url, 0, b"x" * 101)).status_code == 413
        assert (await create_status(client, 2 << 20)) == 413
        bad_sum = await patch(
            client, url, 0, b"[1]", **{"Upload-Checksum": "sha256 " + base64.b64encode(b"0" * 32).decode()}
        )
        assert bad_sum.status_code == 460 and bad_sum.json()["error"]["code"] == "CHECKSUM_MISMATCH"
        head = await client.head(url, headers=TUS)
        assert head.headers["upload-offset"] == "0"  # nothing was appended
        assert (await patch(client, url, 0, b"[1]", **{"Upload-Checksum": "md5 AAAA"})).status_code == 400
        unknown = await client.head(f"{FILES}/{'0' * 32}", headers=TUS)
        assert unknown.status_code == 404 and unknown.headers["tus-resumable"] == "1.0.0"
        assert (await client.head(f"{FILES}/..%2F..%2Fetc", headers=TUS)).status_code == 404
        big_metadata = "k " + base64.b64encode(b"x" * 5000).decode()
        assert (await create_status(client, 10, **{"Upload-Metadata": big_metadata})) == 400
        assert (await create_status(client, 10, **{"Upload-Metadata": "k not-base64!"})) == 400
        incomplete = await client.get(f"{url}/result")
        assert incomplete.status_code == 409 and incomplete.json()["error"]["code"] == "UPLOAD_INCOMPLETE"


async def create_status(client: httpx.AsyncClient, length: int, **headers: str) -> int:
    return (await client.post(FILES, headers={**TUS, "Upload-Length": str(length), **headers})).status_code


async def test_two_writers_at_once_get_423(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, verify=False) as client:
        url = await create(client, 1000)
        path = url.encode()
        first = await trio.open_tcp_stream("127.0.0.1", server.port)
        head = b"PATCH %s HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n" % path
        head += b"Content-Type: application/offset+octet-stream\r\nContent-Length: 1000\r\n\r\n"
        await first.send_all(head + b"x" * 10)
        the_id = url.rsplit("/", 1)[1]
        await wait_until(lambda: the_id in server.state.resumable.writing, 5)
        second = await patch(client, url, 0, b"y" * 10)
        assert second.status_code == 423 and second.json()["error"]["code"] == "UPLOAD_LOCKED"
        await first.send_all(b"x" * 990)
        answer = await first.receive_some(4096)
        assert answer.startswith(b"HTTP/1.1 204 ")
        await first.aclose()


async def test_a_delete_while_processing_stops_it_and_removes_everything(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="upload_server")
    server = await start_server(**SLOW_WORK)  # a gzip of spaces: seconds of processing
    body = _gzip_of_spaces(2 << 30)
    async with httpx.AsyncClient(base_url=server.url, timeout=30, verify=False) as client:
        url = await create(client, len(body))
        assert (await patch(client, url, 0, body)).status_code == 204
        the_id = url.rsplit("/", 1)[1]
        await wait_until(lambda: the_id in server.state.resumable.processing, 5)
        deleted = await client.delete(url, headers=TUS)
        assert deleted.status_code == 204, deleted.text
        assert (await client.get(f"{url}/result")).status_code == 404
    await wait_until(lambda: the_id not in server.state.resumable.processing, 5)
    assert f"resumable upload {the_id}: removed, as a DELETE asked" in caplog.text  # stopped, not finished
    assert f"resumable upload {the_id}: done" not in caplog.text
    assert list((server.tmp_dir / "resumable").iterdir()) == []


async def test_an_interrupted_patch_keeps_what_arrived(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, verify=False) as client:
        url = await create(client, 1000)
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        head = b"PATCH %s HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n" % url.encode()
        head += b"Content-Type: application/offset+octet-stream\r\nContent-Length: 1000\r\n\r\n"
        await stream.send_all(head + b"x" * 400)
        the_id = url.rsplit("/", 1)[1]
        await wait_until(lambda: the_id in server.state.resumable.writing, 5)
        await trio.sleep(0.2)
        await stream.aclose()
        await wait_until(lambda: the_id not in server.state.resumable.writing, 5)
        head_answer = await client.head(url, headers=TUS)
        assert head_answer.headers["upload-offset"] == "400"
        assert (await patch(client, url, 400, b"y" * 600)).status_code == 204


async def test_expired_uploads_answer_410_and_are_removed(start_server: StartServer) -> None:
    server = await start_server(resumable_expiry=0.5)
    async with httpx.AsyncClient(base_url=server.url, verify=False) as client:
        url = await create(client, 100)
        await trio.sleep(0.6)
        assert (await client.head(url, headers=TUS)).status_code == 410
        gone = await patch(client, url, 0, b"x")
        assert gone.status_code == 410 and gone.json()["error"]["code"] == "UPLOAD_EXPIRED"
    removed = await trio.to_thread.run_sync(server.state.resumable.store.expire)
    assert removed == 1 and list((server.tmp_dir / "resumable").iterdir()) == []


def test_tuspy_resumes_after_the_server_is_killed(spawn: Spawn, spool_dir: Path, tmp_path: Path) -> None:
    """Half an upload through tuspy in 64 KiB chunks with checksums, ``kill -9``, a restart on the same
    temp dir, and a fresh client resuming from the stored URL: the file arrives whole and is processed."""
    body, truth = dataset(files=6, events=1000)
    source = tmp_path / "day.zip"
    source.write_bytes(body)
    server = spawn(server_command(spool_dir, "--workers", "1"))
    uploader = tus_client.TusClient(f"{server.url}{FILES}").uploader(
        str(source), chunk_size=64 << 10, upload_checksum=True, metadata={"filename": "day.zip"}
    )
    explained(lambda: uploader.upload(stop_at=len(body) // 2), uploader, spool_dir, server)
    url = uploader.url
    assert url is not None and uploader.offset >= len(body) // 2
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()

    restarted = spawn(server_command(spool_dir, "--workers", "1", "--port", "0"))
    resumed_url = url.replace(f":{server.port}/", f":{restarted.port}/")
    resumer = tus_client.TusClient(f"{restarted.url}{FILES}").uploader(
        str(source), url=resumed_url, chunk_size=64 << 10, upload_checksum=True
    )
    assert resumer.offset == uploader.offset  # the server's durable offset, asked with HEAD
    explained(resumer.upload, resumer, spool_dir, server, restarted)
    deadline = time.monotonic() + 60
    with httpx.Client(base_url=restarted.url, verify=False) as client:
        while (answer := client.get(f"{resumed_url}/result")).status_code == 202:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert answer.status_code == 200, answer.text
    assert answer.json()["sha256"] == hashlib.sha256(body).hexdigest()
    assert answer.json()["summary"]["events"] == truth.events
    assert answer.json()["summary"]["unique_actors"] == len(truth.actor_events)


def explained(
    upload: Callable[[], None], uploader: Uploader, spool_dir: Path, *servers: ServerProcess
) -> None:
    """Run a tuspy upload; if a request fails, fail with what the server said, the processes holding the
    upload's lock, and the servers' logs. (Once, in a full run of the suite on 3.13, a PATCH of this test
    was answered 423 UPLOAD_LOCKED; it has not happened again in 156 runs of the test alone.)"""
    try:
        upload()
    except TusUploadFailed as failed:
        lock_file = spool_dir / "resumable" / f"{(uploader.url or '?').rsplit('/', 1)[-1]}.lock"
        holders = {pid: _command_line(pid) for pid in lock_holders(lock_file)} if lock_file.exists() else {}
        logs = "\n".join(server.stderr_text() for server in servers)
        raise AssertionError(
            f"{failed.status_code} {failed.response_content!r} at offset {uploader.offset}; the lock held by"
            f" {holders}; servers' pids {[server.process.pid for server in servers]}\nlogs:\n{logs}"
        ) from failed


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "(gone)"


#: Clients of the concurrent test: 8 in the suite; the load test is ``TUS_CLIENTS=32`` (BENCH_NOTES.md).
CONCURRENT_CLIENTS = int(os.environ.get("TUS_CLIENTS", "8"))


async def test_concurrent_uploads_cut_at_random_points_arrive_whole(server: RunningServer) -> None:
    """Many clients at once, each with its own file; every PATCH connection is cut at a random point (by a
    seeded generator) and the client resumes from HEAD's offset. Every file arrives whole, is processed
    right, and nothing is left behind but the results."""
    rng = random.Random(32)

    async def one(n: int, results: dict[int, tuple[Truth, bytes, httpx.Response]]) -> None:
        made, truth = make_events(300 + n, seed=500 + n)
        body = as_ndjson(made)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, verify=False) as client:
            url = await create(client, len(body))
            offset = 0
            while offset < len(body):
                cut = rng.randrange(offset + 1, len(body) + 1)
                await _patch_then_cut(server, url, offset, body[offset:cut], whole=len(body) - offset)
                head = await client.head(url, headers=TUS)
                assert head.status_code == 200
                assert offset <= int(head.headers["upload-offset"]) <= cut
                offset = int(head.headers["upload-offset"])
            results[n] = (truth, body, await result_when_ready(client, url))

    results: dict[int, tuple[Truth, bytes, httpx.Response]] = {}
    async with trio.open_nursery() as nursery:
        for n in range(CONCURRENT_CLIENTS):
            nursery.start_soon(one, n, results)
    for truth, body, answer in results.values():
        assert answer.status_code == 200, answer.text
        assert answer.json()["sha256"] == hashlib.sha256(body).hexdigest()
        assert answer.json()["summary"]["events"] == truth.events
    # The result is served once its record says so; the data file goes just after, as processing ends.
    await wait_until(lambda: not server.state.resumable.processing, 5)
    leftovers = sorted(path.name for path in (server.tmp_dir / "resumable").iterdir())
    # What a finished upload keeps until its result expires: results, record and lock file; no data.
    assert all(name.endswith((".result.ndjson", ".json", ".lock")) for name in leftovers), leftovers
    assert len(results) == CONCURRENT_CLIENTS and server.state.resumable.snapshot()["incomplete"] == 0
    assert [name for name in os.listdir(server.tmp_dir) if name != "resumable"] == []


async def _patch_then_cut(server: RunningServer, url: str, offset: int, piece: bytes, whole: int) -> None:
    """A PATCH that declares the rest of the file but sends only ``piece`` before the connection goes
    (unless ``piece`` is the whole rest: then the answer is read)."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    head = (
        f"PATCH {url} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: {offset}\r\n"
        f"Content-Type: application/offset+octet-stream\r\nContent-Length: {whole}\r\n\r\n"
    ).encode()
    the_id = url.rsplit("/", 1)[1]
    await stream.send_all(head + piece)
    if len(piece) == whole:
        assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 204 ")
    else:
        # Cut only once the server is writing this PATCH, or a late one could land after the next.
        await wait_until(lambda: the_id in server.state.resumable.writing, 10)
        await trio.sleep(0.02)
    await stream.aclose()
    await wait_until(lambda: the_id not in server.state.resumable.writing, 10)


async def test_health_and_metrics_count_incomplete_uploads_and_their_bytes(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, verify=False) as client:
        url = await create(client, 1000)
        assert (await patch(client, url, 0, b"x" * 300)).status_code == 204
        await create(client, 50)
        health = (await client.get("/api/v1/health")).json()["resumable"]
        assert health["incomplete"] == 2 and health["held_bytes"] == 300
        page = (await client.get("/metrics")).text
        assert "upload_server_resumable_incomplete 2.0" in page
        assert "upload_server_resumable_held_bytes 300.0" in page
        assert (await client.delete(url, headers=TUS)).status_code == 204
        health = (await client.get("/api/v1/health")).json()["resumable"]
        assert health["incomplete"] == 1 and health["held_bytes"] == 0


async def test_an_unexpected_failure_in_background_processing_becomes_the_answer(
    start_server: StartServer, server_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A whole upload left queued whose data file is gone (lost with a disk, removed by hand): taken up at
    start, its processing fails with an error no handler expects. The server keeps serving and the upload's
    result is a 500 answer, not the end of the serving process (and after a restart, again)."""
    store = ResumableStore(str(server_tmp))
    record = store.create(length=10, metadata={}, expiry_s=3600)
    record.state, record.offset = UploadState.QUEUED, 10
    store.save(record)
    store.data_path(record.id).unlink()
    with caplog.at_level(logging.ERROR, logger="upload_server"):
        server = await start_server()
        async with httpx.AsyncClient(base_url=server.url, verify=False) as client:
            answer = await result_when_ready(client, f"{FILES}/{record.id}")
            assert answer.status_code == 500
            assert answer.json()["error"]["code"] == "INTERNAL_ERROR"
            assert (await client.get("/api/v1/health")).status_code == 200
    assert any("processing failed" in message for message in caplog.messages)


async def test_a_result_removed_after_its_record_was_read_is_404(server: RunningServer) -> None:
    """Expiry or a DELETE in another process can remove the result files between the record's read and
    their opening: the answer is the removed upload's 404, not a 500."""
    body, _ = dataset(files=1, events=50)
    async with httpx.AsyncClient(base_url=server.url, verify=False) as client:
        url = await create(client, len(body))
        assert (await patch(client, url, 0, body)).status_code == 204
        assert (await result_when_ready(client, url)).status_code == 200
        for result in (server.tmp_dir / "resumable").glob("*.result.*"):
            result.unlink()
        answer = await client.get(f"{url}/result")
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "UPLOAD_NOT_FOUND"


async def test_a_result_rendered_in_parts_is_what_a_post_answers(start_server: StartServer) -> None:
    """Actors spilled in small runs, so that two workers render the results in parts by actor id: the kept
    JSON result and NDJSON result hold what a POST of the same bytes answers (but the ids and timing)."""
    server = await start_server(workers=2, **SPILL_OFTEN)
    body, truth = _many_actors(5000, seed=44)
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        url = await create(client, len(body))
        assert (await patch(client, url, 0, body)).status_code == 204
        kept = await result_when_ready(client, url)
        kept_lines = await result_when_ready(client, url, "application/x-ndjson")
        posted = await client.post(
            "/api/v1/upload", content=body, headers={"Content-Type": "application/zip"}
        )
        posted_lines = await client.post(
            "/api/v1/upload",
            content=body,
            headers={"Content-Type": "application/gzip", "Accept": NDJSON_TYPE},
        )
    assert kept.status_code == posted.status_code == 200, (kept.text, posted.text)
    document, answer = kept.json(), posted.json()
    assert [(a["id"], a["login"], a["events"]) for a in document["actors"]] == [
        (aid, login, events) for aid, (login, events) in sorted(truth.items())
    ]
    for key in ("summary", "files", "actors", "sha256"):
        assert document[key] == answer[key]

    def actors(text: str) -> list[str]:
        return [line for line in text.splitlines() if '"kind":"actor"' in line]

    assert actors(kept_lines.text) == actors(posted_lines.text)
    assert len(actors(kept_lines.text)) == len(truth)
