"""--processes N: a supervisor and N real serving processes on one SO_REUSEPORT port, driven from the
command line; plus the supervisor with children that fail on purpose (fake_children.py)."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server_process import EVENTS, ServerProcess, Spawn, clean_env, follow, leftovers, server_command, stop
from upload_server.config import Config, ConfigError, load_config
from upload_server.receive.spool import RUN_DIR_SUFFIX
from upload_server.state import derived_spool_budget

SUPERVISOR_READY = re.compile(
    r"upload-server: (\d+) serving processes \(pids ([\d, ]+)\) listening on http://127\.0\.0\.1:(\d+)"
)
TESTS = Path(__file__).resolve().parent


def start_supervised(spawn: Spawn, spool_dir: Path, *flags: str) -> tuple[ServerProcess, set[int]]:
    """A server with --processes 2; its children's pids, once the supervisor says both listen."""
    server = spawn(server_command(spool_dir, "--processes", "2", "--workers", "1", *flags))
    match = server.find(SUPERVISOR_READY, 30)
    assert int(match.group(3)) == server.port
    return server, {int(pid) for pid in match.group(2).split(", ")}


def health_pids(port: int, wanted: set[int], tries: int = 400) -> set[int]:
    """Pids answering health on fresh connections, until all of ``wanted`` were seen or ``tries`` ran out."""
    seen: set[int] = set()
    for _ in range(tries):
        answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=5, verify=False)
        seen.add(answer.json()["pid"])
        if wanted <= seen:
            break
    return seen


def test_processes_share_one_port_and_health_names_the_one_that_answered(
    spawn: Spawn, spool_dir: Path
) -> None:
    server, pids = start_supervised(spawn, spool_dir)
    assert len(pids) == 2 and server.process.pid not in pids
    # The kernel spreads new connections over both processes' accept queues.
    assert health_pids(server.port, pids) == pids
    upload = httpx.post(f"{server.url}/api/v1/upload", content=EVENTS, timeout=10, verify=False)
    assert upload.status_code == 200 and upload.json()["sha256"] == hashlib.sha256(EVENTS).hexdigest()
    run_dirs = [path for path in spool_dir.iterdir() if path.name.endswith(RUN_DIR_SUFFIX)]
    assert len(run_dirs) == 1 and run_dirs[0].is_dir()  # the children's shared directory for this run

    code, took = stop(server, timeout=10)
    assert code == 0, server.stderr_text()
    assert took < 5, took
    assert leftovers(spool_dir) == []  # the run directory is gone too
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    assert "Traceback" not in server.stderr_text()


def test_a_serving_process_that_dies_is_replaced_while_the_other_serves(
    spawn: Spawn, spool_dir: Path
) -> None:
    server, pids = start_supervised(spawn, spool_dir)
    victim, survivor = sorted(pids)
    os.kill(victim, signal.SIGKILL)
    server.wait_for(re.compile(rf"serving process {victim} ended with signal SIGKILL; starting another"), 5)
    # Meanwhile the port is served (by the survivor, or already by the replacement): nothing is refused.
    seen = health_pids(server.port, {survivor}, tries=20)
    assert survivor in seen and victim not in seen
    replacement = int(server.wait_for(re.compile(r"\[(\d+)\]: upload-server listening on"), 30).group(1))
    assert replacement not in pids
    assert health_pids(server.port, {replacement, survivor}) == {replacement, survivor}
    code, _ = stop(server, timeout=10)
    assert code == 0, server.stderr_text()


def test_sigterm_drains_every_serving_process(spawn: Spawn, spool_dir: Path) -> None:
    drain = 3.0
    server, pids = start_supervised(spawn, spool_dir, "--drain-delay", str(drain))
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    draining: set[int] = set()
    while draining != pids and time.monotonic() - signalled < drain - 0.3:
        answer = httpx.get(
            f"{server.url}/api/v1/health", timeout=5, verify=False
        )  # still accepted, on a new connection
        if answer.json()["status"] == "draining":
            assert answer.status_code == 503
            draining.add(answer.json()["pid"])
    assert draining == pids
    code = server.process.wait(timeout=drain + 10)
    assert code == 0, server.stderr_text()
    assert time.monotonic() - signalled >= drain
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_serving_processes_drain_when_the_supervisor_is_killed(spawn: Spawn, spool_dir: Path) -> None:
    server, pids = start_supervised(spawn, spool_dir)
    server.process.kill()  # SIGKILL: the supervisor passes nothing on; the kernel tells the children
    server.process.wait(timeout=5)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        assert time.monotonic() < deadline, f"serving processes outlived their supervisor: {pids}"
        time.sleep(0.05)
    text = server.stderr_text()
    assert text.count("SIGTERM: shutting down gracefully") == 2, text
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_a_taken_port_stops_the_supervisor_before_any_child_starts(spool_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = server_command(spool_dir, "--processes", "2", "--port", str(port))
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, env=clean_env())
    assert result.returncode == 1
    assert f"cannot start on 127.0.0.1:{port}" in result.stderr and "in use" in result.stderr.lower()
    assert "Traceback" not in result.stderr and "listening on" not in result.stderr


def supervise_fake(child: str, spool_dir: Path) -> subprocess.Popen[str]:
    """The real supervisor, with ``fake_children.<child>`` as the serving process."""
    script = (
        "import sys, fake_children\n"
        "from upload_server.cli import configure_logging\n"
        "from upload_server.config import load_config\n"
        "from upload_server.supervisor import supervise\n"
        "config = load_config(sys.argv[2:])\n"
        "configure_logging(config)\n"
        "sys.exit(supervise(config, getattr(fake_children, sys.argv[1])))\n"
    )
    command = [sys.executable, "-c", script, child, *server_command(spool_dir, "--processes", "2")[3:]]
    env = clean_env(PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)


def test_children_that_cannot_start_make_the_supervisor_exit_non_zero(spool_dir: Path) -> None:
    supervisor = supervise_fake("never_ready", spool_dir)
    _, stderr = supervisor.communicate(timeout=30)
    assert supervisor.returncode == 1, stderr
    assert re.search(r"serving process \d could not start \(exit code 3\)", stderr), stderr
    assert "listening on" not in stderr and "Traceback" not in stderr
    assert leftovers(spool_dir) == []


def test_a_crash_loop_backs_off_instead_of_spinning(spool_dir: Path) -> None:
    supervisor = follow(supervise_fake("crash_after_ready", spool_dir))
    restart = re.compile(r"ended with exit code 1; starting another in ([\d.]+) s")
    try:
        # Generous waits: a spawned interpreter takes seconds to start on a loaded 2-core machine.
        delays = [float(supervisor.wait_for(restart, 60).group(1)) for _ in range(4)]
    finally:
        supervisor.process.send_signal(signal.SIGTERM)
        code = supervisor.process.wait(timeout=30)
    # Each of the two slots waits 0.5 s, then 1 s, then 2 s...: a crash loop never restarts at once.
    assert delays.count(0.5) == 2 and set(delays) <= {0.5, 1.0, 2.0} and max(delays) >= 1.0, delays
    assert code in (0, 1)  # 1 when a crashing child ended badly during the stop: both are a clean stop here
    assert "Traceback" not in supervisor.stderr_text()
    assert leftovers(spool_dir) == []


def test_processes_setting() -> None:
    assert load_config(["--processes", "auto"], environ={}).processes == (os.cpu_count() or 1)
    assert load_config([], environ={"UPLOAD_SERVER_PROCESSES": "3"}).processes == 3
    assert load_config([], environ={}).processes == 1
    with pytest.raises(ConfigError, match="--processes"):
        load_config(["--processes", "0"], environ={})
    with pytest.raises(ConfigError, match="is not a whole number"):
        load_config(["--processes", "many"], environ={})


def test_the_automatic_spool_budget_is_shared_by_the_serving_processes() -> None:
    free = 10 << 30
    one = derived_spool_budget(Config(min_free_bytes=1 << 30), free)
    two = derived_spool_budget(Config(min_free_bytes=1 << 30, processes=2), free)
    assert one == (9 << 30) // 2 and two == one // 2  # the processes spool to one temp dir
    assert derived_spool_budget(Config(spool_budget=1 << 20, processes=2), free) == 1 << 20
