"""The server under a low open-files limit: the cap is fitted at start, exhaustion is a 503, never a 500.

The server runs from the command line in a child whose RLIMIT_NOFILE (soft and hard) is set before it
starts, so that it cannot raise the limit itself.
"""

from __future__ import annotations

import contextlib
import errno
import re
import resource
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest
import trio
import trio.testing

from events_factory import as_ndjson, make_events
from server_process import LISTENING, START_TIMEOUT, ServerProcess, _pump, clean_env, server_command
from upload_server.config import Config
from upload_server.errors import InsufficientStorage, OutOfFileDescriptors, root_cause
from upload_server.fdlimit import reserve
from upload_server.server import ACCEPT_RETRY_SECONDS, AcceptTrouble

#: With one worker: room for LIMIT - reserve = 100 connections, each of which can hold a spool file too.
LIMIT = 200
WORKERS = 1
#: Uploads held open mid-body at once: with their spool files they need more descriptors than are left.
HELD = 95
BODY, _ = make_events(300, seed=31)
PAYLOAD = as_ndjson(BODY)
FIRST_PART = 1024


def _limit(soft: int, hard: int) -> Callable[[], None]:
    def limit_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return limit_descriptors


def _popen_limited(spool_dir: Path, soft: int, hard: int) -> subprocess.Popen[str]:
    command = server_command(spool_dir, "--workers", str(WORKERS), "--min-body-rate", "0")
    return subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
        preexec_fn=_limit(soft, hard),
    )


def start_limited(spool_dir: Path, soft: int = LIMIT, hard: int = LIMIT) -> ServerProcess:
    process = _popen_limited(spool_dir, soft, hard)
    server = ServerProcess(process)
    threading.Thread(target=_pump, args=(process.stderr, server.lines), daemon=True).start()
    server.port = int(server.wait_for(LISTENING, START_TIMEOUT).group(1))
    return server


def _head(length: int) -> bytes:
    return (
        f"POST /api/v1/upload HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
    ).encode()


async def _read_answer(stream: trio.SocketStream) -> Answer:
    """Status, headers and body of an answer that ends with the connection (``Connection: close``)."""
    data = bytearray()
    with trio.fail_after(60):
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, body


Answer = tuple[int, dict[bytes, bytes], bytes]


async def _held_upload(port: int, answers: list[Answer], go: trio.Event) -> None:
    """Start an upload, stop mid-body until ``go``, finish it (if still wanted), record the answer."""
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return  # the test process itself is not limited; a refused connect would be the server's backlog
    async with stream:
        await stream.send_all(_head(len(PAYLOAD)) + PAYLOAD[:FIRST_PART])
        await go.wait()
        with contextlib.suppress(trio.BrokenResourceError):  # answered early (503) and closed
            await stream.send_all(PAYLOAD[FIRST_PART:])
        answers.append(await _read_answer(stream))


async def test_out_of_descriptors_is_a_503_and_the_server_recovers(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    server = start_limited(spool_dir)
    try:
        room = LIMIT - reserve(Config(workers=WORKERS))
        # The warning comes before the listening line that start_limited waited for.
        assert any(f"serving at most {room} connections" in line for line in server.seen), server.seen
        answers: list[Answer] = []
        go = trio.Event()
        async with trio.open_nursery() as nursery:
            for _ in range(HELD):
                nursery.start_soon(_held_upload, server.port, answers, go)
            await trio.sleep(3)  # every head is in, and a spool file opened for each one that could
            go.set()
        statuses = Counter(status for status, _, _ in answers)
        assert len(answers) == HELD
        assert set(statuses) <= {200, 503}, statuses
        busy = [(headers, orjson.loads(body)) for status, headers, body in answers if status == 503]
        assert busy, f"the limit was never reached: {statuses}"
        for headers, error in busy:
            assert error["error"]["code"] == "OUT_OF_FILE_DESCRIPTORS"
            assert int(headers[b"retry-after"]) >= 1
        assert statuses[200] > 0
        await _recovered(server)
    finally:
        server.process.kill()
        server.process.wait()
    log = server.stderr_text()
    assert "Traceback" not in log
    assert "INTERNAL_ERROR" not in log


async def _recovered(server: ServerProcess) -> None:
    """Once the flood is over, uploads and health are answered as usual."""
    async with httpx.AsyncClient(base_url=server.url, timeout=30, verify=False) as client:
        started = time.monotonic()
        health = await client.get("/api/v1/health")
        assert health.status_code == 200, health.text
        response = await client.post(
            "/api/v1/upload", content=PAYLOAD, headers={"content-type": "application/x-ndjson"}
        )
        assert response.status_code == 200, response.text
        assert response.json()["summary"]["events"] == len(BODY)
        assert time.monotonic() - started < 10


async def test_accept_failures_are_reported_once_per_interval(
    mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The accept loop retries every 100 ms while out of descriptors; it used to warn every time."""
    trouble = AcceptTrouble()
    error = OSError(errno.EMFILE, "Too many open files")
    for _ in range(int(25 / ACCEPT_RETRY_SECONDS)):  # 25 s of failing
        trouble.failed(error)
        mock_clock.jump(ACCEPT_RETRY_SECONDS)
    warnings = [record.getMessage() for record in caplog.records if "cannot accept" in record.getMessage()]
    assert len(warnings) == 3  # at 0, 10 and 20 s
    assert all(re.search(r"\(\d{2,3} more failures since the last warning\)", line) for line in warnings[1:])


def _soft_open_files(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as limits:
        line = next(line for line in limits if line.startswith("Max open files"))
    return int(line.split()[3])


def test_the_soft_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    server = start_limited(tmp_path, soft=LIMIT, hard=4096)
    try:
        assert _soft_open_files(server.process.pid) == 4096
        assert not any("does not fit" in line for line in server.seen), server.seen  # 1024 + 100 fit now
    finally:
        server.process.kill()
        server.process.wait()


def test_a_limit_too_low_for_any_use_refuses_to_start(tmp_path: Path) -> None:
    process = _popen_limited(tmp_path, 64, 64)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 1
    assert "open-files limit (64) leaves room for 0 connections" in stderr
    assert "Traceback" not in stderr


def test_exhaustion_anywhere_in_the_chain_is_out_of_file_descriptors() -> None:
    """However it surfaces (raw, re-raised by a library, inside a nursery's group), EMFILE or ENFILE is a 503
    with Retry-After; any other OSError stays what it is (a 500, logged)."""
    emfile = OSError(errno.EMFILE, "Too many open files")
    try:
        try:
            raise OSError(errno.ENFILE, "Too many open files in system")
        except OSError as inner:
            raise RuntimeError("worker start failed") from inner
    except RuntimeError as error:
        wrapped = error
    for raised in (emfile, wrapped, ExceptionGroup("nursery", [ValueError("x"), emfile])):
        answer = root_cause(raised)
        assert isinstance(answer, OutOfFileDescriptors)
        assert answer.status == 503 and answer.code == "OUT_OF_FILE_DESCRIPTORS"
        assert (b"retry-after", b"2") in answer.headers
    other = OSError(errno.EACCES, "Permission denied")
    assert root_cause(other) is other


def test_running_out_of_disk_in_a_worker_is_507_and_an_answer_chosen_stays() -> None:
    """ENOSPC (or EFBIG, EDQUOT) from a worker writing its results or spilled runs is the server's storage
    running out: 507. The spool's own 507, raised from such an error, keeps its words."""
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        answer = root_cause(OSError(code, "no room"))
        assert isinstance(answer, InsufficientStorage) and answer.status == 507
        assert answer.detail == {"errno": errno.errorcode[code]}
    try:
        raise InsufficientStorage("while receiving") from OSError(errno.ENOSPC, "no room")
    except InsufficientStorage as error:
        assert root_cause(error) is error
