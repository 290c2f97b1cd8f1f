"""ZIP central-directory checks and entry selection. Pure over a path: reads the directory and the local
headers, decompresses nothing. The worker re-checks sizes while streaming, because headers can lie.

Readings of the rules:

* Selected: names ending (case-insensitively) in ``.json``, ``.ndjson``, ``.jsonl``, or one of those plus
  ``.gz``. Ignored, with a reason: ``directory``, ``macos_metadata`` (a ``__MACOSX`` path component),
  ``hidden_file`` (base name starting with ``.``: ``.DS_Store``, ``._x.json``), ``nested_archive``
  (``.zip``), ``unsupported_name`` (anything else). Only the base name decides "hidden", so traversal-like
  names such as ``../../x.json`` are selected: names are labels here, never paths.
* Failed up front (in ``ArchivePlan.failed``, not raised): encrypted entries (``ENCRYPTED_ENTRY``) and
  compression methods zipfile cannot read, e.g. deflate64 (``UNSUPPORTED_COMPRESSION``).
* Raised: ``BadZip`` for an unreadable directory, a bad local header or data past the end of the file;
  ``ZipBomb`` for overlapping entries (or an entry overlapping the directory), more entries than
  ``max_entries`` (every directory record counts, processed or not: each costs work), a selected entry whose
  declared ratio exceeds ``max_ratio`` while its declared size is above ``ratio_floor_bytes``, and selected
  entries whose declared sizes total more than ``max_uncompressed_bytes``; ``NoJsonFiles`` when no entry is
  selected or failed (an archive whose only JSON entries are encrypted is answered with those failures).
  ``detail`` always carries the numbers.
"""

from __future__ import annotations

import itertools
import os
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Any

from upload_server import errors
from upload_server.ingest.extract import FileResult

__all__ = ["ArchiveLimits", "ArchivePlan", "EntryPlan", "ignore_reason", "plan_zip"]

_JSON_SUFFIXES = (".json", ".ndjson", ".jsonl")
_SUPPORTED_METHODS = frozenset(
    {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
)
LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (version .. sizes), name length, extra length
LOCAL_SIGNATURE = b"PK\x03\x04"
_MAX_DETAIL_NAMES = 20


@dataclass(frozen=True)
class ArchiveLimits:
    max_entries: int
    max_uncompressed_bytes: int
    max_ratio: float
    ratio_floor_bytes: int = 1 << 20


@dataclass(frozen=True)
class EntryPlan:
    index: int  # position in ZipFile.infolist(); names can repeat
    name: str
    compressed_size: int
    declared_size: int
    gzipped: bool
    # Where and how to read the entry, so a worker need not parse the central directory again (20,000 tiny
    # entries in batches would otherwise parse it once per batch). None: the worker looks them up itself.
    header_offset: int | None = None
    method: int | None = None
    crc: int | None = None
    flag_bits: int = 0


@dataclass(frozen=True)
class ArchivePlan:
    entries: list[EntryPlan] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (name, reason), archive order
    failed: list[FileResult] = field(default_factory=list)  # order = infolist() index


def ignore_reason(name: str) -> str | None:
    """Why an entry with this name is not processed, or None when it is selected (from the name alone)."""
    if name.endswith(("/", "\\")):
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
    if lower.removesuffix(".gz").endswith(_JSON_SUFFIXES):
        return None
    return "unsupported_name"


def plan_zip(path: str | os.PathLike[str], limits: ArchiveLimits) -> ArchivePlan:
    """Check the archive at ``path`` against ``limits`` and choose the entries to process."""
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            try:
                zf = zipfile.ZipFile(f)
            except (
                zipfile.BadZipFile,
                EOFError,
                OSError,
                ValueError,
                struct.error,
                UnicodeDecodeError,
            ) as exc:
                raise errors.BadZip(
                    f"not a readable ZIP archive: {exc}", detail={"reason": str(exc)}
                ) from None
            with zf:
                infos = zf.infolist()
                if len(infos) > limits.max_entries:
                    raise errors.ZipBomb(
                        f"the archive has {len(infos)} entries; the limit is {limits.max_entries}",
                        detail={
                            "reason": "too_many_entries",
                            "entries": len(infos),
                            "max_entries": limits.max_entries,
                        },
                    )
                directory_start = getattr(zf, "start_dir", file_size)
                _check_layout(f, infos, directory_start, file_size)
    except OSError as exc:
        raise errors.BadZip(f"cannot read the archive: {exc}", detail={"reason": str(exc)}) from None
    return _select(infos, limits)


def _check_layout(f: Any, infos: list[zipfile.ZipInfo], directory_start: int, file_size: int) -> None:
    """Read each local header; reject entries that overlap each other or the central directory (the
    'overlapping files' bomb reuses one compressed stream for many entries) or that run past the end."""
    spans: list[tuple[int, int, str]] = []
    for info in infos:
        start = info.header_offset
        f.seek(start)
        head = f.read(LOCAL_HEADER.size)
        if len(head) < LOCAL_HEADER.size:
            raise errors.BadZip(
                f"entry {info.filename!r}: local header past the end of the file",
                detail={"reason": "truncated", "entry": info.filename, "offset": start},
            )
        sig, name_len, extra_len = LOCAL_HEADER.unpack(head)
        if sig != LOCAL_SIGNATURE:
            raise errors.BadZip(
                f"entry {info.filename!r}: bad local header",
                detail={"reason": "bad_local_header", "entry": info.filename, "offset": start},
            )
        end = start + LOCAL_HEADER.size + name_len + extra_len + info.compress_size
        if end > file_size:
            raise errors.BadZip(
                f"entry {info.filename!r}: data runs past the end of the file (truncated archive?)",
                detail={"reason": "truncated", "entry": info.filename, "end": end, "file_size": file_size},
            )
        spans.append((start, end, info.filename))
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


def _select(infos: list[zipfile.ZipInfo], limits: ArchiveLimits) -> ArchivePlan:
    entries: list[EntryPlan] = []
    ignored: list[tuple[str, str]] = []
    failed: list[FileResult] = []
    total = 0
    for index, info in enumerate(infos):
        name = info.filename
        reason = "directory" if info.is_dir() else ignore_reason(name)
        if reason is not None:
            ignored.append((name, reason))
            continue
        if info.flag_bits & 0x1:
            failed.append(_failed(name, index, "ENCRYPTED_ENTRY", "the entry is encrypted"))
            continue
        if info.compress_type not in _SUPPORTED_METHODS:
            failed.append(
                _failed(name, index, "UNSUPPORTED_COMPRESSION", f"compression method {info.compress_type}")
            )
            continue
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > limits.ratio_floor_bytes and ratio > limits.max_ratio:
            raise errors.ZipBomb(
                f"entry {name!r} expands {ratio:.0f}:1; the limit is {limits.max_ratio:g}:1",
                detail={
                    "reason": "ratio",
                    "entry": name,
                    "compressed_size": info.compress_size,
                    "declared_size": info.file_size,
                    "ratio": round(ratio, 1),
                    "max_ratio": limits.max_ratio,
                },
            )
        total += info.file_size
        entries.append(
            EntryPlan(
                index=index,
                name=name,
                compressed_size=info.compress_size,
                declared_size=info.file_size,
                gzipped=name.lower().endswith(".gz"),
                header_offset=info.header_offset,
                method=info.compress_type,
                crc=info.CRC,
                flag_bits=info.flag_bits,
            )
        )
    if total > limits.max_uncompressed_bytes:
        raise errors.ZipBomb(
            f"the entries expand to {total} bytes; the limit is {limits.max_uncompressed_bytes}",
            detail={
                "reason": "total_uncompressed",
                "declared_uncompressed_bytes": total,
                "max_uncompressed_bytes": limits.max_uncompressed_bytes,
            },
        )
    if not entries and not failed:
        raise errors.NoJsonFiles(
            "the archive holds no .json, .ndjson or .jsonl file (optionally .gz)",
            detail={
                "entries": len(infos),
                "ignored": [{"name": n, "reason": r} for n, r in ignored[:_MAX_DETAIL_NAMES]],
            },
        )
    return ArchivePlan(entries=entries, ignored=ignored, failed=failed)


def _failed(name: str, index: int, code: str, message: str) -> FileResult:
    return FileResult(name=name, layout=None, error={"code": code, "message": message}, order=index)
