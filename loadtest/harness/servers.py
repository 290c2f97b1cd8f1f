"""Servers as subprocesses: upload-server (``ours``), the reference peer, the raw-socket sink.

Each starts in its own process group; its ``listening on`` line gives the port; SIGTERM stops it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .common import HERE, HOST, LISTENING, ROOT, START_TIMEOUT, STOP_TIMEOUT


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
