"""Measurement of a server's process tree: RSS and CPU from /proc in a background thread; py-spy profiles."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .common import CLK_TCK, ROOT


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


def time_on_cpu_seconds(pid: int) -> float:
    """Seconds thread ``pid`` ran on a CPU (``/proc/<pid>/schedstat``, in nanoseconds: exact where the 10 ms
    ticks of :func:`process_cpu_seconds` miss short wake-ups); 0 if gone. For a process, its main thread."""
    try:
        with open(f"/proc/{pid}/schedstat") as schedstat:
            return int(schedstat.read().split()[0]) / 1e9
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


def times_scheduled(pid: int) -> int:
    """How many times thread ``pid`` was given a CPU (``/proc/<pid>/schedstat``, third field); 0 if gone.

    With :func:`run_queue_wait_seconds`, the mean wait for a CPU each time it became runnable."""
    try:
        with open(f"/proc/{pid}/schedstat") as schedstat:
            return int(schedstat.read().split()[2])
    except (OSError, ValueError, IndexError):
        return 0


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
