"""Health with the connection cap overrun: 1,100 keep-alive pollers against --max-connections 1024.

Starts our server (default cap, one worker), starts ``python -m harness swarm`` in a client process (1,100
connections each polling health every 3 s over keep-alive), and meanwhile probes health from this process
as a load balancer does: a new connection every ``--probe-interval`` s, timed from connect to answer.
Prints the probes' latency (p50/p99/max) and what the pollers saw (their latency, and how many found
their connection reclaimed). Before the cap reclaimed idle connections, one probe waited 17 s.

    uv run python loadtest/bench_connection_cap.py
    uv run python loadtest/bench_connection_cap.py --connections 1100 --requests 5 --interval 3

Bounded: ``--requests`` polls per poller, and ``--max-seconds`` for the whole run.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

PROBE = f"GET {harness.HEALTH_PATH} HTTP/1.1\r\nHost: {harness.HOST}\r\nConnection: close\r\n\r\n".encode()


def probe(port: int, timeout: float) -> float | None:
    """Seconds from connect to a 200 answer on a new connection; None on failure."""
    started = time.perf_counter()
    try:
        with socket.create_connection((harness.HOST, port), timeout=timeout) as sock:
            sock.sendall(PROBE)
            status, _, _ = harness.read_response(sock)
    except (OSError, ValueError):
        return None
    return time.perf_counter() - started if status == 200 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=1100)
    parser.add_argument("--requests", type=int, default=5, help="polls per poller")
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between a poller's polls")
    parser.add_argument("--probe-interval", type=float, default=0.1)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    arguments = parser.parse_args(argv)
    harness.install_run_guards(arguments.max_seconds)
    harness.raise_fd_limit(arguments.connections + 256)
    polling_s = arguments.requests * arguments.interval
    with tempfile.TemporaryDirectory() as tmp:
        command = harness.server_command("ours", tmp, 1)
        with harness.running_server("ours", command) as server:
            swarm = harness.start_client_process(
                [
                    *("swarm", "--port", str(server.port), "--connections", str(arguments.connections)),
                    *("--requests", str(arguments.requests), "--interval", str(arguments.interval)),
                    *("--timeout", "30", "--max-seconds", str(polling_s + 30)),
                ]
            )
            time.sleep(1.0)  # the pollers connect
            latencies, failed = [], 0
            deadline = time.monotonic() + polling_s
            while time.monotonic() < deadline:
                took = probe(server.port, 30.0)
                if took is None:
                    failed += 1
                else:
                    latencies.append(took)
                time.sleep(arguments.probe_interval)
            pollers = harness.finish_client_process(swarm, polling_s + 60)
    print(f"probes (new connection each): {harness.describe_latency(harness.latency_summary(latencies))}")
    print(f"probes failed: {failed}")
    print(f"pollers: {harness.describe_latency(pollers)}; opened {pollers['connections_opened']}")
    print(f"pollers' errors: {pollers['errors']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
