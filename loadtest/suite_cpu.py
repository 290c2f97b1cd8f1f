"""Where the test suite's CPU goes: each test file alone (``pytest -n 0``), with the CPU of every process it
started, grandchildren included, and what pytest costs before the first test (plugins, conftest, collection).

    uv run --group loadtest python loadtest/suite_cpu.py                   # every tests/test_*.py, ~4 min
    uv run --group loadtest python loadtest/suite_cpu.py tests/test_page.py tests/test_drain.py
    uv run --group loadtest python loadtest/suite_cpu.py --collect         # only the collection costs

This script makes itself a child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``): a process orphaned below
pytest (a forkserver, a worker of a server run as a subprocess, a browser's helpers) is re-parented here, not
to init, so waiting for it adds its CPU to ``RUSAGE_CHILDREN`` like every other descendant's. A process still
alive ``--linger`` seconds after pytest exited is reported (something a test left running). Orphans are
reaped as they exit, so that a test waiting for a process to leave /proc does not see a zombie.

``cpu`` is user + sys of the whole tree; ``over`` is ``cpu`` minus the CPU of collecting that file alone
(``--collect-only``): what its tests themselves cost. The CPU of one whole-suite collection (what each xdist
worker pays before its first test) is printed first. The machine is shared: wall times move with the load
average (printed); CPU times much less.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36


@dataclass
class Cost:
    wall: float
    cpu: float
    code: int
    lingered: int


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def reap_orphans(linger: float) -> int:
    """Wait for every orphan re-parented here, for up to ``linger`` s; how many were still running."""
    deadline = time.monotonic() + linger
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return 0
        if pid == 0:
            if time.monotonic() > deadline:
                return _children_left()
            time.sleep(0.05)


def _children_left() -> int:
    me = str(os.getpid())
    left = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == me:
                left += 1
    return left


def measure(args: list[str], linger: float) -> Cost:
    """Run pytest with ``args``; its wall time and the CPU of its whole process tree."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Reap every orphan as it exits, not only pytest: a test that waits for a process to disappear from
    # /proc (a killed supervisor's children) would otherwise see a zombie waiting for this script.
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == process.pid:
            process.returncode = code = os.waitstatus_to_exitcode(status)
            break
    wall = time.monotonic() - started
    lingered = reap_orphans(linger)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Cost(wall, cpu, code, lingered)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="*", type=Path, help="test files (default: every tests/test_*.py)")
    parser.add_argument("--collect", action="store_true", help="only the collection costs")
    parser.add_argument("--linger", type=float, default=5.0, help="s to wait for orphans after pytest")
    options = parser.parse_args()
    become_subreaper()
    files = options.files or sorted(Path("tests").glob("test_*.py"))
    suite = measure(["-n", "0", "--collect-only"], options.linger)
    load = os.getloadavg()[0]
    print(f"load {load:.1f}: collecting the whole suite: {suite.cpu:.1f} s CPU, {suite.wall:.1f} s")
    print(f"{'file':<32} {'wall s':>7} {'cpu s':>7} {'over':>7}  exit")
    total = 0.0
    for path in files:
        collect = measure(["-n", "0", "--collect-only", str(path)], options.linger)
        run = collect if options.collect else measure(["-n", "0", str(path)], options.linger)
        total += run.cpu - collect.cpu
        note = f" ({run.lingered} processes left running)" if run.lingered else ""
        print(
            f"{path.name:<32} {run.wall:7.1f} {run.cpu:7.1f} {run.cpu - collect.cpu:7.1f}  {run.code}{note}",
            flush=True,
        )
    print(f"sum of 'over': {total:.1f} s CPU; load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
