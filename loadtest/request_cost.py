"""Diagnostic: what one health request costs our event loop, warm (back to back) and cold (10 ms apart).

    uv run --group loadtest python loadtest/request_cost.py
    uv run --group loadtest python loadtest/request_cost.py --requests 4000 --cold-requests 800
    uv run --group loadtest python loadtest/request_cost.py --slow-senders 200   # + a slow sender's piece

Starts upload-server on default settings and ``floor_server.py`` (Trio and h11 answering health and doing
nothing else) on an otherwise idle machine, and sends each ``GET /api/v1/health`` on one keep-alive
connection: first back to back, then with ``--gap`` seconds between requests, when the caches and the
TLB have gone cold and the idle CPU has halted. For each it prints the round trip's median and p99 and the
server thread's CPU per request (``/proc/<pid>/task/<pid>/schedstat``, nanoseconds, not the 10 ms ticks of
``/proc/<pid>/stat``). The difference between the two servers is our request path; what the floor server
costs is Trio's and h11's.

``--slow-senders N`` then has N clients (one trio run in this process) each send a raw upload's body 512
bytes every 0.5 s, as ``bench_slow_clients.py``'s 1 KB/s clients do, and prints our event loop's CPU per
piece over ``--seconds``. All traffic on 127.0.0.1; bounded by the request counts and ``--seconds``.
"""

from __future__ import annotations

import argparse
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

import trio

import harness

HERE = Path(__file__).resolve().parent
REQUEST = b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
SLOW_PIECE = b" " * 512
SLOW_TICK = 0.5
SLOW_HEAD = (
    b"POST /api/v1/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: 1000000\r\n\r\n"  # 1 MB: at 1 KB/s, far more than a run sends
)


def thread_cpu_ns(pid: int) -> int:
    """The CPU time of the process's main thread (the event loop), in nanoseconds."""
    return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0])


def measure(server: harness.Server, requests: int, gap: float) -> str:
    """``requests`` health requests ``gap`` s apart on one connection: round trips and CPU per request."""
    times: list[float] = []
    with socket.create_connection((harness.HOST, server.port)) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(20):  # the connection and the first answers out of the way
            client.sendall(REQUEST)
            harness.read_response(client)
        cpu_before = thread_cpu_ns(server.pid)
        for _ in range(requests):
            if gap:
                time.sleep(gap)
            started = time.perf_counter()
            client.sendall(REQUEST)
            harness.read_response(client)
            times.append((time.perf_counter() - started) * 1e3)
        cpu_us = (thread_cpu_ns(server.pid) - cpu_before) / requests / 1e3
    return (
        f"round trip p50 {harness.median(times):.3f} ms, p99 {harness.percentile(times, 99):.3f} ms; "
        f"the server thread's CPU {cpu_us:.0f} us a request"
    )


async def slow_sender(port: int, stop: trio.Event) -> None:
    """One raw upload whose body comes ``SLOW_PIECE`` at a time, one every ``SLOW_TICK`` s, until ``stop``."""
    await trio.sleep(random.uniform(0, SLOW_TICK))  # the senders spread over a tick, not all at once
    stream = await trio.open_tcp_stream(harness.HOST, port)
    async with stream:
        await stream.send_all(SLOW_HEAD)
        while not stop.is_set():
            await stream.send_all(SLOW_PIECE)
            await trio.sleep(SLOW_TICK)


async def measure_slow_senders(server: harness.Server, senders: int, seconds: float) -> str:
    """The event loop's CPU per piece while ``senders`` slow senders send (after a few ticks to settle)."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(senders):
            nursery.start_soon(slow_sender, server.port, stop)
        await trio.sleep(4 * SLOW_TICK)
        cpu_before, started = thread_cpu_ns(server.pid), time.monotonic()
        await trio.sleep(seconds)
        cpu_ns, elapsed = thread_cpu_ns(server.pid) - cpu_before, time.monotonic() - started
        stop.set()
    pieces = senders * elapsed / SLOW_TICK
    per_piece_us = cpu_ns / pieces / 1e3
    return (
        f"{senders} slow senders: the event loop's CPU {per_piece_us:.0f} us a {len(SLOW_PIECE)}-byte piece"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="back-to-back requests per server")
    parser.add_argument("--cold-requests", type=int, default=400, help="requests --gap apart per server")
    parser.add_argument("--gap", type=float, default=0.01, help="seconds between the cold requests")
    parser.add_argument("--slow-senders", type=int, default=0, help="then this many slow senders")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the slow senders are measured")
    args = parser.parse_args()
    floor_command = [sys.executable, str(HERE / "floor_server.py"), "--port", str(harness.free_port())]
    with (
        tempfile.TemporaryDirectory() as tmp,
        harness.running_server("ours", harness.server_command("ours", tmp)) as ours,
        harness.running_server("floor", floor_command) as floor,
    ):
        for server in (ours, floor):
            warm, cold = measure(server, args.requests, 0.0), measure(server, args.cold_requests, args.gap)
            print(f"{server.name}: warm (back to back): {warm}")
            print(f"{server.name}: cold ({args.gap * 1e3:g} ms apart): {cold}")
        if args.slow_senders:
            print(f"ours: {trio.run(measure_slow_senders, ours, args.slow_senders, args.seconds)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
