"""A raw-socket HTTP client for uploads (zero-copy ``sendfile``), and checking answers against a dataset."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .common import HEALTH_PATH, HOST, MB, UPLOAD_PATH, human_bytes, load_average
from .datasets import Dataset
from .sampling import Sample, Sampler
from .servers import Server


# ----------------------------------------------------------------------------------------- client
@dataclass
class Exchange:
    """What one request took and got back."""

    status: int
    headers: dict[str, str]
    body: bytes
    wall_s: float  # connect to the last byte of the answer
    sent_s: float  # until the client's last send returned (bytes in the kernel, not yet read by the peer)
    client_cpu_s: float
    first_byte_s: float = float("nan")  # until the first byte of the answer arrived

    def json(self) -> Any:
        """The body parsed as JSON."""
        return orjson.loads(self.body)


def body_framing(body_kind: str, content_type: str, filename: str = "upload") -> tuple[str, bytes, bytes]:
    """Content-Type, bytes before the file, bytes after it: ``raw`` or ``multipart`` (field ``file``)."""
    if body_kind == "raw":
        return content_type, b"", b""
    boundary = "bench" + os.urandom(8).hex()
    before = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    after = f"\r\n--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", before, after


def _recv_more(sock: socket.socket, data: bytearray, what: str) -> None:
    chunk = sock.recv(1 << 20)
    if not chunk:
        raise ConnectionError(f"connection closed inside {what}: {bytes(data[:200])!r}")
    data += chunk


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the final answer (``1xx`` skipped; Content-Length, chunked or EOF)."""
    data = bytearray()
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            _recv_more(sock, data, "the answer's head")
            continue
        lines = data[:end].decode("latin-1").split("\r\n")
        del data[: end + 4]
        status = int(lines[0].split(" ", 2)[1])
        if status >= 200:
            break
    headers = {
        name.strip().lower(): value.strip() for name, _, value in (ln.partition(":") for ln in lines[1:])
    }
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            while (line_end := data.find(b"\r\n")) < 0:
                _recv_more(sock, data, "a chunk size")
            size = int(bytes(data[:line_end]).split(b";", 1)[0], 16)
            del data[: line_end + 2]
            if size == 0:
                while data.find(b"\r\n") < 0:  # trailers end with an empty line; none expected
                    _recv_more(sock, data, "the last chunk")
                return status, headers, bytes(body)
            while len(data) < size + 2:
                _recv_more(sock, data, "a chunk")
            body += data[:size]
            del data[: size + 2]
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(data) < length:
            _recv_more(sock, data, "the answer's body")
        return status, headers, bytes(data[:length])
    while chunk := sock.recv(1 << 20):  # no length: the body runs to the end of the connection
        data += chunk
    return status, headers, bytes(data)


def upload(
    port: int,
    path: Path,
    *,
    content_type: str = "application/zip",
    body_kind: str = "raw",
    query: str = "",
    timeout: float = 300.0,
    accept: str = "application/json",
) -> Exchange:
    """POST ``path`` to the upload route over a raw socket: head with ``sendall``, file with ``sendfile``.

    ``Connection: close``, one request per connection. An early answer (the peer refused the upload and
    closed) is read and returned like any other.
    """
    size = path.stat().st_size
    content_type, before, after = body_framing(body_kind, content_type, path.name)
    target = UPLOAD_PATH + (f"?{query}" if query else "")
    head = (
        f"POST {target} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: {content_type}\r\n"
        f"Accept: {accept}\r\nContent-Length: {len(before) + size + len(after)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    cpu_started = time.thread_time()
    started = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=timeout) as sock, open(path, "rb") as source:
        sent_s = float("nan")
        try:
            sock.sendall(head + before)
            sock.sendfile(source)
            if after:
                sock.sendall(after)
            sent_s = time.perf_counter() - started
        except (BrokenPipeError, ConnectionResetError):
            pass  # the peer answered early (an error) and closed: read what it said
        first_byte_s = float("nan")
        with contextlib.suppress(OSError):
            if sock.recv(1, socket.MSG_PEEK):  # blocks until the answer starts, consumes nothing
                first_byte_s = time.perf_counter() - started
        status, headers, body = read_response(sock)
    wall_s = time.perf_counter() - started
    cpu_s = time.thread_time() - cpu_started
    return Exchange(status, headers, body, wall_s, sent_s, cpu_s, first_byte_s)


def get(port: int, path: str = HEALTH_PATH, timeout: float = 10.0) -> Exchange:
    """One GET on a fresh connection."""
    started = time.perf_counter()
    cpu_started = time.thread_time()
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode())
        sent_s = time.perf_counter() - started
        status, headers, body = read_response(sock)
    return Exchange(
        status, headers, body, time.perf_counter() - started, sent_s, time.thread_time() - cpu_started
    )


def verify_answer(answer: Any, dataset: Dataset, *, actors: bool = True) -> list[str]:
    """What in a JSON upload answer disagrees with the dataset's expected counts (empty when right)."""
    expected = dataset.expected
    if not isinstance(answer, dict) or not isinstance(answer.get("summary"), dict):
        keys = sorted(answer) if isinstance(answer, dict) else type(answer).__name__
        return [f"no summary in the answer (keys: {keys})"]
    summary = answer["summary"]
    problems = []
    checks = {
        "size_bytes": (answer.get("size_bytes"), dataset.size),
        "summary.events": (summary.get("events"), expected["events"]),
        "summary.unique_actors": (summary.get("unique_actors"), expected["unique_actors"]),
        "summary.files": (summary.get("files"), expected["files"]),
        "summary.files_failed": (summary.get("files_failed"), 0),
        "summary.skipped": (summary.get("skipped") or {}, {}),
    }
    for name, (got, want) in checks.items():
        if got != want:
            problems.append(f"{name} is {got!r}, expected {want!r}")
    if summary.get("event_types") != expected["event_types"]:
        wrong = sorted(
            key
            for key in set(expected["event_types"]) | set(summary.get("event_types") or {})
            if (summary.get("event_types") or {}).get(key) != expected["event_types"].get(key)
        )
        problems.append(f"summary.event_types differs for {wrong}")
    if actors:
        listed = answer.get("actors")
        if not isinstance(listed, list):
            problems.append("no actors list")
        else:
            if len(listed) != expected["unique_actors"]:
                problems.append(f"{len(listed)} actors listed, expected {expected['unique_actors']}")
            total = sum(actor.get("events", 0) for actor in listed)
            if total != expected["events"]:
                problems.append(f"actors' events add up to {total}, expected {expected['events']}")
    elif "actors" in answer:
        problems.append("actors listed although ?actors=false")
    return problems


class WrongAnswer(RuntimeError):
    """A server answered an upload wrongly (status or counts); the message says how to reproduce it."""


@dataclass
class UploadRun:
    """One timed upload of a dataset to a server, checked against the dataset's expected counts."""

    server: str
    label: str  # what was measured, e.g. "workers=2" or "throughput"
    round: int
    dataset: Dataset
    exchange: Exchange
    sample: Sample
    answer: dict[str, Any]
    load: str  # load average when the upload started

    @property
    def wall_s(self) -> float:
        """Connect to the last byte of the answer, on the client's clock."""
        return self.exchange.wall_s

    @property
    def upload_mb_s(self) -> float:
        """Bytes uploaded (the file as sent) per second, end to end, in MB/s."""
        return self.dataset.size / MB / self.wall_s

    @property
    def json_mb_s(self) -> float:
        """Uncompressed JSON bytes processed per second, end to end, in MB/s."""
        return self.dataset.json_bytes / MB / self.wall_s

    @property
    def events_per_s(self) -> float:
        """Events extracted per second, end to end."""
        return self.dataset.events / self.wall_s

    @property
    def receive_ms(self) -> float:
        """The server's own ``timing_ms.receive``."""
        return float((self.answer.get("timing_ms") or {}).get("receive", float("nan")))

    @property
    def process_ms(self) -> float:
        """The server's own ``timing_ms.process``."""
        return float((self.answer.get("timing_ms") or {}).get("process", float("nan")))

    @property
    def peak_rss_bytes(self) -> int:
        """Peak RSS of the server plus its workers during the upload."""
        return self.sample.total_peak_bytes

    @property
    def others_cpu_share(self) -> float:
        """Share of all cores that processes other than the server tree and the client kept busy (noise)."""
        others = self.sample.machine_cpu_s - self.sample.cpu_s - self.exchange.client_cpu_s
        return max(0.0, others) / (self.sample.wall_s * (os.cpu_count() or 1))

    def line(self) -> str:
        """One line for the log: speed, server timings, memory, CPU."""
        sample = self.sample
        main, workers = human_bytes(sample.main_peak_kib * 1024), human_bytes(sample.children_peak_kib * 1024)
        return (
            f"  {self.server:<9} {self.label:<10} round {self.round}: {self.wall_s:6.2f} s (sent "
            f"{self.exchange.sent_s:.2f} s, answer from {self.exchange.first_byte_s:.2f} s)  "
            f"{self.upload_mb_s:6.1f} MB/s upload  {self.json_mb_s:6.1f} MB/s JSON  "
            f"{self.events_per_s:9,.0f} events/s | server: receive {self.receive_ms:7.0f} ms, process "
            f"{self.process_ms:7.0f} ms | peak RSS {human_bytes(self.peak_rss_bytes)} (main {main}, "
            f"workers {workers} in {sample.children_seen} procs) | CPU s: main "
            f"{sample.main_thread_cpu_s:.1f}, threads {sample.other_threads_cpu_s:.1f}, workers "
            f"{sample.children_cpu_s:.1f} | waited for a CPU: main {sample.main_wait_s:.1f} s, workers "
            f"{sample.children_wait_s:.1f} s | others kept {self.others_cpu_share:.0%} of "
            f"{os.cpu_count()} cores busy | load {self.load}"
        )


def reproduction(server: Server, dataset: Dataset, query: str, body_kind: str) -> str:
    """A curl command that repeats an upload, for a report of a wrong answer."""
    target = f"{server.url}{UPLOAD_PATH}" + (f"?{query}" if query else "")
    if body_kind == "raw":
        data = f"--data-binary @{dataset.path} -H 'Content-Type: {dataset.content_type}'"
    else:
        data = f"-F 'file=@{dataset.path};type={dataset.content_type}'"
    return f"curl -sS -X POST {data} '{target}'"


def timed_upload(
    server: Server,
    dataset: Dataset,
    *,
    label: str = "",
    round_no: int = 0,
    query: str = "",
    body_kind: str = "raw",
    timeout: float = 300.0,
    sample_interval: float = 0.02,
    verify: bool = True,
) -> UploadRun:
    """Upload ``dataset`` to ``server`` while sampling its process tree; check the answer.

    A non-200 status, an answer that is not JSON, or (``verify``) counts that disagree with the dataset's
    expected.json raise :class:`WrongAnswer`.
    """
    load = load_average()
    with Sampler(server.pid, sample_interval) as sampler:
        exchange = upload(
            server.port,
            dataset.path,
            content_type=dataset.content_type,
            body_kind=body_kind,
            query=query,
            timeout=timeout,
        )
    how = reproduction(server, dataset, query, body_kind)
    if exchange.status != 200:
        raise WrongAnswer(
            f"{server.name} answered {exchange.status} to {dataset.name}: {exchange.body[:500]!r}\n"
            f"  reproduce: {how}\n  server log tail:\n{server.tail()}"
        )
    try:
        answer = orjson.loads(exchange.body)
    except orjson.JSONDecodeError as error:
        raise WrongAnswer(f"{server.name}: answer is not JSON ({error}): {exchange.body[:300]!r}") from None
    if verify:
        problems = verify_answer(answer, dataset, actors="actors=false" not in query)
        if problems:
            raise WrongAnswer(
                f"{server.name} answered {dataset.name} wrongly: {'; '.join(problems)}\n  reproduce: {how}"
            )
    return UploadRun(server.name, label, round_no, dataset, exchange, sampler.result, answer, load)
