"""The reference peer gives the same counts as the ground truth, so the baseline it sets is honest.

Ground truth comes from the dataset generator's own ``expected.json`` and from re-reading the
generated zip here, independently of the peer's extraction code.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from corpus_check import ARCHIVES, archive_bytes, differences

#: Needs the loadtest dependency group (conftest fails these clearly without it).
pytestmark = pytest.mark.loadtest

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")
ACTOR_FIELDS = ("login", "display_login", "avatar_url", "url", "gravatar_id")


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A reference peer on a free port, with one worker: enough here, and kind to a shared machine."""
    tmp = tmp_path_factory.mktemp("spool")
    cmd = [sys.executable, "-m", "loadtest.reference", "--port", "0", "--workers", "1", "--tmp-dir", str(tmp)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the peer prints the line within a second or two, or exits
            if m := LISTENING.search(line):
                yield m.group(1)
                break
        else:
            pytest.fail(f"reference peer exited with {proc.wait()} before listening")
    finally:
        proc.terminate()
        proc.wait(15)
        assert list(tmp.iterdir()) == [], "the peer left upload files behind"


@pytest.fixture(scope="module")
def small_zip(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, Any]]:
    """A 3-entry zip of 500 GH-like events from the project's generator, and its expected counts."""
    out = tmp_path_factory.mktemp("data") / "small.zip"
    cmd = [sys.executable, str(ROOT / "loadtest" / "gen_dataset.py"), "--out", str(out), "--kind", "zip"]
    cmd += ["--events", "500", "--files", "3", "--seed", "11"]
    subprocess.run(cmd, check=True, timeout=60, capture_output=True)
    return out.read_bytes(), json.loads(out.with_name(out.name + ".expected.json").read_text())


def recount_actors(data: bytes) -> list[dict[str, Any]]:
    """Actors as the rules define them, counted here from the zip itself: first seen, sorted by id."""
    actors: dict[int, dict[str, Any]] = {}
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for name in zf.namelist():
            for line in zf.read(name).splitlines():
                actor = json.loads(line)["actor"]
                seen = actors.setdefault(
                    actor["id"], {f: actor[f] for f in ("id", *ACTOR_FIELDS)} | {"events": 0}
                )
                seen["events"] += 1
    return [actors[k] for k in sorted(actors)]


def test_multipart_and_raw_answers_match_the_ground_truth(
    base_url: str, small_zip: tuple[bytes, dict[str, Any]]
) -> None:
    data, expected = small_zip
    with httpx.Client(base_url=base_url, timeout=30, verify=False) as client:
        multipart = client.post("/api/v1/upload", files={"file": ("small.zip", data, "application/zip")})
        raw = client.post(
            "/api/v1/upload", content=data, headers={"content-type": "application/octet-stream"}
        )
        no_actors = client.post("/api/v1/upload?actors=false", content=data)
    for resp in (multipart, raw):
        assert resp.status_code == 200, resp.text
        doc = resp.json()
        assert doc["content_kind"] == "zip"
        assert doc["size_bytes"] == len(data)
        assert doc["sha256"] == hashlib.sha256(data).hexdigest()
        summary = doc["summary"]
        assert summary["events"] == expected["events"]
        assert summary["unique_actors"] == expected["unique_actors"]
        assert summary["event_types"] == expected["event_types"]
        assert (summary["files"], summary["files_failed"], summary["files_ignored"]) == (3, 0, 0)
        assert summary["skipped"] == {}
        assert [f["events"] for f in doc["files"]] == [167, 167, 166]
        assert {f["layout"] for f in doc["files"]} == {"ndjson"}
        assert doc["actors"] == recount_actors(data)
        assert set(doc["timing_ms"]) == {"receive", "process"}
    assert no_actors.status_code == 200
    assert "actors" not in no_actors.json()
    assert no_actors.json()["summary"] == multipart.json()["summary"]


def test_ndjson_answer_streams_every_event_then_actors_files_summary(
    base_url: str, small_zip: tuple[bytes, dict[str, Any]]
) -> None:
    data, expected = small_zip
    headers = {"accept": "application/x-ndjson", "content-type": "application/zip"}
    with httpx.stream(
        "POST", f"{base_url}/api/v1/upload", content=data, headers=headers, timeout=30, verify=False
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        assert "content-length" not in resp.headers  # chunked, written as results arrive
        lines = [json.loads(line) for line in resp.iter_lines() if line]
    kinds = [line["kind"] for line in lines]
    # Every event first, then the actors, then the files, and the summary last.
    assert kinds == ["event"] * expected["events"] + ["actor"] * expected["unique_actors"] + ["file"] * 3 + [
        "summary"
    ]
    event = lines[0]
    assert set(event) == {"kind", "file", "id", "type", "created_at", "actor_id", "actor_login", "repo"}
    assert (
        sum(1 for line in lines if line["kind"] == "event" and line["type"] == "PushEvent")
        == (expected["event_types"]["PushEvent"])
    )
    assert [{k: v for k, v in a.items() if k != "kind"} for a in lines if a["kind"] == "actor"] == (
        recount_actors(data)
    )
    assert lines[-1]["events"] == expected["events"]
    assert lines[-1]["unique_actors"] == expected["unique_actors"]


def test_extraction_rules_on_a_mixed_archive(base_url: str) -> None:
    """Ignored entries, gz in zip, BOM and CRLF, skips by reason, a bad file that counts for nothing."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("__MACOSX/._a.json", b"x")
        zf.writestr("dir/", b"")
        zf.writestr(".DS_Store", b"x")
        zf.writestr("inner.zip", b"PK")
        zf.writestr("notes.txt", b"x")
        good = b'\xef\xbb\xbf{"actor": {"id": 7, "login": "b"}, "type": "W"}\r\n{"actor": {"id": 7}}\r\n'
        zf.writestr("a.json.gz", gzip.compress(good))
        zf.writestr("b.json", b'[{"actor": {"id": true}}, 5, {"actor": {"id": 3, "login": "a"}}]')
        zf.writestr("bad.ndjson", b'{"actor": {"id": 9}}\n{"actor": ')
    with httpx.Client(base_url=base_url, timeout=30, verify=False) as client:
        resp = client.post("/api/v1/upload", content=buf.getvalue())
        strict = client.post("/api/v1/upload?strict=true", content=buf.getvalue())
        not_zip = client.post("/api/v1/upload", content=b"PK\x03\x04 truncated")
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert {i["name"]: i["reason"] for i in doc["ignored"]} == {
        "__MACOSX/._a.json": "macos_metadata",
        "dir/": "directory",
        ".DS_Store": "hidden_file",
        "inner.zip": "nested_archive",
        "notes.txt": "unsupported_name",
    }
    assert doc["summary"] | {"event_types": None} == {
        "files": 3,
        "files_failed": 1,
        "files_ignored": 5,
        "events": 4,  # 2 in a.json.gz, 2 objects in b.json; nothing from bad.ndjson
        "skipped": {"invalid_actor": 1, "not_an_object": 1},
        "unique_actors": 2,
        "event_types": None,
    }
    assert [(a["id"], a["login"], a["events"]) for a in doc["actors"]] == [(3, "a", 1), (7, "b", 2)]
    (bad,) = [f for f in doc["files"] if f["error"]]
    assert (bad["name"], bad["events"], bad["error"]["line"]) == ("bad.ndjson", 0, 2)
    assert (strict.status_code, strict.json()["error"]["code"]) == (422, "FILES_FAILED")
    assert (not_zip.status_code, not_zip.json()["error"]["code"]) == (422, "BAD_ZIP")


def test_health_answers_get_and_head(base_url: str) -> None:
    get = httpx.get(f"{base_url}/api/v1/health", verify=False)
    head = httpx.head(f"{base_url}/api/v1/health", verify=False)
    assert (get.status_code, get.json()["status"]) == (200, "ok")
    assert (head.status_code, head.content) == (200, b"")


@pytest.mark.parametrize("archive", ARCHIVES)
def test_answers_match_the_shared_corpus(base_url: str, archive: str) -> None:
    """The same corpus and expectations as our server's (tests/corpus/, test_corpus.py): the peer's own rules
    give the same per-file results, skip reasons and ignore reasons."""
    response = httpx.post(
        f"{base_url}/api/v1/upload", content=archive_bytes(archive), timeout=30, verify=False
    )
    assert response.status_code == 200, response.text
    assert differences(archive, response.json()) == []
