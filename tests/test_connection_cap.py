"""Health always gets in: with the connection cap full of idle connections, a new one is let in at once."""

from __future__ import annotations

import statistics
import time

import trio

from conftest import StartServer, wait_until

CAP = 20
HEALTH = b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n"


async def _read_head(stream: trio.SocketStream) -> bytes:
    """Read up to the end of an answer's head and its (small) body; the head's status line."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += await stream.receive_some(65536)
    return head.split(b"\r\n")[0]


async def _probe(port: int, held: list[trio.SocketStream]) -> float:
    """Seconds for a health probe on a new connection (connect to answer), which then stays open idle."""
    started = time.perf_counter()
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        held.append(stream)
        await stream.send_all(HEALTH)
        assert await _read_head(stream) == b"HTTP/1.1 200 OK"
    return time.perf_counter() - started


async def _closed_quietly(stream: trio.SocketStream) -> bool:
    """Whether the server closed ``stream`` without a word (EOF, no 408)."""
    with trio.move_on_after(0.01):
        try:
            return await stream.receive_some(65536) == b""
        except trio.BrokenResourceError:
            return True
    return False


async def test_health_gets_in_when_the_cap_is_full_of_idle_connections(start_server: StartServer) -> None:
    server = await start_server(max_connections=CAP, header_timeout=60.0, keepalive_timeout=60.0)
    kept_alive, silent = [], []
    for _ in range(CAP // 2):  # idle keep-alive connections: one request answered, then nothing
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(HEALTH)
        await _read_head(stream)
        kept_alive.append(stream)
    for _ in range(CAP - CAP // 2):  # connections that never send a byte
        silent.append(await trio.open_tcp_stream("127.0.0.1", server.port))
    await wait_until(lambda: server.state.stats.connections_open == CAP)

    probes: list[trio.SocketStream] = []
    first = await _probe(server.port, probes)
    # Idle keep-alive connections go first (oldest first); the silent ones are still open.
    assert await _closed_quietly(kept_alive[0])
    assert not any([await _closed_quietly(stream) for stream in silent])
    # Every probe stays open idle: each next one needs a connection reclaimed.
    timings = [first] + [await _probe(server.port, probes) for _ in range(CAP)]
    assert statistics.median(timings) <= 0.05, timings
    assert max(timings) < 1.0, timings  # it was ~9 s: until header timeouts freed slots
    assert server.state.stats.connections_reclaimed >= len(probes)
    assert all([await _closed_quietly(stream) for stream in kept_alive])
    for stream in kept_alive + silent + probes:
        await stream.aclose()


async def test_busy_connections_are_not_reclaimed(start_server: StartServer) -> None:
    """A connection in the middle of a head is not idle: the newcomer waits for a slot instead."""
    server = await start_server(max_connections=2, header_timeout=60.0)
    partial = [await trio.open_tcp_stream("127.0.0.1", server.port) for _ in range(2)]
    for stream in partial:
        await stream.send_all(b"GET /api/v1/health HTTP/1.1\r\n")
    await wait_until(lambda: server.state.stats.connections_open == 2)
    probes: list[trio.SocketStream] = []
    with trio.move_on_after(0.5) as waited:
        await _probe(server.port, probes)
    assert waited.cancelled_caught
    assert server.state.stats.connections_reclaimed == 0
    await partial[0].send_all(b"Host: x\r\nConnection: close\r\n\r\n")
    assert await _read_head(partial[0]) == b"HTTP/1.1 200 OK"
    assert await _probe(server.port, probes) < 1.0
    for stream in partial + probes:
        await stream.aclose()


async def test_connections_that_never_send_a_byte_are_reclaimed_too(start_server: StartServer) -> None:
    server = await start_server(max_connections=4, header_timeout=60.0)
    silent = [await trio.open_tcp_stream("127.0.0.1", server.port) for _ in range(4)]
    await wait_until(lambda: server.state.stats.connections_open == 4)
    probes: list[trio.SocketStream] = []
    assert await _probe(server.port, probes) < 1.0
    assert await _closed_quietly(silent[0])  # the oldest, closed without a 408
    for stream in silent + probes:
        await stream.aclose()
