"""Servers started from the command line, as subprocesses: their stderr line by line, stopping by signal.

The ``spawn`` and ``spool_dir`` fixtures (conftest.py) are built on this module.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from upload_server.receive.spool import RUN_DIR_SUFFIX

LISTENING = re.compile(r"upload-server listening on http://127\.0\.0\.1:(\d+)")
EVENTS = json.dumps(
    [{"id": str(n), "type": "PushEvent", "actor": {"login": f"u{n}"}} for n in range(200)]
).encode()
#: Hang guards, not measurements: a passing run takes well under 1 s to start and to stop, but a cold
#: interpreter took over 15 s to start with the suite's xdist workers and other jobs at load 18 on 2 cores.
#: Tests that assert how long a stop took compare ``took`` against their own bound.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0


def server_command(spool_dir: Path, *extra_flags: str) -> list[str]:
    """``python -m upload_server`` on a free port, spooling to ``spool_dir``, no drain delay, then
    ``extra_flags``."""
    command = [sys.executable, "-m", "upload_server", "--port", "0", "--tmp-dir", str(spool_dir)]
    return [*command, "--drain-delay", "0", *extra_flags]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without UPLOAD_SERVER_* settings, plus ``extra``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("UPLOAD_SERVER_")}
    env.update(extra)
    return env


@dataclass
class ServerProcess:
    """A server started from the command line, with its stderr collected line by line."""

    process: subprocess.Popen[str]
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """The first stderr line (from now on) matching ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line matching {pattern.pattern!r}; stderr so far: {self.seen}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(line)
            if match := pattern.search(line):
                return match

    def find(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """The first stderr line matching ``pattern``, among those read already or from now on: the lines
        of several processes (a supervisor and its children) come in any order, so an earlier wait for
        another line may have read this one."""
        for line in self.seen:
            if match := pattern.search(line):
                return match
        return self.wait_for(pattern, timeout)

    def stderr_text(self) -> str:
        """Everything written to stderr (call after the process ended)."""
        while not self.lines.empty():
            self.seen.append(self.lines.get_nowait())
        return "".join(self.seen)


Spawn = Callable[..., ServerProcess]


def _pump(stream: Iterator[str], lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


def stop(
    server: ServerProcess, signum: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT
) -> tuple[int, float]:
    """Signal the server; its exit code and how long it took to exit."""
    started = time.monotonic()
    server.process.send_signal(signum)
    code = server.process.wait(timeout=timeout)
    return code, time.monotonic() - started


def leftovers(spool_dir: Path) -> list[str]:
    """What servers left in their temp dir: every file below it, and any run directory. Empty folders the
    server keeps for itself (``resumable/``) are not leftovers."""
    return sorted(
        str(path.relative_to(spool_dir))
        for path in spool_dir.rglob("*")
        if path.is_file() or path.name.endswith(RUN_DIR_SUFFIX)
    )


def follow(process: subprocess.Popen[str]) -> ServerProcess:
    """Collect ``process``'s stderr (opened as text) line by line, for :meth:`ServerProcess.wait_for`."""
    server = ServerProcess(process)
    threading.Thread(target=_pump, args=(process.stderr, server.lines), daemon=True).start()
    return server


def spawner(started: list[subprocess.Popen[str]]) -> Spawn:
    """A function that starts ``command`` and waits for its listening line; it appends to ``started``."""

    def spawn_server(command: list[str], env: dict[str, str] | None = None) -> ServerProcess:
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env or clean_env()
        )
        started.append(process)
        server = follow(process)
        server.port = int(server.wait_for(LISTENING, START_TIMEOUT).group(1))
        return server

    return spawn_server


def kill_all(started: list[subprocess.Popen[str]]) -> None:
    """Kill every process in ``started`` that still runs (the end of a test or module)."""
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (a server's forkserver and workers, a supervisor's children...)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = {int(child) for child in (task / "children").read_text().split()}
            except OSError:
                continue
            found |= children
            todo.extend(children)
    return found
