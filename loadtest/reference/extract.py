"""Extraction for the reference peer, written the way a typical FastAPI service does it.

Everything here runs inside ``ProcessPoolExecutor`` workers: each file is read whole into memory,
decompressed whole, and parsed with ``orjson.loads``. That is the baseline the upload server is
measured against, so it is kept plain and idiomatic rather than clever, but it follows the same
extraction rules (issue 3) so that both servers give the same counts for the same upload.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import threading
import time
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

ContentKind = Literal["zip", "gzip", "json"]

BOM = b"\xef\xbb\xbf"
JSON_SUFFIXES = (".json", ".ndjson", ".jsonl")
#: Per-entry ratio limit applies only above this uncompressed size (tiny entries compress absurdly well).
RATIO_FLOOR_BYTES = 1 << 20
#: Entries are sent to the pool in batches, so 20,000 tiny entries do not cost 20,000 round trips.
BATCH_BYTES = 8 << 20
BATCH_ENTRIES = 512

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
#: Actor fields copied from the first event an actor appears in, in answer order.
ACTOR_FIELDS = ("login", "display_login", "avatar_url", "url", "gravatar_id")


class ArchiveRejected(Exception):
    """The whole upload is refused (422) with ``code``."""

    def __init__(self, code: str, message: str) -> None:
        # Both in args: the exception is pickled back from the worker and rebuilt from args.
        super().__init__(code, message)
        self.code = code
        self.message = message


def sniff(head: bytes) -> ContentKind | None:
    """Content kind from the first bytes; ``None`` when it is none of zip, gzip or JSON."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    first = head.removeprefix(BOM).lstrip(b" \t\r\n")[:1]
    if first in (b"{", b"["):
        return "json"
    return None


@dataclass
class Job:
    """One file to extract: a zip member (``member`` set) or the whole upload."""

    name: str
    member: str | None = None
    gunzip: bool = False


@dataclass
class Plan:
    """What the central directory says: batches of jobs to run, and entries left out."""

    batches: list[list[Job]] = field(default_factory=list)
    ignored: list[dict[str, str]] = field(default_factory=list)


def _ignore_reason(info: zipfile.ZipInfo) -> str | None:
    """Why a zip entry is not processed, or ``None`` when it is a JSON file to extract.

    The reasons and the rules are upload-server's; tests/corpus/ holds the archives both are checked on.
    """
    name = info.filename
    if info.is_dir() or name.endswith("\\"):
        return "directory"
    parts = name.replace("\\", "/").split("/")
    if "__MACOSX" in parts:
        return "macos_metadata"
    base = parts[-1]
    if base.startswith("."):
        return "hidden_file"
    lower = base.lower()
    if lower.endswith(".zip"):
        return "nested_archive"
    if lower.removesuffix(".gz").endswith(JSON_SUFFIXES):
        return None
    return "unsupported_name"


def plan_zip(path: str, max_entries: int, max_total: int, max_ratio: float) -> Plan:
    """Read the central directory, apply the archive limits, and batch the JSON entries.

    Runs in a worker too: a 20,000-entry directory takes long enough to stall the event loop.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ArchiveRejected("BAD_ZIP", f"not a readable zip archive: {exc}") from None
    if len(infos) > max_entries:
        raise ArchiveRejected("ZIP_BOMB", f"{len(infos)} entries, more than the limit of {max_entries}")
    total = sum(i.file_size for i in infos)
    if total > max_total:
        raise ArchiveRejected("ZIP_BOMB", f"{total} uncompressed bytes, more than the limit of {max_total}")
    for info in infos:
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > RATIO_FLOOR_BYTES and ratio > max_ratio:
            raise ArchiveRejected("ZIP_BOMB", f"entry {info.filename!r} expands {ratio:.0f}:1")
    # Overlapping entries (several names sharing one compressed stream) are the classic zip bomb.
    spans = sorted((i.header_offset, i.header_offset + i.compress_size) for i in infos)
    for (_, end), (start, _) in itertools.pairwise(spans):
        if start < end:
            raise ArchiveRejected("ZIP_BOMB", "overlapping entries")

    plan = Plan()
    batch: list[Job] = []
    batch_bytes = 0
    for info in infos:
        reason = _ignore_reason(info)
        if reason is not None:
            plan.ignored.append({"name": info.filename, "reason": reason})
            continue
        batch.append(Job(info.filename, info.filename, info.filename.lower().endswith(".gz")))
        batch_bytes += info.file_size
        if batch_bytes >= BATCH_BYTES or len(batch) >= BATCH_ENTRIES:
            plan.batches.append(batch)
            batch, batch_bytes = [], 0
    if batch:
        plan.batches.append(batch)
    if not plan.batches:
        raise ArchiveRejected("NO_JSON_FILES", "the archive holds no .json, .ndjson or .jsonl file")
    return plan


class BadJson(ValueError):
    """A file that is not valid JSON in any of the accepted layouts (``code`` as upload-server names it)."""

    def __init__(
        self, message: str, line: int | None, layout: str = "ndjson", code: str = "INVALID_JSON"
    ) -> None:
        super().__init__(message)
        self.line = line
        self.layout = layout
        self.code = code


def parse_values(data: bytes) -> tuple[str, list[Any]]:
    """Split one file into its top-level JSON values: ``(layout, values)``.

    Tries the whole document first (array or single object), then one value per line, then
    concatenated values (``{..}{..}``, or pretty-printed objects one after another).
    """
    data = data.removeprefix(BOM)
    text_start = data.lstrip(b" \t\r\n")[:1]
    if not text_start:
        return "ndjson", []
    if text_start == b"[":
        try:
            return "array", orjson.loads(data)
        except orjson.JSONDecodeError:
            # The json module tells nesting too deep (RecursionError) from malformed text.
            values = _concatenated(data)
            if len(values) != 1 or not isinstance(values[0], list):
                raise BadJson("trailing data after the top-level array", None, "array") from None
            return "array", values[0]
    try:
        return "object", [orjson.loads(data)]
    except orjson.JSONDecodeError:
        pass
    values: list[Any] = []
    try:
        for line in data.splitlines():
            if line.strip():
                values.append(orjson.loads(line))
        return "ndjson", values
    except orjson.JSONDecodeError:
        pass
    return "ndjson", _concatenated(data)


def _concatenated(data: bytes) -> list[Any]:
    """Values written back to back, with any whitespace (or none) between them."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadJson(f"not UTF-8: {exc}", None) from None
    decoder = json.JSONDecoder()
    values: list[Any] = []
    pos, end = 0, len(text)
    try:
        while True:
            while pos < end and text[pos] in " \t\r\n":
                pos += 1
            if pos == end:
                return values
            value, pos = decoder.raw_decode(text, pos)
            values.append(value)
    except json.JSONDecodeError as exc:
        raise BadJson(exc.msg, exc.lineno) from None
    except RecursionError:
        raise BadJson("nested too deeply", text.count("\n", 0, pos) + 1, code="JSON_TOO_DEEP") from None


def extract_file(name: str, data: bytes, want_events: bool) -> dict[str, Any]:
    """Events, actors and skips of one file; all or nothing (a parse error drops its events).

    Actors come back as ``{id: [login, display_login, avatar_url, url, gravatar_id, events]}`` in
    first-seen order; event records (for the NDJSON answer) only when ``want_events``.
    """
    result: dict[str, Any] = {
        "name": name,
        "layout": "ndjson",
        "size_bytes": len(data),
        "events": 0,
        "skipped": {},
        "error": None,
        "event_types": {},
        "actors": {},
        "records": [],
    }
    try:
        layout, values = parse_values(data)
    except BadJson as exc:
        result["layout"] = exc.layout
        result["error"] = {"code": exc.code, "message": str(exc), "line": exc.line}
        return result
    except RecursionError:
        result["error"] = {"code": "JSON_TOO_DEEP", "message": "nested too deeply", "line": None}
        return result
    del data  # the raw bytes are no longer needed; the parsed values are the big part now
    result["layout"] = layout

    skipped: Counter[str] = Counter()
    types: Counter[str] = Counter()
    actors: dict[int, list[Any]] = {}
    records: list[tuple[Any, ...]] = []
    events = 0
    for event in values:
        if not isinstance(event, dict):
            skipped["not_an_object"] += 1
            continue
        events += 1
        etype = event.get("type")
        types[etype if isinstance(etype, str) else "<missing>" if etype is None else "<non-string>"] += 1
        actor = event.get("actor")
        actor_id = actor.get("id") if isinstance(actor, dict) else None
        # bool is an int subclass in Python: a JSON true is not an id. Ids stay in the signed 64-bit range.
        if type(actor_id) is not int or not INT64_MIN <= actor_id <= INT64_MAX:
            skipped["no_actor" if actor is None else "invalid_actor"] += 1
            actor_id = None
            login = None
        else:
            entry = actors.get(actor_id)
            if entry is None:
                entry = actors[actor_id] = [actor.get(f) for f in ACTOR_FIELDS] + [0]
            entry[-1] += 1
            login = entry[0]
        if want_events:
            repo = event.get("repo")
            records.append(
                (
                    event.get("id"),
                    etype,
                    event.get("created_at"),
                    actor_id,
                    login,
                    repo.get("name") if isinstance(repo, dict) else None,
                )
            )
    result.update(
        events=events,
        skipped=dict(skipped),
        event_types=dict(types),
        actors=actors,
        records=records,
    )
    return result


def extract_batch(path: str, kind: ContentKind, jobs: list[Job], want_events: bool) -> list[dict[str, Any]]:
    """Pool entry point: read each job's bytes whole (decompressing whole) and extract it."""
    results: list[dict[str, Any]] = []
    if kind != "zip":
        with open(path, "rb") as f:
            data = f.read()
        job = jobs[0]
        try:
            if kind == "gzip":
                data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            return [_failed(job.name, "BAD_COMPRESSED_DATA", str(exc))]
        return [extract_file(job.name, data, want_events)]

    with zipfile.ZipFile(path) as zf:
        for job in jobs:
            assert job.member is not None
            info = zf.getinfo(job.member)
            if info.flag_bits & 0x1:
                results.append(_failed(job.name, "ENCRYPTED_ENTRY", "encrypted entries are not supported"))
                continue
            try:
                data = zf.read(info)
                if job.gunzip:
                    data = gzip.decompress(data)
            except NotImplementedError as exc:
                results.append(_failed(job.name, "UNSUPPORTED_COMPRESSION", str(exc)))
                continue
            except (OSError, EOFError, zipfile.BadZipFile, RuntimeError, zlib.error) as exc:
                results.append(_failed(job.name, "BAD_COMPRESSED_DATA", str(exc)))
                continue
            results.append(extract_file(job.name, data, want_events))
    return results


def _failed(name: str, code: str, message: str) -> dict[str, Any]:
    """The result of a file that could not even be read."""
    return {
        "name": name,
        "layout": None,
        "size_bytes": 0,
        "events": 0,
        "skipped": {},
        "error": {"code": code, "message": message, "offset": None},
        "event_types": {},
        "actors": {},
        "records": [],
    }


def init_worker(server_pid: int) -> None:
    """Pool initializer: exit when the server is gone.

    A server killed outright (SIGKILL, OOM) never tells its pool to stop, and forkserver workers are
    not its children, so without this they would linger on a shared machine holding their memory.
    """

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(server_pid, 0)
            except ProcessLookupError:
                os._exit(0)

    threading.Thread(target=watch, name="server-watchdog", daemon=True).start()


def warm_up() -> int:
    """Run once per worker at start-up so the pool's processes exist before the first upload."""
    return os.getpid()
