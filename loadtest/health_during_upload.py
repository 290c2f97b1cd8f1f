"""Health latency while large uploads arrive: does the receive path hold the event loop?

    uv run --group loadtest python loadtest/health_during_upload.py                    # 3 x 1 GiB
    uv run --group loadtest python loadtest/health_during_upload.py --base-src /tmp/main/src   # another build

Starts the server (from ``--base-src`` on PYTHONPATH when given), then a thread GETs ``/api/v1/health``
every 5 ms on one keep-alive connection while ``--rounds`` uploads of a stored ZIP (``bench_upload.py``'s)
arrive one after the other, and prints the probes' p50, p99, max and the slowest few. All on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import harness
from bench_upload import make_upload

PROBE_GAP_S = 0.005


def probe(port: int, stop: threading.Event, latencies: list[float]) -> None:
    """GET health on one connection until ``stop``; each request's time into ``latencies``."""
    conn = http.client.HTTPConnection(harness.HOST, port, timeout=30)
    try:
        while not stop.is_set():
            started = time.perf_counter()
            conn.request("GET", "/api/v1/health")
            conn.getresponse().read()
            latencies.append(time.perf_counter() - started)
            time.sleep(PROBE_GAP_S)
    finally:
        conn.close()


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="health-during-upload-") as work_text:
        work = Path(work_text)
        data = work / "upload.zip"
        make_upload(data, args.size)
        (work / "tmp").mkdir()
        command = harness.server_command("ours", work / "tmp", extra=["--max-upload-bytes", "4G"])
        env = {**os.environ, "PYTHONPATH": args.base_src} if args.base_src else None
        print(f"health_during_upload: load average {harness.load_average()}", flush=True)
        server = harness.start_server("server", command, env=env)
        latencies: list[float] = []
        stop = threading.Event()
        prober = threading.Thread(target=probe, args=(server.port, stop, latencies), daemon=True)
        try:
            harness.upload(server.port, data, timeout=300)  # warm-up, not probed
            prober.start()
            for _ in range(args.rounds):
                harness.warm_page_cache(data)
                time.sleep(0.5)
                harness.upload(server.port, data, timeout=300)
            time.sleep(0.5)
        finally:
            stop.set()
            if prober.is_alive():
                prober.join(30)
            harness.stop_server(server)
    latencies.sort()
    count = len(latencies)
    if not count:
        print("no probe answered")
        return 2
    slowest = [round(1000 * value) for value in latencies[-6:]]
    print(
        f"{count} probes: p50 {1000 * latencies[count // 2]:.1f} ms, p99 "
        f"{1000 * latencies[int(count * 0.99)]:.1f} ms, max {1000 * latencies[-1]:.1f} ms; slowest (ms) "
        f"{slowest}; load average after {harness.load_average()}"
    )
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=harness.parse_size, default=harness.parse_size("1G"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--base-src", default=None, metavar="DIR", help="run the server from DIR (PYTHONPATH)"
    )
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
