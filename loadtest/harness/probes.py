"""Client processes (health polling, a swarm of connections) that print one JSON summary, and their CLI."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import orjson

from .client import read_response
from .common import HEALTH_PATH, HERE, HOST, parse_size, percentile
from .datasets import DATASETS, ensure_dataset
from .sampling import run_queue_wait_seconds

# --------------------------------------------------------------------------- client processes
#: A client process: this package's ``__main__`` (run from loadtest/, where the package is found).
CLIENT = [sys.executable, "-m", "harness"]
#: Polls slower than this are listed with their start time (``time.monotonic``, one clock for all
#: processes), to be matched against the server's own timeline (``step_trace.py``).
SLOW_POLL_MS = 5.0
HEALTH_REQUEST = f"GET {HEALTH_PATH} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()


def latency_summary(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max/mean of latencies given in seconds, in milliseconds."""
    ms = [value * 1000 for value in latencies_s]
    return {
        "count": len(ms),
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else float("nan"),
        "mean_ms": statistics.fmean(ms) if ms else float("nan"),
        "over_5ms": sum(1 for value in ms if value > 5.0),
    }


def describe_latency(result: dict[str, Any]) -> str:
    """``p50 .. ms, p95 .. ms, p99 .. ms, max .. ms over N polls`` from a :func:`latency_summary`."""
    return (
        f"p50 {result['p50_ms']:.2f} ms, p95 {result['p95_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, "
        f"max {result['max_ms']:.2f} ms over {result['count']} polls"
    )


def poll_health(port: int, duration: float, interval: float, timeout: float) -> dict[str, Any]:
    """Poll health on one keep-alive connection for ``duration`` s, one request every ``interval`` s.

    A failed request (timeout, non-200, closed connection) is counted and the connection reopened.
    """
    latencies: list[float] = []
    #: Each poll's time less the probe's own wait for a CPU within it: what the server and the network took.
    less_own_wait: list[float] = []
    slow: list[tuple[float, float]] = []  # (time.monotonic() at the send, ms) of polls over SLOW_POLL_MS
    errors: Counter[str] = Counter()
    reconnects = 0
    waited_before = run_queue_wait_seconds(os.getpid())  # the probe's one thread
    sock: socket.socket | None = None
    deadline = time.monotonic() + duration
    next_at = time.monotonic()
    while time.monotonic() < deadline:
        try:
            if sock is None:
                sock = socket.create_connection((HOST, port), timeout=timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                reconnects += 1
            own_wait = -run_queue_wait_seconds(os.getpid())
            started = time.perf_counter()
            sock.sendall(HEALTH_REQUEST)
            status, headers, _ = read_response(sock)
            elapsed = time.perf_counter() - started
            own_wait += run_queue_wait_seconds(os.getpid())
            if status == 200:
                latencies.append(elapsed)
                less_own_wait.append(max(0.0, elapsed - own_wait))
                if elapsed * 1000 > SLOW_POLL_MS:
                    slow.append((time.monotonic() - elapsed, round(elapsed * 1000, 3)))
            else:
                errors[f"status {status}"] += 1
            if headers.get("connection", "").lower() == "close":
                sock.close()
                sock = None
        except (OSError, ValueError) as error:
            errors[type(error).__name__] += 1
            if sock is not None:
                sock.close()
            sock = None
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))
    if sock is not None:
        sock.close()
    return {
        **latency_summary(latencies),
        "errors": dict(errors),
        "connections_opened": reconnects,
        "slow": slow,
        "less_own_wait": latency_summary(less_own_wait),
        # The probe's own wait for a CPU: a slow poll may be the probe scheduled late, not the server.
        "probe_wait_s": run_queue_wait_seconds(os.getpid()) - waited_before,
    }


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards ``wanted`` (up to the hard limit); return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


async def _swarm(
    port: int, connections: int, requests: int, interval: float, wait_s: float, max_seconds: float
) -> dict[str, Any]:
    """Open ``connections`` keep-alive connections, then let each poll health ``requests`` times.

    ``wait_s`` bounds each connect and each answer; ``max_seconds`` the whole polling phase.
    """
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    connect_started = time.perf_counter()

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.wait_for(asyncio.open_connection(HOST, port), wait_s)
        except (OSError, TimeoutError) as error:
            errors[f"connect {type(error).__name__}"] += 1
            return None

    for pair in await asyncio.gather(*(connect() for _ in range(connections))):
        if pair is not None:
            opened.append(pair)
    connect_s = time.perf_counter() - connect_started

    async def poll(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        done = 0
        await asyncio.sleep(random.uniform(0, interval))  # spread the connections over the interval
        next_at = loop.time()
        for _ in range(requests):
            started = time.perf_counter()
            try:
                writer.write(HEALTH_REQUEST)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), wait_s)
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split(" ", 2)[1])
                length = 0
                closing = False
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    name = name.strip().lower()
                    if name == "content-length":
                        length = int(value)
                    elif name == "connection" and value.strip().lower() == "close":
                        closing = True
                await asyncio.wait_for(reader.readexactly(length), wait_s)
                if status != 200:
                    errors[f"status {status}"] += 1
                else:
                    latencies.append(time.perf_counter() - started)
                    done += 1
                if closing:
                    errors["server closed the connection"] += 1
                    break
            except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as error:
                errors[type(error).__name__] += 1
                break
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
        return done

    poll_started = time.perf_counter()
    tasks = [asyncio.ensure_future(poll(reader, writer)) for reader, writer in opened]
    finished, pending = await asyncio.wait(tasks, timeout=max_seconds) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    if pending:
        errors["cut off by --max-seconds"] += len(pending)
    poll_s = time.perf_counter() - poll_started
    for _, writer in opened:
        writer.close()
    completed = sum(task.result() for task in finished if not task.cancelled() and task.exception() is None)
    return {
        **latency_summary(latencies),
        "connections_wanted": connections,
        "connections_opened": len(opened),
        "connect_s": connect_s,
        "requests_ok": completed,
        "requests_wanted": connections * requests,
        "poll_s": poll_s,
        "requests_per_s": completed / poll_s if poll_s else 0.0,
        "errors": dict(errors),
        "error_count": sum(errors.values()),
    }


def swarm(
    port: int, connections: int, requests: int, interval: float, timeout: float, max_seconds: float
) -> dict[str, Any]:
    """Many concurrent keep-alive connections polling health (asyncio); a JSON-ready summary."""
    fd_limit = raise_fd_limit(connections + 256)
    cpu_started = time.process_time()
    result = asyncio.run(_swarm(port, connections, requests, interval, timeout, max_seconds))
    result["fd_limit"] = fd_limit
    result["client_cpu_s"] = time.process_time() - cpu_started
    return result


def client_process(arguments: list[str], timeout: float) -> dict[str, Any]:
    """Run ``python -m harness <arguments>`` in a process; its JSON summary (deadline: ``timeout``)."""
    completed = subprocess.run(
        CLIENT + arguments, capture_output=True, timeout=timeout, check=False, cwd=HERE
    )
    if completed.returncode != 0:
        raise RuntimeError(f"client {' '.join(arguments)} failed: {completed.stderr.decode()[-1500:]}")
    return orjson.loads(completed.stdout)


def start_client_process(arguments: list[str]) -> subprocess.Popen[bytes]:
    """Start ``python -m harness <arguments>``; collect it with :func:`finish_client_process`.

    In a session of its own: with Linux's autogroup scheduling (on by default) the CPU is shared between
    sessions first, and in the benchmark's session locust spends that share, so a probe there was slow to
    wake for its own answers (3-7 s of each 30 s round waiting for a CPU, bench_mixed.py). A load
    balancer's probe runs on another machine; here it at least competes as a process of its own.
    """
    return subprocess.Popen(
        CLIENT + arguments, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=HERE, start_new_session=True
    )


def finish_client_process(process: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """Wait (at most ``timeout`` s, then kill) for a client started by :func:`start_client_process`."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise RuntimeError(f"client process overran its {timeout:g} s deadline") from None
    if process.returncode != 0:
        raise RuntimeError(f"client process failed ({process.returncode}): {err.decode()[-1500:]}")
    return orjson.loads(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Client-process entry points (``poll-health``, ``swarm``) and ``dataset`` to make one ahead."""
    parser = argparse.ArgumentParser(description="Benchmark helpers run as separate client processes.")
    commands = parser.add_subparsers(dest="command", required=True)
    poll = commands.add_parser("poll-health", help="poll health on one keep-alive connection")
    poll.add_argument("--port", type=int, required=True)
    poll.add_argument("--duration", type=float, default=20.0)
    poll.add_argument("--interval", type=float, default=0.01)
    poll.add_argument("--timeout", type=float, default=5.0)
    many = commands.add_parser("swarm", help="many concurrent keep-alive connections polling health")
    many.add_argument("--port", type=int, required=True)
    many.add_argument("--connections", type=int, default=1000)
    many.add_argument("--requests", type=int, default=10, help="polls per connection")
    many.add_argument("--interval", type=float, default=1.0, help="seconds between polls of a connection")
    many.add_argument("--timeout", type=float, default=10.0)
    many.add_argument("--max-seconds", type=float, default=120.0)
    make = commands.add_parser("dataset", help="make (or find cached) named datasets")
    make.add_argument("names", nargs="+", choices=sorted(DATASETS))
    make.add_argument("--gib-bytes", type=parse_size, default=None)
    args = parser.parse_args(argv)
    if args.command == "poll-health":
        result = poll_health(args.port, args.duration, args.interval, args.timeout)
    elif args.command == "swarm":
        result = swarm(
            args.port, args.connections, args.requests, args.interval, args.timeout, args.max_seconds
        )
    else:
        for name in args.names:
            dataset = ensure_dataset(name, gib_bytes=args.gib_bytes)
            print(f"{name}: {dataset.path} {dataset.size} bytes, {dataset.events} events")
        return 0
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
