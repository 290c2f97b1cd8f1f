"""Speak HTTP/1.1 by hand to the server: over a real socket, or in memory to the real connection code.

``MemoryServer`` serves each client with the server's own connection task (``HttpConnection`` and the real
router, plus one test route, ``ECHO_PATH``) over ``trio.testing`` memory streams instead of sockets. Run
under ``MockClock(autojump_threshold=0)`` (pytest-trio's ``autojump_clock`` fixture), every deadline fires
at its exact virtual time, in microseconds of real time, and the same way on every run.

What stays on real sockets: what the kernel decides (backlog, socket buffers, resets), and work done in
worker processes or threads. Autojump advances the clock whenever every task waits, and a task waiting
for a thread or a process counts as waiting: a deadline would fire while the work is still running.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import trio.testing

from conftest import RunningServer
from upload_server.admission import SpoolBudget
from upload_server.config import Config
from upload_server.errors import ClientDisconnected
from upload_server.http.connection import Router
from upload_server.http.exchange import Exchange
from upload_server.ingest.dispatch import open_worker_pool
from upload_server.routes import router
from upload_server.server import connection_limits, request_observer, serve_connection
from upload_server.state import ServerState, derived_spool_budget

#: Upper bound for any single wait on a real server; generous, since a passing test never reaches it (5 s was
#: reached by a health probe beside a 1-byte-chunk upload with the suite in parallel at load 18 on 2 cores).
WAIT = 30.0
#: The same bound in memory, in virtual seconds: above every default deadline of the server (the longest,
#: body idle, send and the body-rate window, are 30 s), so that a test can wait them out; it costs nothing.
MEMORY_WAIT = 120.0


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes
    interim: list[int] = field(default_factory=list)  # 1xx statuses seen before this response

    def json(self) -> Any:
        return json.loads(self.body)

    def error_code(self) -> str:
        """The ``error.code`` of a JSON error answer (and check the error shape on the way)."""
        document = self.json()
        assert set(document) == {"error"}
        assert set(document["error"]) == {"code", "message", "detail"}
        assert isinstance(document["error"]["message"], str) and document["error"]["message"]
        assert isinstance(document["error"]["detail"], dict)
        return document["error"]["code"]


class RawClient:
    """A hand-driven HTTP/1.1 client over one connection, for what real clients never send."""

    def __init__(self, stream: trio.abc.Stream, *, wait: float = WAIT) -> None:
        self.stream = stream
        self.wait = wait
        self.buffer = bytearray()

    @classmethod
    async def connect(cls, server: RunningServer, *, receive_buffer: int | None = None) -> RawClient:
        """Connect; ``receive_buffer`` shrinks SO_RCVBUF (before connecting, so the window stays small)."""
        if isinstance(server, MemoryServer):
            assert receive_buffer is None, "a memory stream has no socket buffer; use client_reads=False"
            return await server.connect()
        if receive_buffer is None:
            return cls(await trio.open_tcp_stream("127.0.0.1", server.port))
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, receive_buffer)
        await sock.connect(("127.0.0.1", server.port))
        return cls(trio.SocketStream(sock))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> bool:
        """Read more bytes into the buffer; False at EOF (a reset counts as EOF)."""
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            return False
        self.buffer += data
        return bool(data)

    async def _read_head(self) -> tuple[int, str, dict[str, str]]:
        while b"\r\n\r\n" not in self.buffer:
            if not await self._fill():
                raise EOFError(f"connection closed before a response head; got {bytes(self.buffer)!r}")
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer = bytearray(rest)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, status, reason = [*status_line.split(" ", 2), ""][:3]
        assert version == "HTTP/1.1", status_line
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(status), reason, headers

    async def read_response(self, *, head_request: bool = False, skip_interim: bool = True) -> RawResponse:
        """Read one response (a HEAD response has no body); 1xx responses are collected in ``interim``."""
        interim: list[int] = []
        with trio.fail_after(self.wait):
            while True:
                status, reason, headers = await self._read_head()
                if status >= 200 or not skip_interim:
                    break
                interim.append(status)
            bodiless = head_request or status < 200 or status in (204, 304)  # RFC 9112 6.3
            length = 0 if bodiless else int(headers["content-length"])
            while len(self.buffer) < length:
                if not await self._fill():
                    raise EOFError("connection closed mid-body")
            body, self.buffer = bytes(self.buffer[:length]), self.buffer[length:]
        return RawResponse(status, reason, headers, body, interim)

    async def read_to_eof(self) -> bytes:
        """Everything the server sends until it closes the connection."""
        with trio.fail_after(self.wait):
            while await self._fill():
                pass
        data, self.buffer = bytes(self.buffer), bytearray()
        return data

    async def at_eof(self, within: float | None = None) -> bool:
        """Whether the server closes the connection (sending nothing more) within ``within`` seconds."""
        with trio.move_on_after(self.wait if within is None else within):
            while await self._fill():
                pass
            return not self.buffer
        return False

    async def nothing_within(self, seconds: float) -> bool:
        """True when the server sends nothing and keeps the connection open for ``seconds``."""
        with trio.move_on_after(seconds):
            await self._fill()
            return False
        return not self.buffer

    async def aclose(self) -> None:
        await self.stream.aclose()


def get(path: str, *extra: str, method: str = "GET", version: str = "1.1") -> bytes:
    """A bodiless request head."""
    lines = [f"{method} {path} HTTP/{version}", "Host: 127.0.0.1", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def upload_head(length: int | None, *extra: str, content_type: str = "application/json") -> bytes:
    """The head of a raw POST /api/v1/upload; chunked when ``length`` is None."""
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    lines = ["POST /api/v1/upload HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {content_type}", framing]
    return ("\r\n".join([*lines, *extra]) + "\r\n\r\n").encode()


def chunked(*pieces: bytes) -> bytes:
    """Pieces in chunked transfer coding, with the final zero chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


async def eventually(predicate: Callable[[], bool], within: float = WAIT) -> bool:
    """Poll ``predicate`` (server state that has no event to wait on) until true or ``within`` passes."""
    deadline = trio.current_time() + within
    while True:
        if predicate():
            return True
        if trio.current_time() > deadline:
            return False
        await trio.sleep(0.005)


async def assert_no_leftovers(server: RunningServer, within: float = 1.0) -> None:
    """The temp dir is empty, or becomes so within ``within`` seconds (removal may follow the answer)."""
    await eventually(lambda: not server.leftover_files(), within)
    assert server.leftover_files() == []


async def assert_still_serving(server: RunningServer) -> None:
    """A fresh connection gets a healthy answer."""
    client = await RawClient.connect(server)
    await client.send(get("/api/v1/health"))
    assert (await client.read_response()).status == 200
    await client.aclose()


# ------------------------------------------------------------------------------------------ in memory
#: The test route: a body read to its end, then an answer, the way an upload is (see ``handle_echo``).
ECHO_PATH = "/test/echo"
#: How long ``handle_echo`` stands for an upload's processing, in (virtual) seconds.
ECHO_PROCESSING_S = 0.5


async def handle_echo(exchange: Exchange) -> None:
    """Read the body, "process" while watching for the client leaving, answer its size and sha256.

    It drives the connection as the upload handler does, without a spool or workers (threads and
    processes, which autojump cannot wait for): the body through ``receive_body_chunk`` (so 100-continue,
    chunked framing and the body deadline are the real ones), a wait in which ``wait_for_disconnect``
    reads ahead whatever the client pipelines, then a JSON answer sent through ``start_stream`` with a
    Content-Length, as the upload's JSON answer is.
    """
    digest, size = hashlib.sha256(), 0
    while chunk := await exchange.receive_body_chunk():
        digest.update(chunk)
        size += len(chunk)
    with trio.move_on_after(ECHO_PROCESSING_S):
        await exchange.wait_for_disconnect()
        raise ClientDisconnected("the client left while its request was processed")
    body = json.dumps({"size_bytes": size, "sha256": digest.hexdigest()}).encode()
    await exchange.start_stream(200, "application/json", [(b"content-length", str(len(body)).encode())])
    await exchange.send_chunk(body)
    await exchange.end_stream()


def with_echo(route: Router) -> Router:
    async def route_with_echo(exchange: Exchange) -> None:
        if exchange.request.path == ECHO_PATH:
            await handle_echo(exchange)
        else:
            await route(exchange)

    return route_with_echo


@dataclass
class MemoryServer(RunningServer):
    """The server's state and connection handling with memory streams for sockets (``port`` stays 0)."""

    nursery: trio.Nursery
    route: Router

    async def connect(self, *, client_reads: bool = True) -> RawClient:
        """A new connection, served as the server serves an accepted one.

        With ``client_reads=False`` the answers travel through a stream with no buffer at all (trio's
        lockstep stream): a client that does not read blocks every send, as a full socket buffer would.
        """
        if client_reads:
            client_end, server_end = trio.testing.memory_stream_pair()
        else:
            to_server_send, to_server_receive = trio.testing.memory_stream_one_way_pair()
            to_client_send, to_client_receive = trio.testing.lockstep_stream_one_way_pair()
            client_end = trio.StapledStream(to_server_send, to_client_receive)
            server_end = trio.StapledStream(to_client_send, to_server_receive)
        state = self.state
        await state.connection_slots.acquire()  # serve_connection releases it, as after an accept
        limits, observe = connection_limits(state.config), request_observer(state)
        self.nursery.start_soon(serve_connection, server_end, state, limits, self.route, observe)
        return RawClient(client_end, wait=MEMORY_WAIT)


StartMemoryServer = Callable[..., Awaitable[MemoryServer]]


@contextlib.asynccontextmanager
async def memory_servers(tmp_dir: Path) -> AsyncIterator[StartMemoryServer]:
    """Start in-memory servers with settings as keyword arguments; their connections end with the block."""
    clock = trio.lowlevel.current_clock()
    assert isinstance(clock, trio.testing.MockClock) and clock.autojump_threshold == 0, (
        "in-memory protocol tests run on virtual time: request pytest-trio's autojump_clock fixture"
    )
    async with contextlib.AsyncExitStack() as pools, trio.open_nursery() as nursery:

        async def start(**overrides: Any) -> MemoryServer:
            settings: dict[str, Any] = {"tmp_dir": str(tmp_dir), "workers": 1, **overrides}
            config = Config(**settings)
            # A real pool: health reports it. Its processes start only when a job runs, and none does here.
            workers = await pools.enter_async_context(open_worker_pool(config))
            free = shutil.disk_usage(tmp_dir).free  # what serve() measures, the same way (statvfs)
            state = ServerState(config, workers, SpoolBudget(derived_spool_budget(config, free)))
            state.stats.tmp_free_bytes = free
            return MemoryServer(state=state, tmp_dir=tmp_dir, nursery=nursery, route=with_echo(router(state)))

        yield start
        nursery.cancel_scope.cancel()
