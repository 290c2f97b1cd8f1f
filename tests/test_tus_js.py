"""tus-js-client (npm, run under node) against the real server: an upload interrupted half way and resumed
from its URL by a fresh client, as a page reload would. CI installs the client with ``npm ci`` in
tests/js (see .ci/run); without it this test fails rather than skips."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import httpx
import trio

from conftest import StartServer
from test_tus import FILES, dataset, result_when_ready

JS = Path(__file__).parent / "js"


async def test_tus_js_client_resumes_an_interrupted_upload(start_server: StartServer, tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node, "node is not installed"
    assert (JS / "node_modules" / "tus-js-client").is_dir(), "run: cd tests/js && npm ci"
    server = await start_server()
    body, truth = dataset(files=4, events=1500)
    source = tmp_path / "day.zip"
    source.write_bytes(body)
    chunk = 128 << 10
    done = await trio.run_process(
        [
            node,
            str(JS / "tus_upload.mjs"),
            f"{server.url}{FILES}",
            str(source),
            str(chunk),
            str(len(body) // 2),
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert report["size"] == len(body)
    assert len(body) // 2 <= report["resumedFrom"] < len(body)  # resumed, not started over
    url = report["url"]
    async with httpx.AsyncClient(timeout=30, verify=False) as client:
        answer = await result_when_ready(client, url)
    assert answer.status_code == 200, answer.text
    assert answer.json()["sha256"] == hashlib.sha256(body).hexdigest()
    assert answer.json()["summary"]["events"] == truth.events
    assert answer.json()["files"][0]["name"].startswith("hour-")
