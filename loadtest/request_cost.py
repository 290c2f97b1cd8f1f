"""Diagnostic: what one health request costs our event loop, warm (back to back) and cold (10 ms apart).

    uv run --group loadtest python loadtest/request_cost.py
    uv run --group loadtest python loadtest/request_cost.py --requests 4000 --cold-requests 800

Starts upload-server on default settings and ``floor_server.py`` (Trio and h11 answering health and doing
nothing else) on an otherwise idle machine, and sends each ``GET /api/v1/health`` on one keep-alive
connection: first back to back, then with ``--gap`` seconds between requests, when the caches and the
TLB have gone cold and the idle CPU has halted. For each it prints the round trip's median and p99 and the
server thread's CPU per request (``/proc/<pid>/task/<pid>/schedstat``, nanoseconds, not the 10 ms ticks of
``/proc/<pid>/stat``). The difference between the two servers is our request path; what the floor server
costs is Trio's and h11's. All traffic on 127.0.0.1; bounded by the request counts.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

import harness

HERE = Path(__file__).resolve().parent
REQUEST = b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="back-to-back requests per server")
    parser.add_argument("--cold-requests", type=int, default=400, help="requests --gap apart per server")
    parser.add_argument("--gap", type=float, default=0.01, help="seconds between the cold requests")
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
