"""Receive benchmark: one large upload to upload-server and to a minimal raw-socket sink, in one run.

    uv run python loadtest/bench_upload.py                      # 1 GiB, 3 rounds each, raw socket client
    uv run python loadtest/bench_upload.py --size 128M --rounds 2
    uv run python loadtest/bench_upload.py --client curl --body multipart
    uv run python loadtest/bench_upload.py --targets server --py-spy /tmp/server.svg   # profile the server

What it does, all on 127.0.0.1 and every step under a deadline:

1. Makes the upload once, in a temporary directory: a real ZIP archive (stored, no compression) holding a
   small ``events.ndjson`` of GitHub-Archive-like events and one big ``padding.bin`` of random bytes. The
   server's sniffer takes it (``PK\\x03\\x04``), and once ingest lands the archive is still cheap to
   *process* (the ``.bin`` entry is listed as ignored from the central directory, the JSON entry is tiny),
   so end-to-end time stays a measure of *receiving*, which is what the sink can be compared on.
2. Starts ``python -m upload_server --port 0`` and ``loadtest/sink.py --port 0`` as subprocesses and reads
   their ports from their ``listening on`` lines.
3. Sends one small warm-up upload to each, then ``--rounds`` timed uploads to each, alternating (the order
   flips every round so neither side always runs on a warmer machine). The client is a raw socket that
   sends the head with ``sendall`` and the file with ``socket.sendfile`` (zero-copy from the page cache),
   so it spends almost no CPU; ``--client curl`` uses ``curl -T`` instead.
4. During every upload a thread samples ``VmRSS`` of the target process and, separately, of all its
   descendants (worker processes) every ``--sample-ms`` (20 ms); it also records CPU seconds per GiB of
   the main thread, the other threads and the workers, the process's minor page faults, and how busy
   *other* processes kept the machine. CPU s/GiB barely moves with noise, MB/s moves a lot: compare
   server changes on the former. ``--sink-sha256`` makes the sink hash too, to price the receipt's sha256.
5. Prints, per side, the medians of: end-to-end MB/s (client clock: connect to last answer byte) and
   receive-phase MB/s (``timing_ms.receive`` from the answer, which both sides measure from the end of the
   request head to the last byte written to the temp file); their ratios; the peak RSS; then PASS/FAIL for
   the targets of issue 2: server >= 0.5 x sink MB/s, server RSS <= 64 MiB during the upload.

MB is 10^6 bytes. Exit status: 0 when every target passes, 1 when one is missed, 2 when the run failed.
The other engineers' tests share the same 2 cores, so the script also prints the load average before
and after, and each upload's CPU use, to tell a slow run from a noisy one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
UPLOAD_PATH = "/api/v1/upload"
LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
MB = 1_000_000
MIB = 1 << 20
THROUGHPUT_TARGET = 0.5  # server MB/s >= this x sink MB/s
RSS_TARGET_BYTES = 64 * MIB
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_CACHE_CHUNK = 8 * MIB


# ----------------------------------------------------------------------------------------- helpers
def parse_size(text: str) -> int:
    """``1073741824``, ``128M``, ``1G``, ``1GiB`` → bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 128M, 1G)")
    number, unit = match.groups()
    return int(float(number) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit.lower()])


def human_bytes(count: float) -> str:
    return f"{count / MIB:.1f} MiB"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


# ------------------------------------------------------------------------------------ the upload
def _events_ndjson(count: int, seed: int) -> bytes:
    """A few GitHub-Archive-like events, so the archive is a real upload for the ingest stage too."""
    rng = random.Random(seed)
    types = ["PushEvent", "CreateEvent", "WatchEvent", "PullRequestEvent", "IssueCommentEvent"]
    lines = []
    for number in range(count):
        actor_id = rng.randrange(1, 5000)
        login = f"user{actor_id}"
        event = {
            "id": str(30_000_000_000 + number),
            "type": rng.choice(types),
            "actor": {
                "id": actor_id,
                "login": login,
                "display_login": login,
                "gravatar_id": "",
                "url": f"https://api.github.com/users/{login}",
                "avatar_url": f"https://avatars.githubusercontent.com/u/{actor_id}?",
            },
            "repo": {"id": 1000 + number, "name": f"{login}/repo{number}", "url": "https://api.github.com"},
            "payload": {},
            "public": True,
            "created_at": "2024-01-01T00:00:00Z",
        }
        lines.append(json.dumps(event, separators=(",", ":")))
    return ("\n".join(lines) + "\n").encode()


def make_upload(path: Path, size: int, seed: int = 1) -> int:
    """Write a stored ZIP of about ``size`` bytes (events.ndjson + padding.bin); return its exact size."""
    events = _events_ndjson(100, seed)
    padding = max(0, size - len(events) - 400)  # 400 ≈ two local headers + central directory + end record
    pool = random.Random(seed).randbytes(16 * MIB)  # random, so nothing along the way can compress it
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("events.ndjson", events)
        info = zipfile.ZipInfo("padding.bin", date_time=(2024, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        with archive.open(info, "w", force_zip64=padding >= 0xFFFFFFFF) as entry:
            left = padding
            while left:
                piece = min(left, len(pool))
                entry.write(pool[:piece])
                left -= piece
    return path.stat().st_size


def warm_page_cache(path: Path) -> float:
    """Read the file once so that sendfile serves it from memory; return seconds taken."""
    started = time.perf_counter()
    buffer = bytearray(PAGE_CACHE_CHUNK)
    with open(path, "rb", buffering=0) as source:
        while source.readinto(buffer):
            pass
    return time.perf_counter() - started


# ------------------------------------------------------------------------------- process sampling
def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (any of its threads may have started them)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as listing:
                found.extend(int(child) for child in listing.read().split())
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (workers, a forkserver and its children)."""
    out, todo = [], _children(pid)
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(_children(child))
    return out


def status_kib(pid: int, field_name: str = "VmRSS") -> int:
    """A ``kB`` field of /proc/<pid>/status in KiB; 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of ``pid``."""
    out: dict[int, float] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                out[int(tid)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def process_cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return 0.0


def minor_faults(pid: int) -> int:
    """Minor page faults of ``pid`` so far (each one a fresh page the allocator got from the kernel)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[7])
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class Sample:
    """Peaks and CPU use of one process tree over one upload."""

    main_peak_kib: int = 0
    children_peak_kib: int = 0
    total_peak_kib: int = 0
    children_seen: int = 0
    samples: int = 0
    main_thread_cpu_s: float = 0.0
    other_threads_cpu_s: float = 0.0
    children_cpu_s: float = 0.0
    machine_cpu_s: float = 0.0  # every process on the machine, the client and the target included
    minor_faults: int = 0  # of the target process (not its workers)


class Sampler:
    """Samples VmRSS of ``pid`` and of its descendants every ``interval`` seconds, in a thread."""

    def __init__(self, pid: int, interval: float) -> None:
        self.pid = pid
        self.interval = interval
        self.result = Sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._threads_start: dict[int, float] = {}
        self._threads_last: dict[int, float] = {}
        self._children_cpu_start: dict[int, float] = {}
        self._children_cpu_last: dict[int, float] = {}
        self._machine_start = 0.0
        self._faults_start = 0

    def __enter__(self) -> Sampler:
        self._machine_start = machine_busy_seconds()
        self._faults_start = minor_faults(self.pid)
        self._threads_start = thread_cpu_seconds(self.pid)
        self._threads_last = dict(self._threads_start)
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()
        self.result.machine_cpu_s = machine_busy_seconds() - self._machine_start
        self.result.minor_faults = minor_faults(self.pid) - self._faults_start
        main = self._threads_last.get(self.pid, 0.0) - self._threads_start.get(self.pid, 0.0)
        others = sum(
            cpu - self._threads_start.get(tid, 0.0)
            for tid, cpu in self._threads_last.items()
            if tid != self.pid
        )
        children = sum(
            cpu - self._children_cpu_start.get(pid, 0.0) for pid, cpu in self._children_cpu_last.items()
        )
        self.result.main_thread_cpu_s = main
        self.result.other_threads_cpu_s = others
        self.result.children_cpu_s = children

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        result = self.result
        main = status_kib(self.pid)
        kids = descendants(self.pid)
        kids_kib = sum(status_kib(kid) for kid in kids)
        result.samples += 1
        result.main_peak_kib = max(result.main_peak_kib, main)
        result.children_peak_kib = max(result.children_peak_kib, kids_kib)
        result.total_peak_kib = max(result.total_peak_kib, main + kids_kib)
        result.children_seen = max(result.children_seen, len(kids))
        # Threads and workers may come and go: keep the last CPU figure seen for each.
        self._threads_last.update(thread_cpu_seconds(self.pid))
        for kid in kids:
            cpu = process_cpu_seconds(kid)
            self._children_cpu_start.setdefault(kid, cpu)
            self._children_cpu_last[kid] = cpu


# -------------------------------------------------------------------------------- the two targets
@dataclass
class Target:
    """A server under test, running as a subprocess; its stderr is drained into a bounded tail."""

    name: str
    process: subprocess.Popen[bytes]
    port: int = 0
    log_tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))

    @property
    def pid(self) -> int:
        return self.process.pid


def start_target(name: str, command: list[str], env: dict[str, str] | None = None) -> Target:
    """Start ``command``, wait for its ``listening on http://127.0.0.1:PORT`` line, keep draining stderr."""
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    target = Target(name, process)
    ready = threading.Event()

    def drain() -> None:
        assert process.stderr is not None
        for raw in process.stderr:  # keep reading: a full pipe would stall the server's logging
            line = raw.decode("utf-8", "replace").rstrip()
            target.log_tail.append(line)
            match = LISTENING.search(line)
            if match and not ready.is_set():
                target.port = int(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=drain, name=f"{name}-stderr", daemon=True).start()
    if not ready.wait(START_TIMEOUT) or not target.port:
        stop_target(target)
        tail = "\n".join(target.log_tail)
        raise RuntimeError(f"{name} did not start within {START_TIMEOUT:g} s:\n{tail}")
    return target


def stop_target(target: Target) -> None:
    """SIGTERM, then SIGKILL if it does not stop within STOP_TIMEOUT."""
    if target.process.poll() is None:
        target.process.send_signal(signal.SIGTERM)
        try:
            target.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            target.process.kill()
            target.process.wait(5)


# ---------------------------------------------------------------------------------------- clients
@dataclass
class Exchange:
    """What one upload took and got back."""

    status: int
    body: bytes
    wall_s: float
    sent_s: float  # until the client's last send returned (bytes in the kernel, not yet read by the peer)
    client_cpu_s: float


def _body_framing(body_kind: str) -> tuple[str, bytes, bytes]:
    """Content-Type, bytes before the file, bytes after it."""
    if body_kind == "raw":
        return "application/zip", b"", b""
    boundary = "bench" + os.urandom(8).hex()
    before = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="bench.zip"\r\n'
        "Content-Type: application/zip\r\n\r\n"
    ).encode()
    after = f"\r\n--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", before, after


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of the final answer (interim ``1xx`` answers are skipped)."""
    data = bytearray()
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed before the answer's head: {bytes(data[:200])!r}")
            data += chunk
            continue
        lines = data[:end].decode("latin-1").split("\r\n")
        del data[: end + 4]
        status = int(lines[0].split(" ", 2)[1])
        if status >= 200:
            break
    headers = {
        name.strip().lower(): value.strip() for name, _, value in (ln.partition(":") for ln in lines[1:])
    }
    length = int(headers.get("content-length", "0"))
    while len(data) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return status, bytes(data[:length])


def socket_upload(port: int, path: Path, body_kind: str, timeout: float) -> Exchange:
    """POST the file over a raw socket: head with ``sendall``, file with zero-copy ``sendfile``."""
    size = path.stat().st_size
    content_type, before, after = _body_framing(body_kind)
    head = (
        f"POST {UPLOAD_PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(before) + size + len(after)}\r\nConnection: close\r\n\r\n"
    ).encode()
    cpu_started = time.thread_time()
    started = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=timeout) as sock, open(path, "rb") as source:
        sent_s = float("nan")
        try:
            sock.sendall(head + before)
            sock.sendfile(source)
            if after:
                sock.sendall(after)
            sent_s = time.perf_counter() - started
        except (BrokenPipeError, ConnectionResetError):
            pass  # the peer answered early (an error) and closed: read what it said
        status, body = _read_response(sock)
    wall_s = time.perf_counter() - started
    return Exchange(status, body, wall_s, sent_s, time.thread_time() - cpu_started)


def curl_upload(port: int, path: Path, body_kind: str, timeout: float) -> Exchange:
    """POST the file with curl (``-T`` streams it from disk; ``-F`` for multipart)."""
    curl = shutil.which("curl")
    if curl is None:
        raise RuntimeError("--client curl needs curl on PATH")
    command = [curl, "-sS", "--max-time", str(int(timeout)), "-H", "Expect:", "-o", "-"]
    command += ["-w", "\n%{http_code}"]
    if body_kind == "raw":
        command += ["-X", "POST", "-T", str(path), "-H", "Content-Type: application/zip"]
    else:
        command += ["-F", f"file=@{path};type=application/zip"]
    command.append(f"http://{HOST}:{port}{UPLOAD_PATH}")
    before = os.times()
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, timeout=timeout + 10, check=False)
    wall_s = time.perf_counter() - started
    after = os.times()
    cpu_s = after.children_user + after.children_system - before.children_user - before.children_system
    body, _, status = completed.stdout.rpartition(b"\n")
    if completed.returncode != 0 or not status.strip().isdigit():
        raise RuntimeError(f"curl failed ({completed.returncode}): {completed.stderr.decode().strip()}")
    return Exchange(int(status), body, wall_s, float("nan"), cpu_s)


# ---------------------------------------------------------------------------------------- the run
@dataclass
class Result:
    target: str
    round: int
    size: int
    exchange: Exchange
    sample: Sample
    receive_ms: float

    @property
    def wall_mb_s(self) -> float:
        return self.size / MB / self.exchange.wall_s

    @property
    def receive_mb_s(self) -> float:
        return self.size / MB / (self.receive_ms / 1000) if self.receive_ms > 0 else float("nan")

    @property
    def others_cpu_share(self) -> float:
        """Share of all cores that processes other than the target and the client kept busy (noise)."""
        others = self.sample.machine_cpu_s - self.cpu_s - self.exchange.client_cpu_s
        return max(0.0, others) / (self.exchange.wall_s * (os.cpu_count() or 1))

    @property
    def cpu_s(self) -> float:
        sample = self.sample
        return sample.main_thread_cpu_s + sample.other_threads_cpu_s + sample.children_cpu_s


def upload_once(args: argparse.Namespace, target: Target, path: Path, round_no: int) -> Result:
    upload = curl_upload if args.client == "curl" else socket_upload
    with Sampler(target.pid, args.sample_ms / 1000) as sampler:
        exchange = upload(target.port, path, args.body, args.timeout)
    if exchange.status != 200:
        tail = "\n".join(list(target.log_tail)[-10:])
        raise RuntimeError(f"{target.name} answered {exchange.status}: {exchange.body[:500]!r}\n{tail}")
    answer = json.loads(exchange.body)
    size = int(answer.get("size_bytes", path.stat().st_size))
    receive_ms = float(answer.get("timing_ms", {}).get("receive", float("nan")))
    return Result(target.name, round_no, size, exchange, sampler.result, receive_ms)


def print_result(result: Result) -> None:
    """Two lines per upload: speed, then memory, CPU and the machine's noise."""
    sample, exchange = result.sample, result.exchange
    gib = result.size / (1 << 30)
    sent = "n/a" if exchange.sent_s != exchange.sent_s else f"{exchange.sent_s:.2f} s"  # NaN for curl
    print(
        f"  {result.target:<6} round {result.round}: {result.wall_mb_s:7.1f} MB/s end-to-end "
        f"({exchange.wall_s:.2f} s; client done sending at {sent}, client CPU "
        f"{exchange.client_cpu_s:.2f} s) | receive phase {result.receive_mb_s:7.1f} MB/s "
        f"({result.receive_ms / 1000:.2f} s)\n"
        f"{'':16}peak RSS {sample.main_peak_kib / 1024:.1f} MiB, workers "
        f"{sample.children_peak_kib / 1024:.1f} MiB ({sample.children_seen} procs) | CPU s/GiB: main thread "
        f"{sample.main_thread_cpu_s / gib:.2f}, "
        f"other threads {sample.other_threads_cpu_s / gib:.2f}, workers {sample.children_cpu_s / gib:.2f} | "
        f"page faults/GiB {sample.minor_faults / gib:,.0f} | other processes kept "
        f"{result.others_cpu_share:.0%} of {os.cpu_count()} cores busy",
        flush=True,
    )


@contextlib.contextmanager
def py_spy(pid: int, output: str | None, duration: float) -> Iterator[None]:
    """Record the server with py-spy (on-CPU samples of every thread) while the block runs."""
    if not output:
        yield
        return
    command = ["py-spy"] if shutil.which("py-spy") else ["uv", "tool", "run", "py-spy"]
    command += ["record", "--pid", str(pid), "--rate", "200", "--threads", "-o", output]
    command += ["--duration", str(int(duration))]
    if output.endswith(".txt"):
        command += ["--format", "raw"]
    recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(2.0)  # let py-spy attach before the first byte
    try:
        yield
    finally:
        recorder.send_signal(signal.SIGINT)
        try:
            _, errors = recorder.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            recorder.kill()
            _, errors = recorder.communicate()
        written = Path(output).exists()
        note = "written to" if written else f"FAILED ({errors.decode().strip()[-300:]}), nothing at"
        print(f"  py-spy profile {note} {output}", flush=True)


def build_commands(args: argparse.Namespace, work: Path) -> dict[str, list[str]]:
    server_tmp, sink_tmp = work / "server-tmp", work / "sink-tmp"
    server_tmp.mkdir()
    sink_tmp.mkdir()
    server = [sys.executable, "-m", "upload_server", "--port", "0", "--tmp-dir", str(server_tmp)]
    server += ["--max-upload-bytes", "4G", *args.server_arg]
    sink = [sys.executable, str(HERE / "sink.py"), "--port", "0", "--tmp-dir", str(sink_tmp)]
    sink += ["--lifetime", str(int(args.rounds * 2 * args.timeout + 600))]
    if args.sink_sha256:
        sink.append("--sha256")
    sink += args.sink_arg
    return {"server": server, "sink": sink}


def summarise(results: list[Result], server_hwm_kib: int) -> bool:
    """Print medians, ratios and the targets; return whether every target passed."""
    by_target: dict[str, list[Result]] = {}
    for result in results:
        by_target.setdefault(result.target, []).append(result)
    print("\nmedians (MB = 10^6 bytes)")
    medians: dict[str, tuple[float, float]] = {}
    for name, rows in by_target.items():
        wall = median([row.wall_mb_s for row in rows])
        receive = median([row.receive_mb_s for row in rows])
        medians[name] = (wall, receive)
        peak = max(row.sample.main_peak_kib for row in rows) * 1024
        workers = max(row.sample.children_peak_kib for row in rows) * 1024
        cpu = median([row.cpu_s / row.exchange.wall_s for row in rows])
        print(
            f"  {name:<6} end-to-end {wall:7.1f} MB/s   receive phase {receive:7.1f} MB/s   "
            f"peak RSS {human_bytes(peak)} (workers {human_bytes(workers)})   CPU {cpu:.0%} of a core "
            f"over {len(rows)} upload(s)"
        )
    if "server" not in medians:
        return True
    passed = True
    server_rows = by_target["server"]
    server_peak = max(row.sample.main_peak_kib for row in server_rows) * 1024
    if "sink" in medians:
        (server_wall, server_rx), (sink_wall, sink_rx) = medians["server"], medians["sink"]
        wall_ratio, rx_ratio = server_wall / sink_wall, server_rx / sink_rx
        print(f"  ratio server/sink: end-to-end {wall_ratio:.2f}, receive phase {rx_ratio:.2f}")
        ok = wall_ratio >= THROUGHPUT_TARGET
        passed &= ok
        print(
            f"\n{'PASS' if ok else 'FAIL'}  throughput: server {server_wall:.1f} MB/s end-to-end >= "
            f"{THROUGHPUT_TARGET} x sink {sink_wall:.1f} MB/s = {THROUGHPUT_TARGET * sink_wall:.1f} MB/s "
            f"(ratio {wall_ratio:.2f}; receive phase ratio {rx_ratio:.2f})"
        )
    ok = server_peak <= RSS_TARGET_BYTES
    passed &= ok
    workers_peak = max(row.sample.children_peak_kib for row in server_rows) * 1024
    print(
        f"{'PASS' if ok else 'FAIL'}  memory: server peak RSS {human_bytes(server_peak)} sampled during the "
        f"uploads <= {human_bytes(RSS_TARGET_BYTES)} (lifetime VmHWM {human_bytes(server_hwm_kib * 1024)}; "
        f"worker processes separately: {human_bytes(workers_peak)})"
    )
    return passed


def run(args: argparse.Namespace) -> int:
    size_note = human_bytes(args.size)
    print(
        f"bench_upload: {size_note} x {args.rounds} round(s), client={args.client}, body={args.body}, "
        f"targets={','.join(args.targets)}; load average {load_average()}; "
        f"MemAvailable {human_bytes(mem_available_bytes())}; {os.cpu_count()} CPUs",
        flush=True,
    )
    if mem_available_bytes() < 3 * args.size:
        print(
            "  warning: less than 3 x the upload size is available as memory; the file may be read back "
            "from disk (page cache evicted), which slows both sides alike and pulls the ratio towards 1",
            flush=True,
        )
    with tempfile.TemporaryDirectory(prefix="bench-upload-", dir=args.work_dir) as work_text:
        work = Path(work_text)
        started = time.perf_counter()
        data = work / "upload.zip"
        actual = make_upload(data, args.size)
        warm = work / "warmup.zip"
        make_upload(warm, 8 * MIB, seed=2)
        print(f"  made {data.name}: {actual} bytes in {time.perf_counter() - started:.1f} s", flush=True)
        commands = build_commands(args, work)
        targets: dict[str, Target] = {}
        results: list[Result] = []
        server_hwm_kib = 0
        try:
            for name in args.targets:
                targets[name] = start_target(name, commands[name])
                print(f"  {name}: pid {targets[name].pid}, port {targets[name].port}", flush=True)
            for target in targets.values():
                upload_once(args, target, warm, 0)  # warm-up: imports, thread cache, first allocations
            duration = args.rounds * args.timeout
            spy_pid = targets["server"].pid if "server" in targets else 0
            with py_spy(spy_pid, args.py_spy, duration):
                for round_no in range(1, args.rounds + 1):
                    order = list(targets.values())
                    if round_no % 2 == 0:
                        order.reverse()
                    for target in order:
                        warm_page_cache(data)
                        time.sleep(args.pause)
                        result = upload_once(args, target, data, round_no)
                        results.append(result)
                        print_result(result)
            if "server" in targets:
                server_hwm_kib = status_kib(targets["server"].pid, "VmHWM")
        finally:
            for target in targets.values():
                stop_target(target)
        leftovers = [p.name for d in ("server-tmp", "sink-tmp") for p in (work / d).iterdir()]
        if leftovers:
            print(f"  warning: files left in the temp dirs: {leftovers}")
    print(f"  load average after: {load_average()}")
    return 0 if summarise(results, server_hwm_kib) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Upload a large file to upload-server and to a raw-socket sink; compare MB/s and RSS.",
    )
    parser.add_argument("--size", type=parse_size, default=parse_size("1G"), help="upload size (1G)")
    parser.add_argument("--rounds", type=int, default=3, help="timed uploads per target (3)")
    parser.add_argument("--client", choices=["socket", "curl"], default="socket", help="client (socket)")
    parser.add_argument("--body", choices=["raw", "multipart"], default="raw", help="request body (raw)")
    parser.add_argument(
        "--targets",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=["server", "sink"],
        help="comma-separated: server,sink (both)",
    )
    parser.add_argument("--work-dir", default=None, help="where the temp dir goes (system temp dir)")
    parser.add_argument("--sample-ms", type=float, default=20.0, help="RSS sampling interval (20 ms)")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds of rest before each upload (1)")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline of one upload in s (300)")
    parser.add_argument("--sink-sha256", action="store_true", help="let the sink hash too (prices sha256)")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra server flag (repeatable), e.g. --server-arg=--workers=1",
    )
    parser.add_argument(
        "--sink-arg",
        action="append",
        default=[],
        help="extra sink flag (repeatable), e.g. --sink-arg=--buffer=4M",
    )
    parser.add_argument("--py-spy", default=None, metavar="OUT", help="record the server with py-spy to OUT")
    args = parser.parse_args(argv)
    unknown = set(args.targets) - {"server", "sink"}
    if unknown or not args.targets:
        parser.error(f"--targets takes server and/or sink, not {sorted(unknown)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    try:
        return run(args)
    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as error:
        print(f"bench_upload: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
