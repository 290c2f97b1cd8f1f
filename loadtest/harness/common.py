"""Constants and small helpers every benchmark shares: paths, sizes, statistics, the machine, run guards."""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from upload_server.config import parse_size as config_parse_size

HERE = Path(__file__).resolve().parent.parent  # loadtest/
if str(HERE) not in sys.path:  # gen_dataset.py and sink.py sit there; imported as loadtest.harness too
    sys.path.insert(0, str(HERE))
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
