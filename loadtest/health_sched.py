"""Where a slow health poll's time goes: the event loop waiting for a CPU, or not running at all.

    uv run --group loadtest python loadtest/health_sched.py                 # 2 uploaders of large.zip, 20 s
    uv run --group loadtest python loadtest/health_sched.py --uploaders 0   # the idle server

Starts upload-server on default settings, has ``--uploaders`` curl processes post a dataset back to back
(the workers busy, as in ``bench_compare.py --only health``), and polls ``/api/v1/health`` every
``--interval`` s on one keep-alive connection. Around each poll it reads the event loop thread's
``/proc/<pid>/task/<pid>/schedstat`` (time on a CPU; time runnable but waiting for one) and its voluntary
and involuntary context switches, and prints those for the polls over 5 ms against the others: a slow poll
whose loop waited for a CPU is the scheduler's doing (another task held the core), one whose loop neither
ran nor waited was off its CPU by choice (I/O, a lock). All traffic on 127.0.0.1; bounded in time.
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import harness

REQUEST = b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
SLOW_MS = 5.0


def loop_counters(pid: int) -> tuple[float, float, int, int]:
    """The main thread's CPU ms, ms runnable but waiting, voluntary and involuntary switches."""
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        ran, waited, _ = map(int, f.read().split())
    status = Path(f"/proc/{pid}/task/{pid}/status").read_text()
    voluntary = int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    involuntary = int(re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    return ran / 1e6, waited / 1e6, voluntary, involuntary


def poll(client: socket.socket) -> None:
    client.sendall(REQUEST)
    harness.read_response(client)


def upload_loop(port: int, dataset: Path, until: float, done: list[str]) -> None:
    url = f"http://{harness.HOST}:{port}/api/v1/upload"
    while time.monotonic() < until:
        command = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--data-binary", f"@{dataset}"]
        answer = subprocess.run([*command, "-H", "Content-Type: application/zip", url], capture_output=True)
        done.append(answer.stdout.decode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploaders", type=int, default=2)
    parser.add_argument("--dataset", default="large", choices=sorted(harness.DATASETS))
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=0.01)
    args = parser.parse_args()
    dataset = harness.ensure_dataset(args.dataset).path
    with (
        tempfile.TemporaryDirectory() as tmp,
        harness.running_server("ours", harness.server_command("ours", tmp)) as server,
    ):
        pid, done = server.process.pid, []
        until = time.monotonic() + args.seconds + 2
        uploaders = [
            threading.Thread(target=upload_loop, args=(server.port, dataset, until, done))
            for _ in range(args.uploaders)
        ]
        for uploader in uploaders:
            uploader.start()
        time.sleep(2 if args.uploaders else 0)  # the workers busy before the first poll
        rows: list[tuple[float, float, float, int, int]] = []
        with socket.create_connection((harness.HOST, server.port)) as client:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                before = loop_counters(pid)
                started = time.perf_counter()
                poll(client)
                ms = (time.perf_counter() - started) * 1000
                after = loop_counters(pid)
                rows.append((ms, *(a - b for a, b in zip(after, before, strict=True))))  # type: ignore[arg-type]
                time.sleep(args.interval)
        for uploader in uploaders:
            uploader.join()
    report(rows, done)


def report(rows: list[tuple[float, float, float, int, int]], done: list[str]) -> None:
    latencies = sorted(row[0] for row in rows)

    def at(share: float) -> float:
        return latencies[int(share * (len(latencies) - 1))]

    print(
        f"polls {len(rows)}: p50 {at(0.5):.2f} ms, p95 {at(0.95):.2f}, p99 {at(0.99):.2f}, "
        f"max {latencies[-1]:.2f}; "
        f"uploads answered {len(done)} ({sum(code == '200' for code in done)} with 200)"
    )
    slow = [row for row in rows if row[0] > SLOW_MS]
    fast = [row for row in rows if row[0] <= SLOW_MS]
    print(f"polls over {SLOW_MS:g} ms: {len(slow)}")
    names = (
        "the loop's CPU ms",
        "the loop's wait for a CPU, ms",
        "voluntary switches",
        "involuntary switches",
    )
    for index, name in enumerate(names, start=1):
        if slow:
            print(
                f"  {name}: slow polls median {statistics.median(r[index] for r in slow):.2f}, "
                f"the others {statistics.median(r[index] for r in fast):.2f}"
            )


if __name__ == "__main__":
    main()
