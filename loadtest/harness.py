"""What the benchmarks share: servers as subprocesses, process-tree sampling, datasets, a raw-socket client.

Imported by ``bench_upload.py``, ``bench_ingest.py``, ``bench_compare.py`` and ``run_locust.py`` (they run
as scripts from ``loadtest/``, so ``import harness`` finds this file). Everything talks to 127.0.0.1 only and
every wait has a deadline.

* Servers: :func:`server_command` builds the command line of upload-server (``ours``), the FastAPI
  reference peer (``reference``) or the raw-socket sink (``sink``); :func:`start_server` starts it in its
  own process group, waits for its ``listening on http://127.0.0.1:PORT`` line and keeps draining its
  stderr; :func:`stop_server` sends SIGTERM (SIGKILL to the group after a grace period).
  :func:`running_server` does both around a ``with`` block.
* Sampling: :class:`Sampler` samples ``VmRSS`` of a process and of all its descendants (workers, a
  forkserver) from /proc in a background thread, and the CPU seconds of its threads and of its workers.
* Datasets: :func:`ensure_dataset` makes a named GitHub-Archive-like dataset with ``gen_dataset.py`` once
  and caches it, with its ``<file>.expected.json``, under ``loadtest/data/`` (git-ignored). The ``gib``
  dataset (1 GiB of NDJSON) is built by repeating one generated chunk with distinct event ids.
* Client: :func:`upload` POSTs a file over a raw socket (head with ``sendall``, file with zero-copy
  ``sendfile``), so the client spends almost no CPU; :func:`verify_answer` checks an answer against the
  dataset's expected counts.
* Client processes, run as ``python loadtest/harness.py poll-health ...`` (one keep-alive connection
  polling ``/api/v1/health`` at an interval) and ``python loadtest/harness.py swarm ...`` (many
  concurrent keep-alive connections polling health, asyncio): they print one JSON summary on stdout, so
  the measuring client never shares a process (or a GIL) with the uploads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA_DIR = HERE / "data"
HOST = "127.0.0.1"
UPLOAD_PATH = "/api/v1/upload"
HEALTH_PATH = "/api/v1/health"
LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
MB = 1_000_000
MIB = 1 << 20
GIB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_CACHE_CHUNK = 8 * MIB

if str(HERE) not in sys.path:  # imported as ``loadtest.harness`` from the repository root
    sys.path.insert(0, str(HERE))

import gen_dataset  # noqa: E402  (needs the path above when imported from elsewhere)
from upload_server.config import parse_size as config_parse_size  # noqa: E402


# ----------------------------------------------------------------------------------------- helpers
def parse_size(text: str) -> int:
    """``1073741824``, ``128M``, ``1G``, ``1GiB`` → bytes: the server's own size syntax, for argparse."""
    try:
        return config_parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_list(text: str) -> list[str]:
    """``"a, b,,c"`` → ``["a", "b", "c"]`` (for comma-separated options)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def human_bytes(count: float) -> str:
    """Bytes as MiB with one decimal."""
    return f"{count / MIB:.1f} MiB"


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values."""
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between ranks; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mem_available_bytes() -> int:
    """``MemAvailable`` from /proc/meminfo."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as printed by ``uptime``."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def warm_page_cache(path: Path) -> float:
    """Read the file once so that ``sendfile`` serves it from memory; return seconds taken."""
    started = time.perf_counter()
    buffer = bytearray(PAGE_CACHE_CHUNK)
    with open(path, "rb", buffering=0) as source:
        while source.readinto(buffer):
            pass
    return time.perf_counter() - started


class BenchTimeout(Exception):
    """The whole run overran its ``--max-seconds`` budget."""


def install_run_guards(max_seconds: float | None) -> None:
    """SIGTERM becomes KeyboardInterrupt (so ``finally`` blocks stop the servers); SIGALRM ends the run.

    Call once from a benchmark's main thread. ``max_seconds`` bounds the whole run: when it passes,
    :class:`BenchTimeout` is raised in the main thread wherever it is.
    """

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def overran(signum: int, frame: object) -> None:
        raise BenchTimeout(f"the run took longer than --max-seconds {max_seconds:g}")

    signal.signal(signal.SIGTERM, interrupted)
    if max_seconds:
        signal.signal(signal.SIGALRM, overran)
        signal.setitimer(signal.ITIMER_REAL, max_seconds)


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
    """CPU seconds (user + system) of ``pid``; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return 0.0


def run_queue_wait_seconds(pid: int) -> float:
    """Seconds thread ``pid`` spent runnable but waiting for a CPU (``/proc/<pid>/schedstat``); 0 if gone.

    For a process this is its main thread: a worker's, or a server's event loop. A high figure means the
    machine (other processes, or higher-priority ones) kept it off the CPU, not that it had no work.
    """
    try:
        with open(f"/proc/{pid}/schedstat") as schedstat:
            return int(schedstat.read().split()[1]) / 1e9
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
    """Peaks and CPU use of one process tree over one sampled span."""

    main_peak_kib: int = 0
    children_peak_kib: int = 0
    total_peak_kib: int = 0  # the largest sum of main + descendants seen in one sample
    children_seen: int = 0
    samples: int = 0
    wall_s: float = 0.0
    main_thread_cpu_s: float = 0.0
    other_threads_cpu_s: float = 0.0
    children_cpu_s: float = 0.0
    main_wait_s: float = 0.0  # the main thread (event loop) runnable but waiting for a CPU
    children_wait_s: float = 0.0  # the workers' main threads runnable but waiting for a CPU, summed
    machine_cpu_s: float = 0.0  # every process on the machine, the client and the target included
    minor_faults: int = 0  # of the target process (not its workers)

    @property
    def total_peak_bytes(self) -> int:
        """Peak RSS of the process plus its descendants, in bytes."""
        return self.total_peak_kib * 1024

    @property
    def cpu_s(self) -> float:
        """CPU seconds of the whole tree."""
        return self.main_thread_cpu_s + self.other_threads_cpu_s + self.children_cpu_s


class Sampler:
    """Samples VmRSS of ``pid`` and of its descendants every ``interval`` seconds, in a thread.

    Use as a context manager around the work to measure; ``result`` holds the peaks and CPU figures.
    """

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.result = Sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._threads_start: dict[int, float] = {}
        self._threads_last: dict[int, float] = {}
        self._children_cpu_start: dict[int, float] = {}
        self._children_cpu_last: dict[int, float] = {}
        self._children_wait_start: dict[int, float] = {}
        self._children_wait_last: dict[int, float] = {}
        self._main_wait_start = 0.0
        self._machine_start = 0.0
        self._faults_start = 0
        self._started = 0.0

    def __enter__(self) -> Sampler:
        self._started = time.perf_counter()
        self._machine_start = machine_busy_seconds()
        self._faults_start = minor_faults(self.pid)
        self._threads_start = thread_cpu_seconds(self.pid)
        self._threads_last = dict(self._threads_start)
        for kid in descendants(self.pid):  # workers alive before the span: count only their new CPU
            self._children_cpu_start[kid] = self._children_cpu_last[kid] = process_cpu_seconds(kid)
            self._children_wait_start[kid] = self._children_wait_last[kid] = run_queue_wait_seconds(kid)
        self._main_wait_start = run_queue_wait_seconds(self.pid)
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()
        result = self.result
        result.wall_s = time.perf_counter() - self._started
        result.machine_cpu_s = machine_busy_seconds() - self._machine_start
        result.minor_faults = minor_faults(self.pid) - self._faults_start
        result.main_thread_cpu_s = self._threads_last.get(self.pid, 0.0) - self._threads_start.get(
            self.pid, 0.0
        )
        result.other_threads_cpu_s = sum(
            cpu - self._threads_start.get(tid, 0.0)
            for tid, cpu in self._threads_last.items()
            if tid != self.pid
        )
        result.children_cpu_s = sum(
            cpu - self._children_cpu_start.get(pid, 0.0) for pid, cpu in self._children_cpu_last.items()
        )
        result.main_wait_s = run_queue_wait_seconds(self.pid) - self._main_wait_start
        result.children_wait_s = sum(
            wait - self._children_wait_start.get(pid, 0.0) for pid, wait in self._children_wait_last.items()
        )

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
            self._children_cpu_start.setdefault(kid, 0.0)  # born during the span: all its CPU counts
            self._children_cpu_last[kid] = cpu
            self._children_wait_start.setdefault(kid, 0.0)
            self._children_wait_last[kid] = run_queue_wait_seconds(kid)


# ------------------------------------------------------------------------------------- servers
@dataclass
class Server:
    """A server under test, running as a subprocess; its stderr is drained into a bounded tail."""

    name: str
    process: subprocess.Popen[bytes]
    port: int = 0
    log_tail: deque[str] = field(default_factory=lambda: deque(maxlen=60))

    @property
    def pid(self) -> int:
        """The server's process id (its workers are its descendants)."""
        return self.process.pid

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{HOST}:{self.port}"

    def tail(self, lines: int = 15) -> str:
        """The last lines the server wrote to stderr."""
        return "\n".join(list(self.log_tail)[-lines:])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a server that will not announce its port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def server_command(
    kind: str, tmp_dir: str | Path, workers: int | None = None, extra: Sequence[str] = (), port: int = 0
) -> list[str]:
    """The command line that starts ``kind`` (ours, reference, sink) on 127.0.0.1.

    ``port=0`` lets the server pick a free port and announce it on its ``listening on`` line. A server
    told to log quietly (``--log-level warning``) may not print that line: give it a :func:`free_port`,
    and :func:`start_server` then also takes a successful connection as the sign that it listens.
    """
    if kind == "ours":
        command = [sys.executable, "-m", "upload_server", "--tmp-dir", str(tmp_dir)]
    elif kind == "reference":
        command = [sys.executable, "-m", "loadtest.reference", "--tmp-dir", str(tmp_dir)]
    elif kind == "sink":
        command = [sys.executable, str(HERE / "sink.py"), "--tmp-dir", str(tmp_dir)]
    else:
        raise ValueError(f"unknown server kind {kind!r}: ours, reference or sink")
    command += ["--port", str(port)]
    if workers is not None:
        command += ["--workers", str(workers)]
    return [*command, *extra]


def start_server(
    name: str,
    command: list[str],
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    timeout: float = START_TIMEOUT,
) -> Server:
    """Start ``command`` in its own process group (cwd: the repository root) and wait until it listens.

    The ``listening on http://127.0.0.1:PORT`` line on stderr gives the port. Stderr keeps being drained
    (a full pipe would stall the server's logging) into ``Server.log_tail`` and, when given, ``log_path``.
    """
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,  # its workers can be stopped with it as a group if it will not stop
    )
    server = Server(name, process)
    ready = threading.Event()

    def drain() -> None:
        assert process.stderr is not None
        log = open(log_path, "w") if log_path else None  # noqa: SIM115  (closed below)
        try:
            for raw in process.stderr:
                line = raw.decode("utf-8", "replace").rstrip()
                server.log_tail.append(line)
                if log is not None:
                    log.write(line + "\n")
                    log.flush()
                match = LISTENING.search(line)
                if match and not ready.is_set():
                    server.port = int(match.group(1))
                    ready.set()
        finally:
            ready.set()  # the server exited: wake the waiter, which sees no port
            if log is not None:
                log.close()

    threading.Thread(target=drain, name=f"{name}-stderr", daemon=True).start()
    fixed = _fixed_port(command)
    deadline = time.monotonic() + timeout
    while not ready.wait(0.1) and time.monotonic() < deadline and process.poll() is None:
        if fixed and _accepts(fixed):
            server.port = fixed
            break
    if not server.port:
        stop_server(server)
        raise RuntimeError(f"{name} did not start within {timeout:g} s: {' '.join(command)}\n{server.tail()}")
    return server


def _fixed_port(command: Sequence[str]) -> int:
    """The port a command line asks for (the last ``--port N`` or ``--port=N``); 0 for none or 0."""
    port = "0"
    for index, word in enumerate(command):
        if word == "--port" and index + 1 < len(command):
            port = command[index + 1]
        elif word.startswith("--port="):
            port = word.split("=", 1)[1]
    return int(port) if port.isdigit() else 0


def _accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def stop_server(server: Server, timeout: float = STOP_TIMEOUT) -> int | None:
    """SIGTERM; SIGKILL to its process group if it does not stop in ``timeout``; return the exit code."""
    process = server.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
    # Stragglers in its group (orphaned pool workers, a forkserver) would keep running.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    return process.returncode


@contextlib.contextmanager
def running_server(
    name: str,
    command: list[str],
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    stop_timeout: float = STOP_TIMEOUT,
) -> Iterator[Server]:
    """:func:`start_server` on entry, :func:`stop_server` on exit (whatever happened in between)."""
    server = start_server(name, command, env=env, log_path=log_path)
    try:
        yield server
    finally:
        stop_server(server, stop_timeout)


# -------------------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: its file name and how to make it."""

    file: str
    kind: str  # gen_dataset kind: zip, gz, ndjson, json-array
    events: int = 0  # for gen_dataset; 0 for the repeated-chunk NDJSON
    files: int = 1
    seed: int = 0
    target_bytes: int = 0  # for the repeated-chunk NDJSON


#: The one catalogue of datasets, for the benchmarks and run_locust.py alike; ``large`` is issue 3's ~100 MB
#: zip (8 NDJSON entries, ~440 MB of JSON), ``twenty`` issue 11's ~20 MB zip (4 entries) sent 64 at once,
#: ``gib`` the 1 GiB NDJSON of the memory comparison.
DATASETS: dict[str, DatasetSpec] = {
    "tiny": DatasetSpec("tiny.zip", "zip", 300, files=2, seed=1),
    "small": DatasetSpec("small.zip", "zip", 3_000, files=4, seed=2),
    "medium": DatasetSpec("medium.zip", "zip", 30_000, files=8, seed=3),
    "large": DatasetSpec("large.zip", "zip", 330_000, files=8, seed=4),
    "twenty": DatasetSpec("twenty.zip", "zip", 63_000, files=4, seed=12),
    "hour": DatasetSpec("hour.json.gz", "gz", 20_000, seed=5),
    "ndjson": DatasetSpec("small.ndjson", "ndjson", 3_000, seed=6),
    "array": DatasetSpec("small-array.json", "json-array", 3_000, seed=7),
    "gib": DatasetSpec("gib.ndjson", "ndjson", seed=11, target_bytes=GIB),
}

CONTENT_TYPES = {
    "zip": "application/zip",
    "gz": "application/gzip",
    "ndjson": "application/x-ndjson",
    "json-array": "application/json",
}


@dataclass(frozen=True)
class Dataset:
    """A dataset file on disk and the counts its generator wrote next to it."""

    name: str
    path: Path
    expected: dict[str, Any]

    @property
    def size(self) -> int:
        """Bytes on disk (what is uploaded)."""
        return self.path.stat().st_size

    @property
    def content_type(self) -> str:
        """The Content-Type to upload it with."""
        return CONTENT_TYPES[self.expected["kind"]]

    @property
    def events(self) -> int:
        """Events in the dataset."""
        return int(self.expected["events"])

    @property
    def json_bytes(self) -> int:
        """Uncompressed JSON bytes in the dataset."""
        return int(self.expected["uncompressed_bytes"])


def _expected_path(path: Path) -> Path:
    return path.with_name(path.name + ".expected.json")


def _cached(path: Path, spec: DatasetSpec) -> dict[str, Any] | None:
    """The expected counts when ``path`` holds the dataset ``spec`` describes, else None."""
    try:
        expected = orjson.loads(_expected_path(path).read_bytes())
        size = path.stat().st_size
    except (OSError, orjson.JSONDecodeError):
        return None
    same = (
        expected.get("compressed_bytes") == size
        and expected.get("kind") == spec.kind
        and expected.get("seed") == spec.seed
        and (spec.target_bytes or expected.get("events") == spec.events)
        and (not spec.target_bytes or expected.get("target_bytes") == spec.target_bytes)
    )
    return expected if same else None


def ensure_dataset(name: str, data_dir: Path = DATA_DIR, *, gib_bytes: int | None = None) -> Dataset:
    """The named dataset, made once and cached in ``data_dir`` (written under a temporary name, renamed).

    ``gib_bytes`` overrides the size of the ``gib`` dataset (its file name then carries the size).
    """
    spec = DATASETS[name]
    if name == "gib" and gib_bytes is not None and gib_bytes != spec.target_bytes:
        spec = DatasetSpec(f"gib-{gib_bytes}.ndjson", "ndjson", seed=spec.seed, target_bytes=gib_bytes)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / spec.file
    expected = _cached(path, spec)
    if expected is None:
        partial = data_dir / f".partial-{os.getpid()}-{spec.file}"
        started = time.perf_counter()
        try:
            if spec.target_bytes:
                expected = build_repeated_ndjson(partial, spec.target_bytes, spec.seed)
            else:
                expected = gen_dataset.write_dataset(partial, spec.kind, spec.events, spec.files, spec.seed)  # type: ignore[arg-type]
            os.replace(_expected_path(partial), _expected_path(path))
            os.replace(partial, path)
        finally:
            for leftover in (partial, _expected_path(partial)):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
        print(
            f"  made dataset {name}: {path} ({path.stat().st_size / MB:.1f} MB, "
            f"{expected['events']} events) in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
    return Dataset(name, path, expected)


def build_repeated_ndjson(
    out: Path, target_bytes: int, seed: int, chunk_events: int = 40_000
) -> dict[str, Any]:
    """Write ~``target_bytes`` of GH-like NDJSON by repeating one generated chunk with distinct event ids.

    Generating a GiB event by event takes minutes; one chunk of ``chunk_events`` events is generated and
    serialised once, then written again and again with each line's ``id`` (its first key) renumbered, so
    every event id is unique; the last copy stops at the line that reaches ``target_bytes``. The same
    actors recur in every copy, as busy accounts do over a day. Writes ``<out>.expected.json`` with the
    counts of exactly the lines written and returns it.
    """
    tails: list[bytes] = []
    types: list[str] = []
    actors: set[int] = set()
    for event in gen_dataset.generate_events(chunk_events, seed):
        line = orjson.dumps(event)
        if not line.startswith(b'{"id":"'):
            raise RuntimeError("gen_dataset no longer writes the event id first")
        tails.append(line[line.index(b'","', 7) + 1 :] + b"\n")  # from the comma after the id on
        types.append(event["type"])
        actors.add(event["actor"]["id"])
    base = 900_000_000_000 + seed * 1_000_000_000
    written = events = 0
    type_counts: Counter[str] = Counter()
    with open(out, "wb") as sink:
        copy = 0
        while written < target_bytes:
            lines = []
            for index, tail in enumerate(tails):
                line = b'{"id":"%d"' % (base + copy * chunk_events + index) + tail
                lines.append(line)
                written += len(line)
                type_counts[types[index]] += 1
                events += 1
                if written >= target_bytes:
                    break
            sink.write(b"".join(lines))
            copy += 1
    expected = {
        "events": events,
        "unique_actors": len(actors),
        "event_types": dict(sorted(type_counts.items())),
        "files": 1,
        "uncompressed_bytes": written,
        "kind": "ndjson",
        "seed": seed,
        "compressed_bytes": out.stat().st_size,
        "target_bytes": target_bytes,
        "built_from": f"{chunk_events} generated events repeated with distinct ids",
    }
    _expected_path(out).write_bytes(orjson.dumps(expected, option=orjson.OPT_INDENT_2))
    return expected


# ----------------------------------------------------------------------------------------- client
@dataclass
class Exchange:
    """What one request took and got back."""

    status: int
    headers: dict[str, str]
    body: bytes
    wall_s: float  # connect to the last byte of the answer
    sent_s: float  # until the client's last send returned (bytes in the kernel, not yet read by the peer)
    client_cpu_s: float
    first_byte_s: float = float("nan")  # until the first byte of the answer arrived

    def json(self) -> Any:
        """The body parsed as JSON."""
        return orjson.loads(self.body)


def body_framing(body_kind: str, content_type: str, filename: str = "upload") -> tuple[str, bytes, bytes]:
    """Content-Type, bytes before the file, bytes after it: ``raw`` or ``multipart`` (field ``file``)."""
    if body_kind == "raw":
        return content_type, b"", b""
    boundary = "bench" + os.urandom(8).hex()
    before = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    after = f"\r\n--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", before, after


def _recv_more(sock: socket.socket, data: bytearray, what: str) -> None:
    chunk = sock.recv(1 << 20)
    if not chunk:
        raise ConnectionError(f"connection closed inside {what}: {bytes(data[:200])!r}")
    data += chunk


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the final answer (``1xx`` skipped; Content-Length, chunked or EOF)."""
    data = bytearray()
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            _recv_more(sock, data, "the answer's head")
            continue
        lines = data[:end].decode("latin-1").split("\r\n")
        del data[: end + 4]
        status = int(lines[0].split(" ", 2)[1])
        if status >= 200:
            break
    headers = {
        name.strip().lower(): value.strip() for name, _, value in (ln.partition(":") for ln in lines[1:])
    }
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            while (line_end := data.find(b"\r\n")) < 0:
                _recv_more(sock, data, "a chunk size")
            size = int(bytes(data[:line_end]).split(b";", 1)[0], 16)
            del data[: line_end + 2]
            if size == 0:
                while data.find(b"\r\n") < 0:  # trailers end with an empty line; none expected
                    _recv_more(sock, data, "the last chunk")
                return status, headers, bytes(body)
            while len(data) < size + 2:
                _recv_more(sock, data, "a chunk")
            body += data[:size]
            del data[: size + 2]
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(data) < length:
            _recv_more(sock, data, "the answer's body")
        return status, headers, bytes(data[:length])
    while chunk := sock.recv(1 << 20):  # no length: the body runs to the end of the connection
        data += chunk
    return status, headers, bytes(data)


def upload(
    port: int,
    path: Path,
    *,
    content_type: str = "application/zip",
    body_kind: str = "raw",
    query: str = "",
    timeout: float = 300.0,
    accept: str = "application/json",
) -> Exchange:
    """POST ``path`` to the upload route over a raw socket: head with ``sendall``, file with ``sendfile``.

    ``Connection: close``, one request per connection. An early answer (the peer refused the upload and
    closed) is read and returned like any other.
    """
    size = path.stat().st_size
    content_type, before, after = body_framing(body_kind, content_type, path.name)
    target = UPLOAD_PATH + (f"?{query}" if query else "")
    head = (
        f"POST {target} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: {content_type}\r\n"
        f"Accept: {accept}\r\nContent-Length: {len(before) + size + len(after)}\r\n"
        "Connection: close\r\n\r\n"
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
        first_byte_s = float("nan")
        with contextlib.suppress(OSError):
            if sock.recv(1, socket.MSG_PEEK):  # blocks until the answer starts, consumes nothing
                first_byte_s = time.perf_counter() - started
        status, headers, body = read_response(sock)
    wall_s = time.perf_counter() - started
    cpu_s = time.thread_time() - cpu_started
    return Exchange(status, headers, body, wall_s, sent_s, cpu_s, first_byte_s)


def get(port: int, path: str = HEALTH_PATH, timeout: float = 10.0) -> Exchange:
    """One GET on a fresh connection."""
    started = time.perf_counter()
    cpu_started = time.thread_time()
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode())
        sent_s = time.perf_counter() - started
        status, headers, body = read_response(sock)
    return Exchange(
        status, headers, body, time.perf_counter() - started, sent_s, time.thread_time() - cpu_started
    )


def verify_answer(answer: Any, dataset: Dataset, *, actors: bool = True) -> list[str]:
    """What in a JSON upload answer disagrees with the dataset's expected counts (empty when right)."""
    expected = dataset.expected
    if not isinstance(answer, dict) or not isinstance(answer.get("summary"), dict):
        keys = sorted(answer) if isinstance(answer, dict) else type(answer).__name__
        return [f"no summary in the answer (keys: {keys})"]
    summary = answer["summary"]
    problems = []
    checks = {
        "size_bytes": (answer.get("size_bytes"), dataset.size),
        "summary.events": (summary.get("events"), expected["events"]),
        "summary.unique_actors": (summary.get("unique_actors"), expected["unique_actors"]),
        "summary.files": (summary.get("files"), expected["files"]),
        "summary.files_failed": (summary.get("files_failed"), 0),
        "summary.skipped": (summary.get("skipped") or {}, {}),
    }
    for name, (got, want) in checks.items():
        if got != want:
            problems.append(f"{name} is {got!r}, expected {want!r}")
    if summary.get("event_types") != expected["event_types"]:
        wrong = sorted(
            key
            for key in set(expected["event_types"]) | set(summary.get("event_types") or {})
            if (summary.get("event_types") or {}).get(key) != expected["event_types"].get(key)
        )
        problems.append(f"summary.event_types differs for {wrong}")
    if actors:
        listed = answer.get("actors")
        if not isinstance(listed, list):
            problems.append("no actors list")
        else:
            if len(listed) != expected["unique_actors"]:
                problems.append(f"{len(listed)} actors listed, expected {expected['unique_actors']}")
            total = sum(actor.get("events", 0) for actor in listed)
            if total != expected["events"]:
                problems.append(f"actors' events add up to {total}, expected {expected['events']}")
    elif "actors" in answer:
        problems.append("actors listed although ?actors=false")
    return problems


class WrongAnswer(RuntimeError):
    """A server answered an upload wrongly (status or counts); the message says how to reproduce it."""


@dataclass
class UploadRun:
    """One timed upload of a dataset to a server, checked against the dataset's expected counts."""

    server: str
    label: str  # what was measured, e.g. "workers=2" or "throughput"
    round: int
    dataset: Dataset
    exchange: Exchange
    sample: Sample
    answer: dict[str, Any]
    load: str  # load average when the upload started

    @property
    def wall_s(self) -> float:
        """Connect to the last byte of the answer, on the client's clock."""
        return self.exchange.wall_s

    @property
    def upload_mb_s(self) -> float:
        """Bytes uploaded (the file as sent) per second, end to end, in MB/s."""
        return self.dataset.size / MB / self.wall_s

    @property
    def json_mb_s(self) -> float:
        """Uncompressed JSON bytes processed per second, end to end, in MB/s."""
        return self.dataset.json_bytes / MB / self.wall_s

    @property
    def events_per_s(self) -> float:
        """Events extracted per second, end to end."""
        return self.dataset.events / self.wall_s

    @property
    def receive_ms(self) -> float:
        """The server's own ``timing_ms.receive``."""
        return float((self.answer.get("timing_ms") or {}).get("receive", float("nan")))

    @property
    def process_ms(self) -> float:
        """The server's own ``timing_ms.process``."""
        return float((self.answer.get("timing_ms") or {}).get("process", float("nan")))

    @property
    def peak_rss_bytes(self) -> int:
        """Peak RSS of the server plus its workers during the upload."""
        return self.sample.total_peak_bytes

    @property
    def others_cpu_share(self) -> float:
        """Share of all cores that processes other than the server tree and the client kept busy (noise)."""
        others = self.sample.machine_cpu_s - self.sample.cpu_s - self.exchange.client_cpu_s
        return max(0.0, others) / (self.sample.wall_s * (os.cpu_count() or 1))

    def line(self) -> str:
        """One line for the log: speed, server timings, memory, CPU."""
        sample = self.sample
        main, workers = human_bytes(sample.main_peak_kib * 1024), human_bytes(sample.children_peak_kib * 1024)
        return (
            f"  {self.server:<9} {self.label:<10} round {self.round}: {self.wall_s:6.2f} s (sent "
            f"{self.exchange.sent_s:.2f} s, answer from {self.exchange.first_byte_s:.2f} s)  "
            f"{self.upload_mb_s:6.1f} MB/s upload  {self.json_mb_s:6.1f} MB/s JSON  "
            f"{self.events_per_s:9,.0f} events/s | server: receive {self.receive_ms:7.0f} ms, process "
            f"{self.process_ms:7.0f} ms | peak RSS {human_bytes(self.peak_rss_bytes)} (main {main}, "
            f"workers {workers} in {sample.children_seen} procs) | CPU s: main "
            f"{sample.main_thread_cpu_s:.1f}, threads {sample.other_threads_cpu_s:.1f}, workers "
            f"{sample.children_cpu_s:.1f} | waited for a CPU: main {sample.main_wait_s:.1f} s, workers "
            f"{sample.children_wait_s:.1f} s | others kept {self.others_cpu_share:.0%} of "
            f"{os.cpu_count()} cores busy | load {self.load}"
        )


def reproduction(server: Server, dataset: Dataset, query: str, body_kind: str) -> str:
    """A curl command that repeats an upload, for a report of a wrong answer."""
    target = f"{server.url}{UPLOAD_PATH}" + (f"?{query}" if query else "")
    if body_kind == "raw":
        data = f"--data-binary @{dataset.path} -H 'Content-Type: {dataset.content_type}'"
    else:
        data = f"-F 'file=@{dataset.path};type={dataset.content_type}'"
    return f"curl -sS -X POST {data} '{target}'"


def timed_upload(
    server: Server,
    dataset: Dataset,
    *,
    label: str = "",
    round_no: int = 0,
    query: str = "",
    body_kind: str = "raw",
    timeout: float = 300.0,
    sample_interval: float = 0.02,
    verify: bool = True,
) -> UploadRun:
    """Upload ``dataset`` to ``server`` while sampling its process tree; check the answer.

    A non-200 status, an answer that is not JSON, or (``verify``) counts that disagree with the dataset's
    expected.json raise :class:`WrongAnswer`.
    """
    load = load_average()
    with Sampler(server.pid, sample_interval) as sampler:
        exchange = upload(
            server.port,
            dataset.path,
            content_type=dataset.content_type,
            body_kind=body_kind,
            query=query,
            timeout=timeout,
        )
    how = reproduction(server, dataset, query, body_kind)
    if exchange.status != 200:
        raise WrongAnswer(
            f"{server.name} answered {exchange.status} to {dataset.name}: {exchange.body[:500]!r}\n"
            f"  reproduce: {how}\n  server log tail:\n{server.tail()}"
        )
    try:
        answer = orjson.loads(exchange.body)
    except orjson.JSONDecodeError as error:
        raise WrongAnswer(f"{server.name}: answer is not JSON ({error}): {exchange.body[:300]!r}") from None
    if verify:
        problems = verify_answer(answer, dataset, actors="actors=false" not in query)
        if problems:
            raise WrongAnswer(
                f"{server.name} answered {dataset.name} wrongly: {'; '.join(problems)}\n  reproduce: {how}"
            )
    return UploadRun(server.name, label, round_no, dataset, exchange, sampler.result, answer, load)


# ----------------------------------------------------------------------------------------- py-spy
def py_spy_command() -> list[str]:
    """py-spy from PATH, else through ``uv run --with py-spy``."""
    return ["py-spy"] if shutil.which("py-spy") else ["uv", "run", "--with", "py-spy", "py-spy"]


@contextlib.contextmanager
def py_spy(
    pid: int, output: str | Path | None, duration: float, *, subprocesses: bool = True, rate: int = 200
) -> Iterator[None]:
    """Record ``pid`` (and, by default, its worker processes) with py-spy while the block runs.

    ``output`` ending in ``.txt`` is written in py-spy's raw (collapsed stacks) format, else as SVG.
    """
    if not output:
        yield
        return
    output = str(output)
    command = [*py_spy_command(), "record", "--pid", str(pid), "--rate", str(rate), "--threads"]
    command += ["-o", output, "--duration", str(int(duration)), "--nonblocking"]
    if subprocesses:
        command.append("--subprocesses")
    if output.endswith(".txt"):
        command += ["--format", "raw"]
    recorder = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(3.0)  # let py-spy attach before the first byte
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


def top_frames(
    raw_profile: Path, count: int = 12, *, leaf: bool = True, main_thread_of: int | None = None
) -> tuple[list[tuple[str, int, float]], int]:
    """The frames with the most samples in a py-spy raw profile: ``([(frame, samples, share)], total)``.

    ``leaf=True`` counts where the samples were taken (self time); else every frame on a stack (total).
    ``main_thread_of``: only the samples of that process's main thread (the server's event loop), with
    the process and thread frames (py-spy's ``--subprocesses`` / ``--threads``) left out of the counts.
    """
    counts: Counter[str] = Counter()
    total = 0
    wanted = f"thread ({main_thread_of})" if main_thread_of is not None else None
    with open(raw_profile) as profile:
        for line in profile:
            stack, _, number = line.rstrip("\n").rpartition(" ")
            if not stack or not number.isdigit():
                continue
            frames = stack.split(";")
            if wanted is not None:
                heads = [i for i, frame in enumerate(frames[:3]) if frame.startswith(wanted)]
                if not heads:
                    continue
                frames = frames[heads[0] + 1 :] or ["(idle)"]
            samples = int(number)
            total += samples
            if leaf:
                counts[frames[-1]] += samples
            else:
                for frame in set(frames):
                    counts[frame] += samples
    return [(frame, samples, samples / max(total, 1)) for frame, samples in counts.most_common(count)], total


def print_profile(path: Path | None, pid: int | None = None, count: int = 10) -> None:
    """The hottest frames (self time) of a py-spy raw profile: the whole tree, then the server's loop.

    ``pid``: the server's process id, for a second list restricted to its main thread (the event loop
    that also answers health checks); its ``get_events``/``select`` frames are the loop waiting, idle.
    """
    if path is None or not path.exists():
        return
    frames, total = top_frames(path, count)
    print(f"  top frames by self time in {path} (server and workers, {total} samples):")
    for frame, samples, share in frames:
        print(f"    {share:6.1%} {samples:7d}  {frame[:150]}")
    if pid is None:
        return
    frames, total = top_frames(path, count, main_thread_of=pid)
    print(f"  ... of the server's main thread only ({total} samples):")
    for frame, samples, share in frames:
        print(f"    {share:6.1%} {samples:7d}  {frame[:150]}")


# --------------------------------------------------------------------------- client processes
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
    errors: Counter[str] = Counter()
    reconnects = 0
    sock: socket.socket | None = None
    deadline = time.monotonic() + duration
    next_at = time.monotonic()
    while time.monotonic() < deadline:
        try:
            if sock is None:
                sock = socket.create_connection((HOST, port), timeout=timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                reconnects += 1
            started = time.perf_counter()
            sock.sendall(HEALTH_REQUEST)
            status, headers, _ = read_response(sock)
            elapsed = time.perf_counter() - started
            if status == 200:
                latencies.append(elapsed)
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
    return {**latency_summary(latencies), "errors": dict(errors), "connections_opened": reconnects}


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
    result = asyncio.run(_swarm(port, connections, requests, interval, timeout, max_seconds))
    result["fd_limit"] = fd_limit
    return result


def client_process(arguments: list[str], timeout: float) -> dict[str, Any]:
    """Run ``python harness.py <arguments>`` in a process; its JSON summary (deadline: ``timeout``)."""
    command = [sys.executable, str(Path(__file__).resolve()), *arguments]
    completed = subprocess.run(command, capture_output=True, timeout=timeout, check=False, cwd=ROOT)
    if completed.returncode != 0:
        raise RuntimeError(f"client {' '.join(arguments)} failed: {completed.stderr.decode()[-1500:]}")
    return orjson.loads(completed.stdout)


def start_client_process(arguments: list[str]) -> subprocess.Popen[bytes]:
    """Start ``python harness.py <arguments>``; collect it with :func:`finish_client_process`."""
    command = [sys.executable, str(Path(__file__).resolve()), *arguments]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)


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
