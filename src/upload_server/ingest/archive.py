"""ZIP central-directory checks and entry selection. Pure over a path: reads the directory and the local
headers, decompresses nothing. The worker re-checks sizes while streaming, because headers can lie.

Readings of the rules:

* Selected: names ending (case-insensitively) in ``.json``, ``.ndjson``, ``.jsonl``, or one of those plus
  ``.gz``. Ignored, with a reason: ``directory``, ``macos_metadata`` (a ``__MACOSX`` path component),
  ``hidden_file`` (base name starting with ``.``: ``.DS_Store``, ``._x.json``), ``nested_archive``
  (``.zip``), ``unsupported_name`` (anything else). Only the base name decides "hidden", so traversal-like
  names such as ``../../x.json`` are selected: names are labels here, never paths.
* Failed up front (in ``ArchivePlan.failed``, not raised): encrypted entries (``ENCRYPTED_ENTRY``),
  compression methods we do not read, e.g. deflate64, and patched data (``UNSUPPORTED_COMPRESSION``).
* Raised: ``BadZip`` for an unreadable directory, any value in it that does not fit the file, a bad local
  header or data past the end of the file (``zipdir.py`` reads them);
  ``ZipBomb`` for overlapping entries (or an entry overlapping the directory), a local header that
  contradicts the directory, more entries than ``max_entries`` (every directory record counts, processed
  or not: each costs work), a selected entry whose declared ratio exceeds ``max_ratio`` while its declared
  size is above ``ratio_floor_bytes``, and selected entries whose declared sizes total more than the
  upload's budget (``upload_budget``: ``max_uncompressed_bytes``, or ``max_ratio`` times the upload's size
  when that is smaller); ``NoJsonFiles`` when no entry is
  selected or failed (an archive whose only JSON entries are encrypted is answered with those failures).
  ``detail`` always carries the numbers.
"""

from __future__ import annotations

import io
import itertools
import os
import zipfile
from dataclasses import dataclass, field
from typing import BinaryIO

import msgspec

from upload_server import errors
from upload_server.codes import FileErrorCode
from upload_server.ingest.extract import FileResult
from upload_server.ingest.zipdir import (
    FLAG_ENCRYPTED,
    FLAG_PATCHED,
    CentralEntry,
    ZipDirectory,
    read_directory,
    read_local_header,
)

__all__ = ["ArchiveLimits", "ArchivePlan", "EntryPlan", "ignore_reason", "plan_zip", "upload_budget"]

_JSON_SUFFIXES = (".json", ".ndjson", ".jsonl")
_SUPPORTED_METHODS = frozenset(
    {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
)
_MAX_DETAIL_NAMES = 20


@dataclass(frozen=True)
class ArchiveLimits:
    max_entries: int
    max_uncompressed_bytes: int
    max_ratio: float
    ratio_floor_bytes: int = 1 << 20


def upload_budget(upload_bytes: int, limits: ArchiveLimits) -> tuple[int, str]:
    """How many bytes all decompression layers of one upload may produce together, and which rule sets
    that: ``total_uncompressed`` (--max-uncompressed-bytes) or ``upload_ratio`` (--max-ratio times the
    bytes uploaded, but never under the ratio floor, so that a small upload may still expand 1 MiB)."""
    by_ratio = max(limits.ratio_floor_bytes, int(limits.max_ratio * upload_bytes))
    if by_ratio < limits.max_uncompressed_bytes:
        return by_ratio, "upload_ratio"
    return limits.max_uncompressed_bytes, "total_uncompressed"


class EntryPlan(msgspec.Struct, frozen=True):
    """One selected entry, as a job reads it. A Struct rather than a frozen dataclass: built ten times
    faster (0.12 against 1.25 us, once per entry of every plan) and pickled in half the time and bytes
    (a plan of 400 entries: 0.13 ms to pickle, 0.06 ms to unpickle, where the serving process does that)."""

    index: int  # position in the central directory; names can repeat
    name: str
    compressed_size: int
    declared_size: int
    gzipped: bool
    # Where and how to read the entry (checked against its local header), so that a worker reads the
    # data directly: 20,000 tiny entries in batches would otherwise cost a directory parse per batch.
    data_offset: int = 0
    method: int = zipfile.ZIP_STORED
    crc: int = 0
    flag_bits: int = 0
    #: Bytes the entry's gzip layer may produce: its share of the upload's budget, reserved at planning
    #: so that jobs running side by side can never exceed the budget together. 0 for plain entries.
    gzip_budget: int = 0


@dataclass(frozen=True)
class ArchivePlan:
    entries: list[EntryPlan] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (name, reason), archive order
    failed: list[FileResult] = field(default_factory=list)  # order = directory index


#: A ``.gz`` entry's declared size is its compressed size; GH-like JSON inflates about this much.
GZIP_WORK_FACTOR = 8
#: What one entry costs a worker besides its bytes (opening it, an inflater, its result, its place in the
#: merge): ~14 us of CPU per entry over the ~7 us a 1.4 KB entry's JSON takes, about what 4 KiB of JSON
#: costs (run_job on files400.zip: 21 us per entry).
ENTRY_WORK_BYTES = 4 << 10


def work_bytes(entry: EntryPlan) -> int:
    """About how many bytes of JSON the entry holds, plus its fixed cost: what a worker's time is
    proportional to (used to batch entries into jobs)."""
    return entry.declared_size * (GZIP_WORK_FACTOR if entry.gzipped else 1) + ENTRY_WORK_BYTES


def ignore_reason(name: str) -> str | None:
    """Why an entry with this name is not processed, or None when it is selected (from the name alone)."""
    if name.endswith(("/", "\\")):
        return "directory"
    if "\\" in name:
        name = name.replace("\\", "/")
    # The substring test first: one scan of the name, where splitting it cost a list per entry.
    if "__MACOSX" in name and "__MACOSX" in name.split("/"):
        return "macos_metadata"
    base = name.rpartition("/")[2]
    if base.startswith("."):
        return "hidden_file"
    lower = base.lower()
    if lower.endswith(".zip"):
        return "nested_archive"
    if lower.removesuffix(".gz").endswith(_JSON_SUFFIXES):
        return None
    return "unsupported_name"


def plan_zip(path: str | os.PathLike[str], limits: ArchiveLimits, data: bytes | None = None) -> ArchivePlan:
    """Check the archive at ``path`` (or its bytes, ``data``, read already) against ``limits`` and choose
    the entries to process.

    Every failure is an UploadServerError naming the entry and the reason: reading errors of the file
    itself included (their OS text is not passed on)."""
    try:
        with io.BytesIO(data) if data is not None else open(path, "rb") as f:
            directory = read_directory(f, limits.max_entries)
            starts = _check_layout(f, directory)
    except OSError as exc:
        raise errors.BadZip(
            "the archive cannot be read", detail={"reason": "unreadable", "errno": exc.errno}
        ) from None
    return _select(directory, starts, limits)


def _check_layout(f: BinaryIO, directory: ZipDirectory) -> list[int]:
    """Check each local header against the directory; reject entries that overlap each other or the
    central directory (the 'overlapping files' bomb reuses one compressed stream for many entries).
    Returns where each entry's data starts.

    Data said to run past the end of the file overlaps the central directory, which lies before the end:
    the end record was found, so the file was not cut, and the size lies. A header that contradicts the
    directory is raised after the overlap check: the overlap bomb's records all point at one local
    header, which can name only one of them."""
    spans: list[tuple[int, int, str]] = []
    starts: list[int] = []
    lies: list[errors.ZipBomb] = []
    for entry in directory.entries:
        data_start, mismatch = read_local_header(f, entry)
        end = data_start + entry.compressed_size
        if mismatch is not None:
            lies.append(mismatch)
        spans.append((entry.header_offset, end, entry.name))
        starts.append(data_start)
    _check_overlaps(spans, directory.directory_start)
    if lies:
        raise lies[0]
    return starts


def _check_overlaps(spans: list[tuple[int, int, str]], directory_start: int) -> None:
    spans.sort()
    for (s1, e1, n1), (s2, _e2, n2) in itertools.pairwise(spans):
        if s2 < e1:
            raise errors.ZipBomb(
                f"entries {n1!r} and {n2!r} overlap",
                detail={"reason": "overlapping_entries", "entries": [n1, n2], "offsets": [s1, s2]},
            )
    if spans and spans[-1][1] > directory_start:
        _s, e, n = spans[-1]
        raise errors.ZipBomb(
            f"entry {n!r} overlaps the central directory",
            detail={
                "reason": "overlapping_entries",
                "entries": [n],
                "end": e,
                "directory_start": directory_start,
            },
        )


def _select(directory: ZipDirectory, starts: list[int], limits: ArchiveLimits) -> ArchivePlan:
    selected: list[CentralEntry] = []
    ignored: list[tuple[str, str]] = []
    failed: list[FileResult] = []
    for entry in directory.entries:
        reason = "directory" if entry.is_dir else ignore_reason(entry.name)
        if reason is not None:
            ignored.append((entry.name, reason))
        elif (refusal := _refusal(entry)) is not None:
            failed.append(_failed(entry.name, entry.index, *refusal))
        else:
            _check_ratio(entry, limits)
            selected.append(entry)
    if not selected and not failed:
        raise errors.NoJsonFiles(
            "the archive holds no .json, .ndjson or .jsonl file (optionally .gz)",
            detail={
                "entries": len(directory.entries),
                "ignored": [{"name": n, "reason": r} for n, r in ignored[:_MAX_DETAIL_NAMES]],
            },
        )
    entries = _reserve(selected, starts, directory.file_size, limits)
    return ArchivePlan(entries=entries, ignored=ignored, failed=failed)


def _refusal(entry: CentralEntry) -> tuple[FileErrorCode, str] | None:
    if entry.flags & FLAG_ENCRYPTED:
        return FileErrorCode.ENCRYPTED_ENTRY, "the entry is encrypted"
    if entry.flags & FLAG_PATCHED:
        return FileErrorCode.UNSUPPORTED_COMPRESSION, "compressed patched data (flag bit 5)"
    if entry.method not in _SUPPORTED_METHODS:
        return FileErrorCode.UNSUPPORTED_COMPRESSION, f"compression method {entry.method}"
    return None


def _check_ratio(entry: CentralEntry, limits: ArchiveLimits) -> None:
    ratio = entry.declared_size / max(entry.compressed_size, 1)
    if entry.declared_size > limits.ratio_floor_bytes and ratio > limits.max_ratio:
        raise errors.ZipBomb(
            f"entry {entry.name!r} expands {ratio:.0f}:1; the limit is {limits.max_ratio:g}:1",
            detail={
                "reason": "ratio",
                "entry": entry.name,
                "compressed_size": entry.compressed_size,
                "declared_size": entry.declared_size,
                "ratio": round(ratio, 1),
                "max_ratio": limits.max_ratio,
            },
        )


def _reserve(
    selected: list[CentralEntry], starts: list[int], upload_bytes: int, limits: ArchiveLimits
) -> list[EntryPlan]:
    """Reserve the upload's byte budget before anything is inflated: the entries' declared sizes first
    (the worker holds each entry to its declared size), then what is left for the gzip layers of ``.gz``
    entries, shared in proportion to the bytes each occupies in the upload."""
    budget, rule = upload_budget(upload_bytes, limits)
    declared = sum(entry.declared_size for entry in selected)
    if declared > budget:
        raise errors.ZipBomb(
            f"the entries expand to {declared} bytes; the limit for this upload is {budget}",
            detail={
                "reason": rule,
                "declared_uncompressed_bytes": declared,
                "limit": budget,
                "upload_bytes": upload_bytes,
            },
        )
    gzipped = {entry.index for entry in selected if entry.name.lower().endswith(".gz")}
    weight = sum(max(entry.compressed_size, 1) for entry in selected if entry.index in gzipped)
    left = budget - declared
    return [
        EntryPlan(
            index=entry.index,
            name=entry.name,
            compressed_size=entry.compressed_size,
            declared_size=entry.declared_size,
            gzipped=entry.index in gzipped,
            data_offset=starts[entry.index],
            method=entry.method,
            crc=entry.crc,
            flag_bits=entry.flags,
            gzip_budget=left * max(entry.compressed_size, 1) // weight if entry.index in gzipped else 0,
        )
        for entry in selected
    ]


def _failed(name: str, index: int, code: FileErrorCode, message: str) -> FileResult:
    return FileResult(name=name, layout=None, error={"code": code, "message": message}, order=index)
