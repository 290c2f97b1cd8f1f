"""A rolling restart behind HAProxy, under load, with zero failed requests as the target.

    uv run python loadtest/rolling_restart.py                  # ~40 s: 8 s phases, checks every 200 ms
    uv run python loadtest/rolling_restart.py --phase 0.5 --check-inter 100ms --drain-delay 1   # the test

Installs nothing: ``haproxy`` must be on PATH (Debian package ``haproxy``; ``.ci/run`` installs it). On
127.0.0.1 and free ports it runs HAProxy with ``deploy/haproxy.cfg`` (addresses and check timing given
through its environment variables) and two upload-server instances, then keeps up a mixed load through
HAProxy: uploads whose answers are checked against the dataset's expected counts, one slow upload at a time
(so that an upload is in flight when an instance is told to stop), and health polls on keep-alive
connections. Meanwhile: SIGTERM instance 1, wait for it to exit, start it again on its port, wait until
HAProxy has it UP; then the same for instance 2.

Prints every failed request by reason, and for each instance its exit code and how long HAProxy had it out
of rotation (from HAProxy's own stats); the last line is a JSON summary. Exit code 0 only with no failed
request, clean exits and no temporary file left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

import harness

HAPROXY_CONFIG = harness.ROOT / "deploy" / "haproxy.cfg"
INSTANCES = ("app1", "app2")
UP_TIMEOUT_S = 30.0
SLOW_UPLOAD_PIECES = 20


@dataclass
class Tally:
    """Requests by kind, answered well or failed (with why); shared by the load threads."""

    ok: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def success(self, kind: str) -> None:
        with self.lock:
            self.ok[kind] += 1

    def failure(self, kind: str, reason: str) -> None:
        with self.lock:
            self.failed[f"{kind}: {reason}"] += 1


@dataclass
class Outage:
    """What HAProxy's stats showed of one instance: when it went out of rotation and came back."""

    signalled_at: float = 0.0
    down_at: float | None = None
    up_at: float | None = None
    exit_code: int | None = None
    stop_s: float = 0.0

    def figures(self) -> dict[str, float | int | None]:
        def since(start: float | None, end: float | None) -> float | None:
            return None if start is None or end is None else round(end - start, 3)

        return {
            "exit_code": self.exit_code,
            "stop_s": round(self.stop_s, 3),
            "sigterm_to_out_s": since(self.signalled_at, self.down_at),
            "out_s": since(self.down_at, self.up_at),
        }

    def describe(self) -> str:
        if self.down_at is None or self.up_at is None:
            return f"never seen out of rotation (exit code {self.exit_code})"
        return (
            f"exit code {self.exit_code}, exited {self.stop_s:.2f} s after SIGTERM; HAProxy took it out "
            f"{self.down_at - self.signalled_at:.2f} s after SIGTERM and had it out for "
            f"{self.up_at - self.down_at:.2f} s"
        )


# ------------------------------------------------------------------------------------------ HAProxy
def haproxy_stats(stats_port: int) -> dict[str, str]:
    """Server name → status (UP, DOWN, "UP 1/2", ...) from HAProxy's CSV stats."""
    with urllib.request.urlopen(f"http://{harness.HOST}:{stats_port}/stats;csv", timeout=2) as answer:
        text = answer.read().decode().lstrip("# ")
    return {
        row["svname"]: row["status"]
        for row in csv.DictReader(io.StringIO(text))
        if row["pxname"] == "upload_servers" and row["svname"] in INSTANCES
    }


def wait_until_up(stats_port: int, names: tuple[str, ...], timeout: float = UP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            statuses = haproxy_stats(stats_port)
            if all(statuses.get(name) == "UP" for name in names):
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"HAProxy does not have {names} UP after {timeout:g} s")
        time.sleep(0.05)


def watch_rotation(stats_port: int, outages: dict[str, Outage], stop: threading.Event) -> None:
    """Record when HAProxy marks each signalled instance DOWN, and when UP again (polled every 20 ms)."""
    while not stop.wait(0.02):
        try:
            statuses = haproxy_stats(stats_port)
        except OSError:
            continue
        now = time.monotonic()
        for name, outage in outages.items():
            status = statuses.get(name, "")
            if outage.down_at is None and status.startswith(("DOWN", "MAINT")):
                outage.down_at = now
            elif outage.down_at is not None and outage.up_at is None and status == "UP":
                outage.up_at = now


@contextlib.contextmanager
def running_haproxy(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            ["haproxy", "-f", str(HAPROXY_CONFIG), "-db"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -------------------------------------------------------------------------------------------- load
def upload_loop(
    port: int, dataset: harness.Dataset, pause: float, tally: Tally, stop: threading.Event
) -> None:
    while not stop.wait(pause):
        try:
            exchange = harness.upload(port, dataset.path, content_type=dataset.content_type, timeout=60)
        except (OSError, ValueError) as error:
            tally.failure("upload", type(error).__name__)
            continue
        check_upload(exchange.status, exchange.body, dataset, tally, "upload")


def describe_answer(status: int, body: bytes) -> str:
    """``status 503 draining``, ``status 503 SERVER_BUSY``, or HAProxy's own page: short and countable."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return f"status {status} (not JSON: {body[:60]!r})"
    error = document.get("error") if isinstance(document, dict) else None
    what = error.get("code") if isinstance(error, dict) else document.get("status")
    return f"status {status} {what}"


def check_upload(status: int, body: bytes, dataset: harness.Dataset, tally: Tally, kind: str) -> None:
    if status != 200:
        tally.failure(kind, describe_answer(status, body))
        return
    problems = harness.verify_answer(orjson.loads(body), dataset)
    if problems:
        tally.failure(kind, "; ".join(problems))
    else:
        tally.success(kind)


def slow_upload_loop(
    port: int, dataset: harness.Dataset, seconds: float, tally: Tally, stop: threading.Event
) -> None:
    """Uploads that each take ``seconds`` to send, so that one is in flight whenever an instance stops."""
    data = dataset.path.read_bytes()
    piece = -(-len(data) // SLOW_UPLOAD_PIECES)
    head = (
        f"POST {harness.UPLOAD_PATH} HTTP/1.1\r\nHost: {harness.HOST}\r\nContent-Type: {dataset.content_type}"
        f"\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode()
    while not stop.is_set():
        try:
            with socket.create_connection((harness.HOST, port), timeout=60) as sock:
                sock.sendall(head)
                for start in range(0, len(data), piece):
                    sock.sendall(data[start : start + piece])
                    time.sleep(seconds / SLOW_UPLOAD_PIECES)
                status, _, body = harness.read_response(sock)
        except (OSError, ValueError) as error:
            tally.failure("slow upload", type(error).__name__)
            continue
        check_upload(status, body, dataset, tally, "slow upload")


def health_loop(port: int, interval: float, tally: Tally, stop: threading.Event) -> None:
    """Health polls on a keep-alive connection (reopened when the server or HAProxy closes it)."""
    sock = None
    while not stop.wait(interval):
        try:
            if sock is None:
                sock = socket.create_connection((harness.HOST, port), timeout=10)
            sock.sendall(harness.HEALTH_REQUEST)
            status, headers, body = harness.read_response(sock)
            if status == 200:
                tally.success("health")
            else:
                tally.failure("health", describe_answer(status, body))
            if headers.get("connection", "").lower() == "close":
                sock.close()
                sock = None
        except (OSError, ValueError) as error:
            tally.failure("health", type(error).__name__)
            if sock is not None:
                sock.close()
            sock = None
    if sock is not None:
        sock.close()


@contextlib.contextmanager
def load(args: argparse.Namespace, port: int, dataset: harness.Dataset, tally: Tally) -> Iterator[None]:
    stop = threading.Event()
    jobs: list[tuple[Callable[..., None], tuple[Any, ...]]] = [
        (upload_loop, (port, dataset, args.upload_pause, tally, stop)) for _ in range(args.uploaders)
    ]
    jobs.append((slow_upload_loop, (port, dataset, args.drain_delay + 1.0, tally, stop)))
    jobs += [(health_loop, (port, args.health_interval, tally, stop)) for _ in range(args.pollers)]
    threads = [threading.Thread(target=target, args=job_args, daemon=True) for target, job_args in jobs]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=90)


# ------------------------------------------------------------------------------------------- the run
def restart(
    server: harness.Server, command: list[str], outage: Outage, stats_port: int, log_path: Path
) -> harness.Server:
    """SIGTERM ``server``, wait for its exit, start it again on its port, wait until HAProxy has it UP."""
    outage.signalled_at = time.monotonic()
    outage.exit_code = harness.stop_server(server)
    outage.stop_s = time.monotonic() - outage.signalled_at
    replacement = harness.start_server(server.name, command, log_path=log_path)
    wait_until_up(stats_port, (server.name,))
    return replacement


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    dataset = harness.ensure_dataset(args.dataset)
    front, stats = harness.free_port(), harness.free_port()
    ports = {name: harness.free_port() for name in INSTANCES}
    commands = {name: instance_command(args, work / name, ports[name]) for name in INSTANCES}
    env = {
        **os.environ,
        "HAPROXY_BIND": f"{harness.HOST}:{front}",
        "HAPROXY_STATS": f"{harness.HOST}:{stats}",
        "CHECK_INTER": args.check_inter,
        "RETRIES": str(args.retries),
        **{name.upper(): f"{harness.HOST}:{ports[name]}" for name in INSTANCES},
    }
    servers = {
        name: harness.start_server(name, commands[name], log_path=work / f"{name}.log") for name in INSTANCES
    }
    tally, outages = Tally(), {name: Outage() for name in INSTANCES}
    watch_stop = threading.Event()
    try:
        with running_haproxy(env, work / "haproxy.log"):
            wait_until_up(stats, INSTANCES)
            watcher = threading.Thread(target=watch_rotation, args=(stats, outages, watch_stop), daemon=True)
            watcher.start()
            with load(args, front, dataset, tally):
                for name in INSTANCES:
                    time.sleep(args.phase)
                    print(f"  SIGTERM {name} (pid {servers[name].pid})", flush=True)
                    log_path = work / f"{name}-restarted.log"
                    servers[name] = restart(servers[name], commands[name], outages[name], stats, log_path)
                    print(
                        f"  {name} is back (pid {servers[name].pid}): {outages[name].describe()}", flush=True
                    )
                time.sleep(args.phase)
            watch_stop.set()
            watcher.join(5)
    finally:
        watch_stop.set()
        for server in servers.values():
            harness.stop_server(server)
    # Files only: an instance keeps an empty resumable/ folder of its own.
    leftovers = sorted(str(path) for name in INSTANCES for path in (work / name).rglob("*") if path.is_file())
    return summarise(tally, outages, leftovers)


def instance_command(args: argparse.Namespace, tmp_dir: Path, port: int) -> list[str]:
    tmp_dir.mkdir(parents=True, exist_ok=True)
    extra = ["--drain-delay", str(args.drain_delay), "--processes", str(args.processes)]
    return harness.server_command("ours", tmp_dir, workers=args.workers, extra=extra, port=port)


def summarise(tally: Tally, outages: dict[str, Outage], leftovers: list[str]) -> dict[str, Any]:
    failed = sum(tally.failed.values())
    clean = all(outage.exit_code == 0 and outage.up_at is not None for outage in outages.values())
    return {
        "ok": dict(tally.ok),
        "failures": dict(tally.failed),
        "failed": failed,
        "instances": {
            name: {
                "exit_code": outage.exit_code,
                "stop_s": round(outage.stop_s, 3),
                "sigterm_to_out_s": None
                if outage.down_at is None
                else round(outage.down_at - outage.signalled_at, 3),
                "out_s": None
                if outage.down_at is None or outage.up_at is None
                else round(outage.up_at - outage.down_at, 3),
            }
            for name, outage in outages.items()
        },
        "leftover_files": leftovers,
        "passed": failed == 0 and clean and not leftovers,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--phase", type=float, default=8.0, help="seconds of load before, between, after")
    parser.add_argument("--drain-delay", type=float, default=1.0, help="the instances' --drain-delay")
    parser.add_argument("--check-inter", default="200ms", help="HAProxy's health-check interval")
    parser.add_argument(
        "--retries", type=int, default=3, help="HAProxy's retries (0: see what the drain alone does)"
    )
    parser.add_argument("--processes", type=int, default=1, help="each instance's --processes")
    parser.add_argument("--workers", type=int, default=1, help="each serving process's --workers")
    parser.add_argument("--uploaders", type=int, default=2, help="threads uploading one upload after another")
    parser.add_argument(
        "--upload-pause", type=float, default=0.0, help="seconds an uploader rests between its uploads"
    )
    parser.add_argument("--pollers", type=int, default=2, help="threads polling health")
    parser.add_argument("--health-interval", type=float, default=0.02)
    parser.add_argument("--dataset", default="small", choices=sorted(harness.DATASETS))
    parser.add_argument("--max-seconds", type=float, default=300.0, help="the whole run's bound")
    args = parser.parse_args(argv)
    if shutil.which("haproxy") is None:
        print("rolling_restart.py: haproxy is not on PATH (apt-get install haproxy)", file=sys.stderr)
        return 2
    harness.install_run_guards(args.max_seconds)
    with tempfile.TemporaryDirectory(prefix="rolling-restart-") as work:
        summary = run(args, Path(work))
    print(f"  requests answered well: {summary['ok']}")
    print(f"  failed requests: {summary['failed']}")
    for reason, count in summary["failures"].items():
        print(f"    {count:5d}  {reason}")
    for name, figures in summary["instances"].items():
        print(f"  {name}: {figures}")
    if summary["leftover_files"]:
        print(f"  temporary files left behind: {summary['leftover_files']}")
    print(orjson.dumps(summary).decode(), flush=True)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
