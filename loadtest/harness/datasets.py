"""The one catalogue of datasets, made with ``gen_dataset.py`` once and cached with their expected counts."""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

import gen_dataset

from .common import DATA_DIR, GIB, MB


# -------------------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: its file name and how to make it."""

    file: str
    kind: str  # gen_dataset kind: zip, gz, ndjson, json-array
    events: int = 0  # for gen_dataset; 0 for the repeated-chunk NDJSON
    files: int = 1
    seed: int = 0
    target_bytes: int = 0  # for the repeated-chunk NDJSON


#: The one catalogue of datasets, for the benchmarks and run_locust.py alike; ``large`` is issue 3's ~100 MB
#: zip (8 NDJSON entries, ~440 MB of JSON), ``gib`` the 1 GiB NDJSON of the memory comparison; ``six`` is
#: issue 14's small upload (~6 MB, 8 entries).
DATASETS: dict[str, DatasetSpec] = {
    "tiny": DatasetSpec("tiny.zip", "zip", 300, files=2, seed=1),
    "small": DatasetSpec("small.zip", "zip", 3_000, files=4, seed=2),
    "medium": DatasetSpec("medium.zip", "zip", 30_000, files=8, seed=3),
    "large": DatasetSpec("large.zip", "zip", 330_000, files=8, seed=4),
    "twenty": DatasetSpec("twenty.zip", "zip", 63_000, files=4, seed=12),
    # Issue 14's sizes: the ~100 MB zip split into 24 mid-sized entries, a ~6 MB zip of 8 and a zip of 400
    # one-event files.
    "large24": DatasetSpec("large24.zip", "zip", 330_000, files=24, seed=13),
    "six": DatasetSpec("six.zip", "zip", 20_000, files=8, seed=15),
    "files400": DatasetSpec("files400.zip", "zip", 400, files=400, seed=14),
    # Issue 14's memory comparison, "a 1 GiB zip of many files": 24 entries of ~45 MB (~4.4 GB of JSON).
    "gib24": DatasetSpec("gib24.zip", "zip", 3_300_000, files=24, seed=16),
    "hour": DatasetSpec("hour.json.gz", "gz", 20_000, seed=5),
    "ndjson": DatasetSpec("small.ndjson", "ndjson", 3_000, seed=6),
    "array": DatasetSpec("small-array.json", "json-array", 3_000, seed=7),
    "gib": DatasetSpec("gib.ndjson", "ndjson", seed=11, target_bytes=GIB),
}

CONTENT_TYPES = {
    "zip": "application/zip",
    "gz": "application/gzip",
    "ndjson": "application/x-ndjson",
    "json-array": "application/json",
}


@dataclass(frozen=True)
class Dataset:
    """A dataset file on disk and the counts its generator wrote next to it."""

    name: str
    path: Path
    expected: dict[str, Any]

    @property
    def size(self) -> int:
        """Bytes on disk (what is uploaded)."""
        return self.path.stat().st_size

    @property
    def content_type(self) -> str:
        """The Content-Type to upload it with."""
        return CONTENT_TYPES[self.expected["kind"]]

    @property
    def events(self) -> int:
        """Events in the dataset."""
        return int(self.expected["events"])

    @property
    def json_bytes(self) -> int:
        """Uncompressed JSON bytes in the dataset."""
        return int(self.expected["uncompressed_bytes"])


def _expected_path(path: Path) -> Path:
    return path.with_name(path.name + ".expected.json")


def _cached(path: Path, spec: DatasetSpec) -> dict[str, Any] | None:
    """The expected counts when ``path`` holds the dataset ``spec`` describes, else None."""
    try:
        expected = orjson.loads(_expected_path(path).read_bytes())
        size = path.stat().st_size
    except (OSError, orjson.JSONDecodeError):
        return None
    same = (
        expected.get("compressed_bytes") == size
        and expected.get("kind") == spec.kind
        and expected.get("seed") == spec.seed
        and (spec.target_bytes or expected.get("events") == spec.events)
        and (not spec.target_bytes or expected.get("target_bytes") == spec.target_bytes)
    )
    return expected if same else None


def ensure_dataset(name: str, data_dir: Path = DATA_DIR, *, gib_bytes: int | None = None) -> Dataset:
    """The named dataset, made once and cached in ``data_dir`` (written under a temporary name, renamed).

    ``gib_bytes`` overrides the size of the ``gib`` dataset (its file name then carries the size).
    """
    spec = DATASETS[name]
    if name == "gib" and gib_bytes is not None and gib_bytes != spec.target_bytes:
        spec = DatasetSpec(f"gib-{gib_bytes}.ndjson", "ndjson", seed=spec.seed, target_bytes=gib_bytes)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / spec.file
    expected = _cached(path, spec)
    if expected is None:
        partial = data_dir / f".partial-{os.getpid()}-{spec.file}"
        started = time.perf_counter()
        try:
            if spec.target_bytes:
                expected = build_repeated_ndjson(partial, spec.target_bytes, spec.seed)
            else:
                expected = gen_dataset.write_dataset(partial, spec.kind, spec.events, spec.files, spec.seed)  # type: ignore[arg-type]
            os.replace(_expected_path(partial), _expected_path(path))
            os.replace(partial, path)
        finally:
            for leftover in (partial, _expected_path(partial)):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
        print(
            f"  made dataset {name}: {path} ({path.stat().st_size / MB:.1f} MB, "
            f"{expected['events']} events) in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
    return Dataset(name, path, expected)


def build_repeated_ndjson(
    out: Path, target_bytes: int, seed: int, chunk_events: int = 40_000
) -> dict[str, Any]:
    """Write ~``target_bytes`` of GH-like NDJSON by repeating one generated chunk with distinct event ids.

    Generating a GiB event by event takes minutes; one chunk of ``chunk_events`` events is generated and
    serialised once, then written again and again with each line's ``id`` (its first key) renumbered, so
    every event id is unique; the last copy stops at the line that reaches ``target_bytes``. The same
    actors recur in every copy, as busy accounts do over a day. Writes ``<out>.expected.json`` with the
    counts of exactly the lines written and returns it.
    """
    tails: list[bytes] = []
    types: list[str] = []
    actors: set[int] = set()
    for event in gen_dataset.generate_events(chunk_events, seed):
        line = orjson.dumps(event)
        if not line.startswith(b'{"id":"'):
            raise RuntimeError("gen_dataset no longer writes the event id first")
        tails.append(line[line.index(b'","', 7) + 1 :] + b"\n")  # from the comma after the id on
        types.append(event["type"])
        actors.add(event["actor"]["id"])
    base = 900_000_000_000 + seed * 1_000_000_000
    written = events = 0
    type_counts: Counter[str] = Counter()
    with open(out, "wb") as sink:
        copy = 0
        while written < target_bytes:
            lines = []
            for index, tail in enumerate(tails):
                line = b'{"id":"%d"' % (base + copy * chunk_events + index) + tail
                lines.append(line)
                written += len(line)
                type_counts[types[index]] += 1
                events += 1
                if written >= target_bytes:
                    break
            sink.write(b"".join(lines))
            copy += 1
    expected = {
        "events": events,
        "unique_actors": len(actors),
        "event_types": dict(sorted(type_counts.items())),
        "files": 1,
        "uncompressed_bytes": written,
        "kind": "ndjson",
        "seed": seed,
        "compressed_bytes": out.stat().st_size,
        "target_bytes": target_bytes,
        "built_from": f"{chunk_events} generated events repeated with distinct ids",
    }
    _expected_path(out).write_bytes(orjson.dumps(expected, option=orjson.OPT_INDENT_2))
    return expected
