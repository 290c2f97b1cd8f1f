"""Locust scenario for the upload API, shared by upload-server and the reference peer.

Three kinds of users:

* ``Uploader``: posts datasets made by ``loadtest/gen_dataset.py`` as multipart (field ``file``) and as a
  raw body, and checks the JSON answer against the dataset's ``.expected.json``.
* ``LoadBalancer``: polls ``/api/v1/health`` fast (GET, sometimes HEAD), like a load balancer would.
* ``Streamer``: asks for ``Accept: application/x-ndjson``, reads the whole chunked stream, counts event
  and actor lines and checks the final summary line. Its response time is the full stream, not the
  time to the first byte.

Configuration (environment variables):

``LOADTEST_DATA_DIR``        datasets, each with its ``<name>.expected.json`` (default ``loadtest/data``)
``LOADTEST_DATASETS``        comma list of dataset file names (default: every one in the folder under 128 MiB)
``LOADTEST_WEIGHT_UPLOAD``   user weights (defaults 3, 1, 1)
``LOADTEST_WEIGHT_HEALTH``
``LOADTEST_WEIGHT_STREAM``
``LOADTEST_UPLOAD_WAIT``     "min,max" seconds between an uploader's requests (default "0,0.5")
``LOADTEST_HEALTH_INTERVAL`` seconds between health polls of one load-balancer user (default 0.05)
``LOADTEST_TIMEOUT``         network timeout for uploads, seconds (default 300)
``LOADTEST_STOP_AFTER``      stop the run once uploads, health polls and streams have each been made this
                             many times (default 0: run for the whole ``-t``)

Every dataset is read once into bytes at start-up (and its multipart body built once), so the load
generator spends its CPU on the wire, not on disk or encoding: it shares the machine with the server.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import locust.stats
import orjson
from locust import between, constant, events, task
from locust.contrib.fasthttp import FastHttpUser
from locust.env import Environment

UPLOAD_PATH = "/api/v1/upload"
HEALTH_PATH = "/api/v1/health"
NDJSON = "application/x-ndjson"
BOUNDARY = "locust-upload-boundary-7f3a9c"
#: gen_dataset kinds → the ``content_kind`` the server must report after sniffing.
CONTENT_KIND = {"zip": "zip", "gz": "gzip", "ndjson": "json", "json-array": "json"}
#: Event lines are counted without parsing when they carry this exact marker (how orjson writes them);
#: any other line is parsed, so a different layout is still counted correctly, only slower.
EVENT_MARKER = b'"kind":"event"'


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


@dataclass(frozen=True)
class Dataset:
    """One upload, held in memory: raw bytes, its prebuilt multipart body, and what it must count to."""

    name: str
    raw: bytes
    multipart: bytes
    expected: dict[str, Any]

    @property
    def content_kind(self) -> str | None:
        return CONTENT_KIND.get(self.expected.get("kind", ""))


def _multipart_body(filename: str, data: bytes) -> bytes:
    head = (
        f"--{BOUNDARY}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


#: Found datasets above this size are left out unless named: the folder is shared with benchmarks
#: that keep a 1 GiB file there, and every locust process holds its datasets in memory twice.
DISCOVER_MAX_BYTES = 128 << 20


def load_datasets(folder: Path, names: list[str] | None = None) -> list[Dataset]:
    """Read the named datasets, or every ``<name>`` with a ``<name>.expected.json`` beside it."""
    suffix = ".expected.json"
    if names is None:
        found = (folder / p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}"))
        names = sorted(p.name for p in found if p.exists() and p.stat().st_size <= DISCOVER_MAX_BYTES)
    datasets = []
    for name in names:
        path = folder / name
        expected = orjson.loads((folder / (name + suffix)).read_bytes())
        raw = path.read_bytes()
        datasets.append(Dataset(name, raw, _multipart_body(name, raw), expected))
    if not datasets:
        raise SystemExit(
            f"no datasets in {folder} (expected <name> + <name>.expected.json); "
            "run loadtest/run_locust.py, or loadtest/gen_dataset.py --out ..."
        )
    return datasets


def check_answer(doc: dict[str, Any], ds: Dataset) -> str | None:
    """Why a JSON answer does not match the dataset, or ``None`` when it does."""
    exp = ds.expected
    summary = doc.get("summary") or {}
    problems = []
    for key in ("events", "unique_actors", "files"):
        if summary.get(key) != exp[key]:
            problems.append(f"{key} {summary.get(key)!r} != {exp[key]!r}")
    if summary.get("event_types") != exp["event_types"]:
        problems.append("event_types differ")  # the whole dict would drown locust's failure table
    if summary.get("files_failed") != 0:
        problems.append(f"files_failed {summary.get('files_failed')!r}")
    if doc.get("size_bytes") != len(ds.raw):
        problems.append(f"size_bytes {doc.get('size_bytes')!r} != {len(ds.raw)}")
    if ds.content_kind and doc.get("content_kind") != ds.content_kind:
        problems.append(f"content_kind {doc.get('content_kind')!r} != {ds.content_kind!r}")
    actors = doc.get("actors")
    if not isinstance(actors, list) or len(actors) != exp["unique_actors"]:
        problems.append("actors list missing or of the wrong length")
    elif sum(a["events"] for a in actors) != exp["events"]:
        # Every generated event has an actor, so the per-actor counts must add up to all events.
        problems.append("actor event counts do not add up to the events")
    return "; ".join(problems) or None


def check_stream(counts: dict[str, int], last: dict[str, Any] | None, ds: Dataset) -> str | None:
    """Why an NDJSON answer does not match the dataset, or ``None`` when it does."""
    exp = ds.expected
    if last is None or last.get("kind") != "summary":
        return f"last line is not a summary: {str(last)[:120]}"
    summary = last.get("summary", last)  # the summary fields may be nested or at the top of the line
    problems = []
    if counts.get("event", 0) != exp["events"]:
        problems.append(f"event lines {counts.get('event', 0)} != {exp['events']}")
    if counts.get("actor", 0) != exp["unique_actors"]:
        problems.append(f"actor lines {counts.get('actor', 0)} != {exp['unique_actors']}")
    if counts.get("file", 0) != exp["files"]:
        problems.append(f"file lines {counts.get('file', 0)} != {exp['files']}")
    for key in ("events", "unique_actors"):
        if summary.get(key) != exp[key]:
            problems.append(f"summary {key} {summary.get(key)!r} != {exp[key]!r}")
    if counts.get("error", 0):
        problems.append(f"{counts['error']} error line(s)")
    return "; ".join(problems) or None


DATASETS = load_datasets(
    Path(os.environ.get("LOADTEST_DATA_DIR", Path(__file__).resolve().parent / "data")),
    [n.strip() for n in os.environ["LOADTEST_DATASETS"].split(",") if n.strip()]
    if os.environ.get("LOADTEST_DATASETS")
    else None,
)
_UPLOAD_WAIT = [float(x) for x in os.environ.get("LOADTEST_UPLOAD_WAIT", "0,0.5").split(",")]


_STOP_AFTER = int(os.environ.get("LOADTEST_STOP_AFTER", "0"))
_made: Counter[str] = Counter()
if _STOP_AFTER:
    # locust writes its CSVs every CSV_STATS_INTERVAL_SEC (1 s) and not again at exit: a short run must
    # have them written more often, and quit only after one more write (locust's documented knob).
    locust.stats.CSV_STATS_INTERVAL_SEC = 0.2


def request_kind(name: str) -> str:
    """``upload``, ``health`` or ``stream``: the three kinds of request the users make."""
    if name.startswith("health"):
        return "health"
    return "stream" if name.startswith("upload stream") else "upload"


@events.request.add_listener
def _stop_once_every_kind_ran(name: str, context: Any, **_: Any) -> None:
    """With LOADTEST_STOP_AFTER, a smoke run ends as soon as it has shown what it must, not after ``-t``."""
    _made[request_kind(name)] += 1
    if _STOP_AFTER and all(_made[kind] >= _STOP_AFTER for kind in ("upload", "health", "stream")):
        runner = _environment.runner if _environment else None
        if runner is not None:
            # Not from inside this user's greenlet, which quit() kills; after the CSVs were written again.
            gevent.spawn_later(2 * locust.stats.CSV_STATS_INTERVAL_SEC, runner.quit)


_environment: Environment | None = None


@events.init.add_listener
def _keep_environment(environment: Environment, **_: Any) -> None:
    global _environment
    _environment = environment


class Uploader(FastHttpUser):
    """Posts whole datasets, multipart or raw, and checks every count in the answer."""

    weight = int(os.environ.get("LOADTEST_WEIGHT_UPLOAD", 3))
    wait_time = between(_UPLOAD_WAIT[0], _UPLOAD_WAIT[-1])
    network_timeout = _env_float("LOADTEST_TIMEOUT", 300)
    connection_timeout = 10.0

    def _upload(self, ds: Dataset, body: bytes, content_type: str, label: str) -> None:
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        with self.client.post(
            UPLOAD_PATH, data=body, headers=headers, name=f"upload {label} {ds.name}", catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}: {(resp.text or '')[:200]}")
                return
            try:
                doc = orjson.loads(resp.content or b"")
            except orjson.JSONDecodeError as exc:
                resp.failure(f"answer is not JSON: {exc}")
                return
            problem = check_answer(doc, ds)
            if problem:
                resp.failure(problem)
            # The server's own split of the time (receive, queue, process), for locust_record.py.
            resp.request_meta["context"]["timing_ms"] = doc.get("timing_ms")

    @task
    def upload_multipart(self) -> None:
        ds = random.choice(DATASETS)
        self._upload(ds, ds.multipart, f"multipart/form-data; boundary={BOUNDARY}", "multipart")

    @task
    def upload_raw(self) -> None:
        ds = random.choice(DATASETS)
        self._upload(ds, ds.raw, "application/octet-stream", "raw")


class LoadBalancer(FastHttpUser):
    """Polls health the way a load balancer does: often, and expecting a fast, small answer."""

    weight = int(os.environ.get("LOADTEST_WEIGHT_HEALTH", 1))
    wait_time = constant(_env_float("LOADTEST_HEALTH_INTERVAL", 0.05))
    network_timeout = 10.0
    connection_timeout = 5.0

    @task(5)
    def health(self) -> None:
        with self.client.get(HEALTH_PATH, name="health GET", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
                return
            try:
                status = orjson.loads(resp.content or b"").get("status")
            except (orjson.JSONDecodeError, AttributeError) as exc:
                resp.failure(f"health answer is not a JSON object: {exc}")
                return
            if status != "ok":
                resp.failure(f"status field {status!r}")

    @task(1)
    def health_head(self) -> None:
        with self.client.request("HEAD", HEALTH_PATH, name="health HEAD", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
            elif resp.content:
                resp.failure("HEAD answer has a body")


class Streamer(FastHttpUser):
    """Asks for the NDJSON answer and reads it to the end, line by line."""

    weight = int(os.environ.get("LOADTEST_WEIGHT_STREAM", 1))
    wait_time = between(_UPLOAD_WAIT[0], _UPLOAD_WAIT[-1])
    network_timeout = _env_float("LOADTEST_TIMEOUT", 300)
    connection_timeout = 10.0

    @task
    def upload_stream(self) -> None:
        ds = random.choice(DATASETS)
        headers = {"Content-Type": "application/octet-stream", "Accept": NDJSON}
        started = time.perf_counter()
        with self.client.post(
            UPLOAD_PATH,
            data=ds.raw,
            headers=headers,
            name=f"upload stream {ds.name}",
            stream=True,
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
                return
            if NDJSON not in (resp.headers.get("content-type") or ""):
                resp.failure(f"content-type {resp.headers.get('content-type')!r}")
                return
            counts: dict[str, int] = {}
            last: dict[str, Any] | None = None
            size = 0
            buffer = b""
            try:
                for chunk in resp.iter_content(chunk_size=1 << 16, decode_content=False):
                    size += len(chunk)
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if EVENT_MARKER in line:
                            counts["event"] = counts.get("event", 0) + 1
                            last = None  # the summary must come after every event
                        elif line.strip():
                            last = orjson.loads(line)
                            kind = str(last.get("kind"))
                            counts[kind] = counts.get(kind, 0) + 1
            except (orjson.JSONDecodeError, AttributeError) as exc:
                resp.failure(f"a stream line is not a JSON object: {exc}")
                return
            # Report the time to read the whole stream, not just to its headers.
            resp.request_meta["response_time"] = (time.perf_counter() - started) * 1000
            resp.request_meta["response_length"] = size
            if buffer.strip():
                resp.failure("stream does not end with a newline")
                return
            problem = check_stream(counts, last, ds)
            if problem:
                resp.failure(problem)
            elif last is not None:
                resp.request_meta["context"]["timing_ms"] = last.get("timing_ms")
