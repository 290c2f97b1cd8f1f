"""The command line as a real subprocess: start-up, a real client, SIGTERM, refusals of bad settings."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from server_process import EVENTS, Spawn, clean_env, leftovers, server_command, stop
from upload_server.config import SETTINGS, env_name, flag_name

CONSOLE_SCRIPT = Path(sys.executable).with_name("upload-server")
#: A wait the server must NOT do (a grace, a keep-alive): these tests assert a stop took under half of it.
#: A stop that does not wait takes well under 1 s on an idle machine, but over 5 s was seen with the suite
#: in parallel at load 18 on 2 cores, so the bounds are taken from the wait they rule out, made long, instead
#: of from how fast this machine happens to be (they were 2 and 3 s, which flaked under load).
LONG_WAIT = 40.0


def fetch(url: str, *curl_args: str) -> tuple[int, bytes]:
    """Status and body, with curl when the machine has it (a client we did not write), else httpx."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    result = subprocess.run(
        [curl, "-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}", *curl_args, url],
        capture_output=True,
        check=True,
        timeout=20,
    )
    body, _, status = result.stdout.rpartition(b"\n")
    return int(status), body


# ------------------------------------------------------------------------------------- a real run
def test_console_script_serves_real_clients_and_stops_on_sigterm(
    spawn: Spawn, spool_dir: Path, tmp_path: Path
) -> None:
    assert CONSOLE_SCRIPT.exists(), "the upload-server console script is not installed in this environment"
    server = spawn(
        [
            str(CONSOLE_SCRIPT),
            "--port",
            "0",
            "--tmp-dir",
            str(spool_dir),
            "--workers",
            "1",
            "--drain-delay",
            "0",
            "--shutdown-grace",
            str(LONG_WAIT),
        ]
    )

    if shutil.which("curl"):
        status, body = fetch(f"{server.url}/api/v1/health")
        assert status == 200 and json.loads(body)["status"] == "ok"
        events = tmp_path / "events.json"
        events.write_bytes(EVENTS)
        status, body = fetch(
            f"{server.url}/api/v1/upload",
            "--data-binary",
            f"@{events}",
            "-H",
            "Content-Type: application/json",
        )
        receipt = json.loads(body)
        assert status == 200, receipt
        assert receipt["sha256"] == hashlib.sha256(EVENTS).hexdigest() and receipt["size_bytes"] == len(
            EVENTS
        )
        status, body = fetch(f"{server.url}/api/v1/upload", "-F", f"file=@{events}")
        assert status == 200 and json.loads(body)["sha256"] == hashlib.sha256(EVENTS).hexdigest()
    else:
        with httpx.Client(base_url=server.url, verify=False) as client:
            assert client.get("/api/v1/health").json()["status"] == "ok"
            receipt = client.post("/api/v1/upload", content=EVENTS).json()
            assert receipt["sha256"] == hashlib.sha256(EVENTS).hexdigest()

    code, took = stop(server)
    assert code == 0, server.stderr_text()
    assert took < LONG_WAIT / 2, took  # nothing in flight: it did not wait out the grace
    stderr = server.stderr_text()
    assert re.search(r"POST /api/v1/upload HTTP/1\.1 200 in=\d+ out=\d+", stderr), stderr
    assert "Traceback" not in stderr
    assert leftovers(spool_dir) == []


@pytest.mark.parametrize("first_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_with_an_upload_in_flight_waits_the_grace_then_cleans_up(
    spawn: Spawn, spool_dir: Path, first_signal: signal.Signals
) -> None:
    """SIGTERM or SIGINT (Ctrl-C) first: a graceful stop either way."""
    grace = 0.5
    server = spawn(server_command(spool_dir, "--shutdown-grace", str(grace)))
    with socket.create_connection(("127.0.0.1", server.port)) as client:
        head = f"POST /api/v1/upload HTTP/1.1\r\nHost: x\r\nContent-Length: {len(EVENTS)}\r\n\r\n"
        client.sendall(head.encode() + EVENTS[:100])
        deadline = time.monotonic() + 5
        while not leftovers(spool_dir) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert leftovers(spool_dir), "the upload never reached the spool"
        code, took = stop(server, first_signal)
    assert code == 0, server.stderr_text()
    # At least the grace; the upper bound only tells "stopped after the grace" from "waited for the upload",
    # which never ends (the exit alone took over 5 s with the suite in parallel at load 18 on 2 cores).
    assert grace - 0.1 <= took < LONG_WAIT / 2, took
    assert leftovers(spool_dir) == []
    assert "shutting down gracefully" in server.stderr_text()
    assert "Traceback" not in server.stderr_text()


def test_second_signal_stops_at_once(spawn: Spawn, spool_dir: Path) -> None:
    server = spawn(server_command(spool_dir, "--shutdown-grace", str(LONG_WAIT)))
    with socket.create_connection(("127.0.0.1", server.port)) as client:
        head = f"POST /api/v1/upload HTTP/1.1\r\nHost: x\r\nContent-Length: {len(EVENTS)}\r\n\r\n"
        client.sendall(head.encode() + EVENTS[:100])
        server.process.send_signal(signal.SIGTERM)
        server.wait_for(re.compile("shutting down"), 5)
        code, took = stop(server, signal.SIGINT)
    assert code == 0, server.stderr_text()
    assert took < LONG_WAIT / 2, took  # the grace was cut short
    assert leftovers(spool_dir) == []


# ------------------------------------------------------------------------------------ help, refusals
def test_help_lists_every_flag_with_its_default_and_variable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "upload_server", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for setting in SETTINGS:
        assert flag_name(setting) in text
        assert env_name(setting) in text
    assert "(default: 8000;" in text and "(default: 127.0.0.1;" in text


def run_refused(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the server with a setting it must refuse: it exits at once, non-zero, without a traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "upload_server", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(**env),
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert "listening on" not in result.stderr
    return result


def test_bad_environment_value_exits_with_a_clear_message(tmp_path: Path) -> None:
    result = run_refused("--tmp-dir", str(tmp_path), UPLOAD_SERVER_PORT="notaport")
    assert result.returncode == 2
    assert "UPLOAD_SERVER_PORT" in result.stderr and "'notaport' is not a whole number" in result.stderr


def test_missing_tmp_dir_exits_with_a_clear_message() -> None:
    result = run_refused("--port", "0", "--tmp-dir", "/nonexistent/upload-server-tmp")
    assert result.returncode == 2
    assert "--tmp-dir" in result.stderr and "must be an existing directory" in result.stderr


def test_unknown_flag_exits_with_usage() -> None:
    result = run_refused("--no-such-flag")
    assert result.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in result.stderr


def test_port_in_use_exits_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_refused("--port", str(port), "--tmp-dir", str(tmp_path))
    assert f"127.0.0.1:{port}" in result.stderr
    assert "in use" in result.stderr.lower()


def test_sigterm_right_after_the_listening_line_is_a_graceful_stop(spawn: Spawn, spool_dir: Path) -> None:
    """A supervisor may signal as soon as it sees the server listening: that must already be handled."""
    server = spawn(server_command(spool_dir, "--workers", "1"))
    code, _ = stop(server)
    assert code == 0, server.stderr_text()
    assert "shutting down gracefully" in server.stderr_text()


def test_sigterm_does_not_wait_for_idle_keep_alive_connections(spawn: Spawn, spool_dir: Path) -> None:
    """Load balancers and client pools hold idle connections open; shutdown closes them at once."""
    wait = str(LONG_WAIT)  # idle connections held open this long, or in flight for the grace: not waited for
    server = spawn(server_command(spool_dir, "--keepalive-timeout", wait, "--shutdown-grace", wait))
    with httpx.Client(base_url=server.url, verify=False) as client:
        assert client.get("/api/v1/health").status_code == 200  # the connection stays in the pool
        code, took = stop(server)
    assert code == 0, server.stderr_text()
    assert took < LONG_WAIT / 2, took


def with_file_size_limit(limit: int, command: list[str]) -> list[str]:
    """``command`` run under RLIMIT_FSIZE = ``limit`` bytes: every file it writes stops growing there, as on a
    full disk (Python ignores SIGXFSZ, so the write fails with EFBIG)."""
    setup = f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
    return [sys.executable, "-c", setup + "os.execv(sys.argv[1], sys.argv[1:])", *command]


def _big_json_upload() -> tuple[bytes, str]:
    """4 MB of JSON: the spool file itself passes 1 MiB while receiving."""
    body = json.dumps([{"id": str(n), "payload": "x" * 1000} for n in range(4000)]).encode()
    assert len(body) > 3 << 20
    return body, "application/json"


def _many_actors_upload() -> tuple[bytes, str]:
    """Under 1 MiB gzipped, 150,000 distinct actors: the worker's results (its actors spilled as sorted runs
    past 139,810 at the default budget) pass 1 MiB."""
    lines = b"".join(b'{"actor":{"id":%d,"login":"u%d"}}\n' % (n, n) for n in range(150_000))
    body = gzip.compress(lines, compresslevel=9)
    assert len(body) < 1 << 20 < len(lines) // 4
    return body, "application/gzip"


@pytest.mark.parametrize("make_upload", [_big_json_upload, _many_actors_upload], ids=["receiving", "worker"])
def test_a_temp_dir_that_fills_up_is_507(
    spawn: Spawn, spool_dir: Path, make_upload: Callable[[], tuple[bytes, str]]
) -> None:
    """No file may grow past 1 MiB, as on a full disk: the spool while receiving, or a worker's results
    while it writes its actor runs. 507 INSUFFICIENT_STORAGE (not a 500), every file removed, and a small
    upload still works."""
    server = spawn(with_file_size_limit(1 << 20, server_command(spool_dir, "--workers", "1")))
    body, content_type = make_upload()
    with httpx.Client(base_url=server.url, timeout=60, verify=False) as client:
        response = client.post("/api/v1/upload", content=body, headers={"content-type": content_type})
        assert response.status_code == 507, response.text
        assert response.json()["error"]["code"] == "INSUFFICIENT_STORAGE"
        assert leftovers(spool_dir) == []
        small = client.post("/api/v1/upload", content=EVENTS, headers={"content-type": "application/json"})
        assert small.status_code == 200, small.text
    code, _ = stop(server)
    assert code == 0, server.stderr_text()
    assert "Traceback" not in server.stderr_text()
