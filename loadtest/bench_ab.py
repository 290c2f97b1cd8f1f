"""Two builds of upload-server side by side: this checkout against another (a baseline), uploads alternating.

    git archive main | tar -x -C /tmp/base && (cd /tmp/base && uv sync --locked)
    uv run --group loadtest python loadtest/bench_ab.py --baseline-python /tmp/base/.venv/bin/python

    uv run --group loadtest python loadtest/bench_ab.py --baseline-python ... --health-polls 5000

Both servers run at once with their default settings, each in its own temp dir; ``--rounds`` uploads of the
dataset to each, alternating which goes first, every answer checked (``harness.timed_upload``). Prints each
upload's line, then each build's median wall time and events/s and the ratio. On a shared machine the noise
falls on both builds alike, which two separate runs of ``bench_compare.py`` cannot promise.

``--health-polls N`` compares health instead: N polls of each server on one keep-alive connection each,
alternating, ``--poll-pause`` apart; prints each build's serving-process CPU a poll (the cost of a request
beyond the socket: the HTTP machinery, the access log) and its p50 and p99.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time

import harness


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline-python", required=True, help="the interpreter of the baseline's venv")
    parser.add_argument("--dataset", default="large24", choices=sorted(harness.DATASETS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--pause", type=float, default=1.0, help="seconds of rest before each upload")
    parser.add_argument("--query", default="", help="query string for every upload, e.g. actors=false")
    parser.add_argument("--health-polls", type=int, default=0, help="compare N health polls each instead")
    parser.add_argument("--poll-pause", type=float, default=0.001, help="seconds between health polls")
    args = parser.parse_args()
    dataset = harness.ensure_dataset(args.dataset)
    with tempfile.TemporaryDirectory() as base_dir, tempfile.TemporaryDirectory() as this_dir:
        commands = {
            "baseline": [args.baseline_python, *harness.server_command("ours", base_dir)[1:]],
            "this": harness.server_command("ours", this_dir),
        }
        walls: dict[str, list[float]] = {name: [] for name in commands}
        with (
            harness.running_server("baseline", commands["baseline"]) as baseline,
            harness.running_server("this", commands["this"]) as this,
        ):
            if args.health_polls:
                return compare_health(baseline, this, args.health_polls, args.poll_pause)
            for server in (baseline, this):
                harness.timed_upload(server, dataset, label="warm-up", query=args.query)
            for round_no in range(1, args.rounds + 1):
                for server in (baseline, this) if round_no % 2 else (this, baseline):
                    harness.warm_page_cache(dataset.path)
                    time.sleep(args.pause)
                    run = harness.timed_upload(
                        server, dataset, label=server.name, round_no=round_no, query=args.query
                    )
                    walls[server.name].append(run.wall_s)
                    print(run.line(), flush=True)
    for name, seconds in walls.items():
        wall, rounds = statistics.median(seconds), [round(s, 2) for s in seconds]
        print(f"{name:<8} median {wall:.3f} s, {dataset.events / wall:,.0f} events/s; rounds {rounds}")
    ratio = statistics.median(walls["baseline"]) / statistics.median(walls["this"])
    print(f"this build is {ratio:.2f}x the baseline's events/s (load average now {harness.load_average()})")
    return 0


def compare_health(baseline: harness.Server, this: harness.Server, polls: int, pause: float) -> int:
    """``polls`` health requests to each server, alternating; CPU a poll and latency per build."""
    servers = (baseline, this)
    connections = {s.name: socket.create_connection((harness.HOST, s.port), timeout=10) for s in servers}
    request = f"GET {harness.HEALTH_PATH} HTTP/1.1\r\nHost: {harness.HOST}\r\n\r\n".encode()
    seconds: dict[str, list[float]] = {s.name: [] for s in servers}

    def poll(server: harness.Server) -> float:
        started = time.perf_counter()
        connections[server.name].sendall(request)
        status, _headers, _body = harness.read_response(connections[server.name])
        assert status == 200, f"{server.name}: health answered {status}"
        return time.perf_counter() - started

    for _ in range(200):  # warm-up
        for server in servers:
            poll(server)
    cpu_before = {s.name: harness.process_cpu_seconds(s.pid) for s in servers}
    for number in range(polls):
        for server in servers if number % 2 else servers[::-1]:
            seconds[server.name].append(poll(server))
            time.sleep(pause)
    for server in servers:
        cpu_us = (harness.process_cpu_seconds(server.pid) - cpu_before[server.name]) / polls * 1e6
        p50, p99 = (harness.percentile(seconds[server.name], q) * 1e3 for q in (50, 99))
        print(f"{server.name:<8} CPU a poll {cpu_us:.0f} us; p50 {p50:.3f} ms, p99 {p99:.3f} ms")
    for connection in connections.values():
        connection.close()
    print(f"{polls} polls each; load average now {harness.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
