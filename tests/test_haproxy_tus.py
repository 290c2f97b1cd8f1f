"""Resumable uploads behind HAProxy (deploy/haproxy.cfg) with two instances: each upload's requests reach
the instance that created it, through the stick table keyed on the creation's Location. haproxy must be
installed (.ci/run installs it): missing, this fails."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx

from events_factory import as_ndjson, make_events
from server_process import Spawn, clean_env, server_command

ROOT = Path(__file__).resolve().parent.parent
TUS = {"Tus-Resumable": "1.0.0"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_haproxy(haproxy: str, app1: int, app2: int) -> tuple[subprocess.Popen[bytes], int]:
    """HAProxy in front of the two instances, and its port. A port found free can be taken by another
    process before HAProxy binds it (the suite runs in parallel): HAProxy then exits at once, and is started
    again on other ports, three times at most."""
    for _ in range(3):
        front, stats = free_port(), free_port()
        env = clean_env(
            HAPROXY_BIND=f"127.0.0.1:{front}",
            HAPROXY_STATS=f"127.0.0.1:{stats}",
            APP1=f"127.0.0.1:{app1}",
            APP2=f"127.0.0.1:{app2}",
            CHECK_INTER="100ms",
        )
        proxy = subprocess.Popen(
            [haproxy, "-f", str(ROOT / "deploy" / "haproxy.cfg"), "-db"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while proxy.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", front), timeout=1).close()
                return proxy, front
            except OSError:
                time.sleep(0.05)
        proxy.kill()
        proxy.wait()
    raise AssertionError("HAProxy did not start listening on three pairs of free ports")


def test_every_request_of_an_upload_reaches_the_instance_that_holds_it(spawn: Spawn, tmp_path: Path) -> None:
    haproxy = shutil.which("haproxy")
    assert haproxy, "haproxy is not on PATH: .ci/run installs it (apt-get install haproxy)"
    instances = []
    for name in ("a", "b"):
        spool = tmp_path / name
        spool.mkdir()
        instances.append(spawn(server_command(spool, "--workers", "1")))
    proxy, front = start_haproxy(haproxy, instances[0].port, instances[1].port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{front}", timeout=30, verify=False) as client:
            deadline = time.monotonic() + 15
            while True:  # both instances in rotation
                try:
                    pids = {client.get("/api/v1/health").json()["pid"] for _ in range(6)}
                except httpx.HTTPError:
                    pids = set()
                if len(pids) == 2 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert len(pids) == 2, "HAProxy did not take both instances into rotation"
            urls = []
            for n in range(6):  # leastconn spreads the creations over both instances
                events, truth = make_events(20 + n, seed=n)
                body = as_ndjson(events)
                created = client.post("/api/v1/files", headers={**TUS, "Upload-Length": str(len(body))})
                assert created.status_code == 201
                url = created.headers["location"]
                for offset in range(0, len(body), 1000):
                    answer = client.patch(
                        url,
                        content=body[offset : offset + 1000],
                        headers={
                            **TUS,
                            "Upload-Offset": str(offset),
                            "Content-Type": "application/offset+octet-stream",
                        },
                    )
                    assert answer.status_code == 204, answer.text
                    assert client.head(url, headers=TUS).status_code == 200
                urls.append((url, truth))
            holders = set()
            for url, truth in urls:
                while (result := client.get(f"{url}/result")).status_code == 202:
                    time.sleep(0.05)
                assert result.status_code == 200, result.text
                assert result.json()["summary"]["events"] == truth.events
                holders.add(
                    next(path.parent.parent.name for path in tmp_path.rglob(f"{url.rsplit('/', 1)[1]}.json"))
                )
            assert holders == {"a", "b"}  # the uploads were spread, and each was served where it lives
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)
