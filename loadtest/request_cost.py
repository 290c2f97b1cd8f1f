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

``--slow-senders N`` then runs N of ``bench_slow_clients.py``'s 1 KB/s clients (an NDJSON body, 512 bytes
every 0.5 s; in this process) and prints our event loop's CPU per piece over ``--seconds``; then the clients
send the rest at once and get their answers. All traffic on 127.0.0.1; bounded by the request counts and
``--seconds``.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

import trio

import bench_slow_clients
import harness

HERE = Path(__file__).resolve().parent
REQUEST = b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
#: As ``bench_slow_clients.py``'s steady clients: 1 KB/s, a piece every 0.5 s, a 160 KB body.
SLOW_RATE, SLOW_TICK, SLOW_BODY = 1024, 0.5, 160_000


def measure(server: harness.Server, requests: int, gap: float) -> str:
    """``requests`` health requests ``gap`` s apart on one connection: round trips and CPU per request."""
    times: list[float] = []
    with socket.create_connection((harness.HOST, server.port)) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(20):  # the connection and the first answers out of the way
            client.sendall(REQUEST)
            harness.read_response(client)
        cpu_before = harness.time_on_cpu_seconds(server.pid)
        for _ in range(requests):
            if gap:
                time.sleep(gap)
            started = time.perf_counter()
            client.sendall(REQUEST)
            harness.read_response(client)
            times.append((time.perf_counter() - started) * 1e3)
        cpu_us = (harness.time_on_cpu_seconds(server.pid) - cpu_before) / requests * 1e6
    return (
        f"round trip p50 {harness.median(times):.3f} ms, p99 {harness.percentile(times, 99):.3f} ms; "
        f"the server thread's CPU {cpu_us:.0f} us a request"
    )


async def measure_slow_senders(server: harness.Server, senders: int, seconds: float) -> str:
    """The event loop's CPU per piece while ``senders`` slow senders send (after a few ticks to settle)."""
    body, _ = bench_slow_clients.slow_body(harness.ensure_dataset("ndjson"), SLOW_BODY)
    flush = trio.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(senders):
            result = bench_slow_clients.SlowResult(SLOW_RATE)
            send = bench_slow_clients.slow_client
            nursery.start_soon(send, server.port, body, SLOW_RATE, SLOW_TICK, flush, result)
        await trio.sleep(4 * SLOW_TICK)
        cpu_before, started = harness.time_on_cpu_seconds(server.pid), time.monotonic()
        await trio.sleep(seconds)
        cpu_s, elapsed = harness.time_on_cpu_seconds(server.pid) - cpu_before, time.monotonic() - started
        flush.set()  # the rest of each body at once, and the answers: the clients end
    per_piece_us = cpu_s / (senders * elapsed / SLOW_TICK) * 1e6
    piece = int(SLOW_RATE * SLOW_TICK)
    return f"{senders} slow senders: the event loop's CPU {per_piece_us:.0f} us a {piece}-byte piece"


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
