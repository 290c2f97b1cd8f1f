"""What runs inside a worker process: open the upload by path, decompress as a stream under guards, extract.

Decompression is done here rather than through ``ZipFile.open``, for two measured reasons: zipfile calls
the bzip2 and LZMA decompressors without an output bound (200 MB of zeros is 177 bytes of bzip2, so one
4 KiB read can expand to gigabytes inside zipfile), and it silently cuts an entry at its declared size,
reporting a CRC error where the truth is "this entry is larger than its header says". The plan
(``archive.py``, ``zipdir.py``) hands over where each entry's data starts, checked against its local
header; the data is read by offset. An entry name is only ever a label, never a path.

Guards, because headers lie (each fails only that file, with ``ZIP_BOMB``, and ends its job: a bomb fails
the whole upload, so the job's later entries are not worth a worker's time):

* a ZIP entry that produces more than its declared size;
* a ``.gz`` entry's gzip layer that produces more than the share of the upload's byte budget reserved for it
  at planning (``archive.upload_budget``: --max-uncompressed-bytes, or --max-ratio times the bytes
  uploaded); a gzip upload is held to the whole budget;
* any layer whose output, once past ``ratio_floor_bytes``, exceeds ``max_ratio`` times the bytes *of the
  upload* consumed so far (``_Meter``): ratios cannot multiply across layers.

Corrupt or truncated compressed data (bad deflate / gzip / bzip2 / LZMA stream, CRC or size mismatch)
fails the file with ``BAD_COMPRESSED_DATA``; an encrypted entry with ``ENCRYPTED_ENTRY``; a method other
than stored / deflate / bzip2 / LZMA with ``UNSUPPORTED_COMPRESSION``. Errors reading the upload file
itself (the disk) are not a property of the file and propagate.
"""

from __future__ import annotations

import bz2
import io
import lzma
import os
import struct
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, BinaryIO, Protocol

from upload_server.codes import FileErrorCode
from upload_server.ingest.archive import ArchiveLimits, EntryPlan, upload_budget
from upload_server.ingest.extract import FileResult, extract_bytes, extract_stream, rewind
from upload_server.ingest.inflate import AUTO, errors, library
from upload_server.ingest.runs import JobRuns, spill_threshold
from upload_server.ingest.zipdir import FLAG_ENCRYPTED
from upload_server.receive.sniff import ContentKind

__all__ = ["DecompressionFailure", "Job", "run_job"]

_IN_CHUNK = 256 << 10  # compressed bytes per read
_OUT_CHUNK = 1 << 20  # most decompressed bytes produced per decompressor call
_DECOMPRESS_ERRORS = (*errors(), lzma.LZMAError, OSError, EOFError, ValueError)


@dataclass(frozen=True)
class Job:
    source_path: str
    content_kind: ContentKind
    entries: tuple[EntryPlan, ...] = ()  # zip only; a batch of small entries or one big entry
    display_name: str = "upload"  # file name shown for gzip/json uploads
    memory_budget: int = 64 << 20  # files known to be under this are read whole (fast path); others stream
    max_ratio: float = 200.0
    ratio_floor_bytes: int = 1 << 20
    max_uncompressed_bytes: int = 16 << 30
    # When set, NDJSON event lines are appended here; a failed file's lines are removed again. One job in
    # flight per path: jobs running at the same time must not share it.
    events_path: str | None = None
    #: Actors a file (and the job's finished files together) may hold before they are spilled as a sorted
    #: run (``runs.JobRuns``); derived from ``--worker-memory-budget`` (``runs.spill_threshold``). A file's
    #: actors are also spilled once gathered from ``memory_budget`` bytes of JSON.
    spill_actors: int = spill_threshold(64 << 20)
    #: The deflate library for deflate entries and gzip (``inflate.resolve``: auto, zlib-ng or zlib).
    inflater: str = AUTO


class DecompressionFailure(Exception):
    """Ends one file: the bytes cannot be decompressed honestly. Raised from inside the decompressing
    iterators, so it surfaces through ``extract_stream``'s reads."""

    def __init__(self, code: FileErrorCode, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail


def run_job(job: Job, runs: JobRuns | None = None, data: bytes | None = None) -> list[FileResult]:
    """Process every file of ``job``; one FileResult per file, in the order of ``job.entries``. With
    ``runs``, the actors go there (``JobRuns``) and the results hold none; without, the results hold them.
    ``data``: a ZIP upload's bytes, read already (``small.py``), read instead of its file."""
    out: BinaryIO | None = None
    try:
        if job.events_path is not None:
            out = open(job.events_path, "ab", buffering=1 << 20)  # noqa: SIM115 - closed in finally
        kind = ContentKind(job.content_kind)
        if kind is ContentKind.ZIP:
            return _run_zip(job, out, runs, data)
        if kind is ContentKind.GZIP:
            return [_guarded(job.display_name, 0, out, runs, lambda: _process_gzip_upload(job, out, runs))]
        return [_guarded(job.display_name, 0, out, runs, lambda: _process_json(job, out, runs))]
    finally:
        if out is not None:
            out.close()


# ------------------------------------------------------------------------------------------------- plumbing


class _Meter:
    """Counts what one decompression layer produced and enforces the guards on it.

    The ratio is always taken against bytes of the upload itself: the outermost layer counts the
    compressed bytes its decompressor actually consumed, and an inner layer (the gzip inside a ``.gz``
    entry) asks its ``source`` meter. So ratios cannot multiply across layers: a ``.json.gz`` in a ZIP,
    each layer at 150:1, is 22,500:1 against the upload, and is stopped once past ``floor``.
    """

    __slots__ = ("consumed", "floor", "limit", "max_ratio", "name", "produced", "reason", "source")

    def __init__(self, name: str, job: Job, limit: int, reason: str, source: _Meter | None = None) -> None:
        self.name = name
        self.consumed = 0
        self.produced = 0
        self.limit = limit
        self.reason = reason  # why ``limit`` is what it is, for the error's detail
        self.max_ratio = job.max_ratio
        self.floor = job.ratio_floor_bytes
        self.source = source

    def upload_bytes(self) -> int:
        return self.source.upload_bytes() if self.source is not None else self.consumed

    def check(self) -> None:
        if self.produced > self.limit:
            raise DecompressionFailure(
                FileErrorCode.ZIP_BOMB,
                f"{self.name}: decompresses to more than {self.limit} bytes ({_LIMIT_WHY[self.reason]})",
                reason=self.reason,
                produced=self.produced,
                limit=self.limit,
            )
        consumed = self.upload_bytes()
        if self.produced > self.floor and self.produced > self.max_ratio * max(consumed, 1):
            raise DecompressionFailure(
                FileErrorCode.ZIP_BOMB,
                f"{self.name}: expands more than {self.max_ratio:g}:1 against the bytes uploaded",
                reason="ratio",
                produced=self.produced,
                consumed=consumed,
            )


_LIMIT_WHY = {
    "declared_size": "the size its ZIP headers declare",
    "upload_ratio": "its share of the upload's budget, --max-ratio times the bytes uploaded",
    "total_uncompressed": "its share of the upload's budget, --max-uncompressed-bytes",
}


class _ChunkReader(io.RawIOBase):
    """A read()-able stream over an iterator of byte chunks (what extract_stream consumes)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if not self._pending:
            self._pending = next(self._chunks, b"")
        if n < 0 or n >= len(self._pending):
            data, self._pending = self._pending, b""
            return data
        data, self._pending = self._pending[:n], self._pending[n:]
        return data

    def readinto(self, b: Any) -> int:  # pragma: no cover - read() is what callers use
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _extract_chunks(
    name: str,
    chunks: Iterator[bytes],
    out: BinaryIO | None,
    runs: JobRuns | None,
    budget: int,
    known_small: bool,
) -> FileResult:
    """Choose between the in-memory and the streaming extractor by measurement, not by size alone:

    * a file that arrives in one chunk is extracted from memory (no stream machinery for tiny files);
    * a top-level array known or found to fit ``budget`` is read whole: msgspec decodes a whole array ~3x
      faster than the streaming path's one-value-at-a-time;
    * everything else streams, even under the budget: each decompressed chunk is parsed while it is still in
      the CPU cache (a 64 MB deflate NDJSON entry: 214 MB/s streamed vs 194 MB/s decompressed whole first).
    """
    first = next(chunks, None)
    if first is None:
        return extract_bytes(name, b"", out, runs)
    second = next(chunks, None)
    if second is None:
        return extract_bytes(name, first, out, runs)
    head = [first, second]
    if _starts_with_array(first):
        size = len(first) + len(second)
        while size <= budget or known_small:
            chunk = next(chunks, None)
            if chunk is None:
                return extract_bytes(name, b"".join(head), out, runs)
            head.append(chunk)
            size += len(chunk)
    reader = _ChunkReader(_prepend(head, chunks))
    return extract_stream(name, reader, out, max_value_bytes=budget, actors_out=runs)  # type: ignore[arg-type]


def _starts_with_array(chunk: bytes) -> bool:
    return chunk.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")[:1] == b"["


def _prepend(head: list[bytes], rest: Iterator[bytes]) -> Iterator[bytes]:
    yield from head
    head.clear()
    yield from rest


def _guarded(
    name: str, order: int, out: BinaryIO | None, runs: JobRuns | None, work: Callable[[], FileResult]
) -> FileResult:
    """Run one file's work; a decompression failure becomes that file's error and its lines are dropped
    (and, as for any failed file, its actor runs: ``JobRuns.end_file``)."""
    pos = out.tell() if out is not None else None
    if runs is not None:
        runs.begin_file(order)
    try:
        result = work()
    except DecompressionFailure as exc:
        rewind(out, pos)
        error: dict[str, Any] = {"code": exc.code, "message": exc.message, **exc.detail}
        result = FileResult(name=name, layout=None, error=error)
    result.order = order
    if runs is not None:
        runs.end_file(result)
    return result


# ---------------------------------------------------------------------------------------- decompressors


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...
    @property
    def needs_input(self) -> bool: ...
    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


class _Inflate:
    """zlib's (or zlib-ng's) decompressobj behind the bz2/lzma interface (``needs_input``, bounded
    ``decompress``), and ``held``: input given but not yet consumed, so that the meter counts exactly what
    was consumed."""

    def __init__(self, wbits: int, lib: ModuleType) -> None:
        self._d = lib.decompressobj(wbits)

    @property
    def eof(self) -> bool:
        return self._d.eof

    @property
    def needs_input(self) -> bool:
        return not self._d.unconsumed_tail

    @property
    def unused_data(self) -> bytes:
        return self._d.unused_data

    @property
    def held(self) -> int:
        return len(self._d.unconsumed_tail) + len(self._d.unused_data)

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        tail = self._d.unconsumed_tail
        return self._d.decompress(tail + data if tail else data, max(max_length, 0))


class _Stored:
    eof = False
    needs_input = True

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        return data


def lzma1_filter(properties: bytes) -> dict[str, int]:
    """The LZMA1 filter that ZIP's 5-byte properties describe (APPNOTE 5.8.8; the LZMA SDK's
    ``LzmaProps_Decode``): one byte ``(pb * 5 + lp) * 9 + lc``, then the dictionary size, little-endian.
    Replaces ``lzma._decode_filter_properties``, a private function."""
    if len(properties) != 5 or properties[0] >= 9 * 5 * 5:
        raise DecompressionFailure(FileErrorCode.BAD_COMPRESSED_DATA, "bad LZMA properties")
    lc, rest = properties[0] % 9, properties[0] // 9
    lp, pb = rest % 5, rest // 5
    (dict_size,) = struct.unpack("<I", properties[1:])
    return {"id": lzma.FILTER_LZMA1, "lc": lc, "lp": lp, "pb": pb, "dict_size": dict_size}


def _zip_lzma(header: bytes) -> tuple[_Decompressor, int]:
    """LZMA in ZIP: 2 version bytes, 2-byte properties size, properties, then a raw LZMA1 stream."""
    if len(header) < 4:
        raise DecompressionFailure(FileErrorCode.BAD_COMPRESSED_DATA, "LZMA entry too short for its header")
    (psize,) = struct.unpack("<H", header[2:4])
    if len(header) < 4 + psize:
        raise DecompressionFailure(
            FileErrorCode.BAD_COMPRESSED_DATA, "LZMA entry too short for its properties"
        )
    filters = [lzma1_filter(header[4 : 4 + psize])]
    try:
        return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=filters), 4 + psize
    except _DECOMPRESS_ERRORS:
        raise DecompressionFailure(FileErrorCode.BAD_COMPRESSED_DATA, "bad LZMA properties") from None


#: Decompressors that take all the input they are given (``_OPAQUE_FEED``).
_OPAQUE = (bz2.BZ2Decompressor, lzma.LZMADecompressor)
#: bz2 and LZMA take all the input they are given and say nothing of how much they used; fed in pieces
#: this small, the bytes counted as consumed run at most this far ahead of the truth, so the ratio guard
#: trips within max_ratio x 16 KiB (3.2 MB at 200:1) of output rather than max_ratio x one read (51 MB).
_OPAQUE_FEED = 16 << 10


def _pump(
    d: _Decompressor,
    source: Iterator[bytes],
    meter: _Meter,
    what: str,
    first: bytes = b"",
    *,
    sized: bool = False,
) -> Iterator[bytes]:
    """Drive a decompressor over compressed chunks, at most _OUT_CHUNK bytes of output per step, checking
    the guards after each step. Ends at the stream's end marker; when the input ends first, what the
    decompressor still holds is drained before the data is called truncated (a valid deflate stream can
    end with its last back-reference still to be copied out: issue 7, class 2). A ``sized`` stream (a ZIP
    entry's) may end without its end marker: zipfile reads such an entry when its CRC-32 is right, and
    the caller checks it."""
    pending = first
    feed = _OPAQUE_FEED if isinstance(d, _OPAQUE) else len(first) + _IN_CHUNK
    inflate = isinstance(d, _Inflate)
    base, given = meter.consumed, 0
    while not d.eof:
        hungry = d.needs_input
        if hungry and not pending:
            pending = next(source, b"")
        piece = b""
        if hungry and pending:
            piece, pending = pending[:feed], pending[feed:]
            given += len(piece)
        data = _step(d, piece, what)
        meter.consumed = base + given - (d.held if inflate else 0)
        if hungry and not piece and not data and not d.eof:  # drained, and still not at the end
            if sized:  # a ZIP entry: its CRC-32 judges it, as zipfile judges it
                return
            raise DecompressionFailure(
                FileErrorCode.BAD_COMPRESSED_DATA, f"{what}: compressed data ends early"
            )
        if data:
            meter.produced += len(data)
            meter.check()
            yield data


def _step(d: _Decompressor, piece: bytes, what: str) -> bytes:
    try:
        return d.decompress(piece, _OUT_CHUNK)
    except _DECOMPRESS_ERRORS:
        # The library's words are not passed on: they differ between zlib, bz2 and lzma, and versions.
        raise DecompressionFailure(
            FileErrorCode.BAD_COMPRESSED_DATA, f"{what}: the compressed data is corrupt"
        ) from None


# ------------------------------------------------------------------------------------------------------ zip


def _run_zip(job: Job, out: BinaryIO | None, runs: JobRuns | None, data: bytes | None) -> list[FileResult]:
    """Each entry in turn; a bomb ends the job there: it fails the whole upload, so the rest is not
    worth a worker's time."""
    results: list[FileResult] = []
    with io.BytesIO(data) if data is not None else open(job.source_path, "rb") as f:
        budget = _upload_budget(job, f.seek(0, io.SEEK_END))
        for entry in job.entries:
            result = _guarded(
                entry.name,
                entry.index,
                out,
                runs,
                lambda e=entry: _process_entry(job, f, e, budget, out, runs),
            )
            results.append(result)
            if result.error is not None and result.error.get("code") == FileErrorCode.ZIP_BOMB:
                break
    return results


def _upload_budget(job: Job, upload_bytes: int) -> tuple[int, str]:
    limits = ArchiveLimits(0, job.max_uncompressed_bytes, job.max_ratio, job.ratio_floor_bytes)
    return upload_budget(upload_bytes, limits)


def _process_entry(
    job: Job,
    f: BinaryIO,
    entry: EntryPlan,
    budget: tuple[int, str],
    out: BinaryIO | None,
    runs: JobRuns | None,
) -> FileResult:
    if entry.flag_bits & FLAG_ENCRYPTED:
        raise DecompressionFailure(FileErrorCode.ENCRYPTED_ENTRY, "the entry is encrypted")
    meter = _Meter(entry.name, job, entry.declared_size, "declared_size")
    lib = library(job.inflater)
    if not entry.gzipped and (whole := _inflated_at_once(f, entry, meter, lib)) is not None:
        return extract_bytes(entry.name, whole, out, runs)
    chunks = _zip_entry_chunks(f, entry, meter, lib)
    if entry.gzipped:
        inner = _Meter(entry.name, job, entry.gzip_budget, budget[1], source=meter)
        gunzipped = _gunzip(chunks, inner, entry.name, lib)
        return _extract_chunks(entry.name, gunzipped, out, runs, job.memory_budget, False)
    known_small = entry.declared_size <= job.memory_budget
    return _extract_chunks(entry.name, chunks, out, runs, job.memory_budget, known_small)


def _zip_entry_chunks(f: BinaryIO, entry: EntryPlan, meter: _Meter, lib: ModuleType) -> Iterator[bytes]:
    """The entry's decompressed bytes, read by offset from the upload (the plan checked the local
    header), checked against the declared size and CRC."""
    whole = _whole_entry(f, entry)
    source = iter(()) if whole is not None else _raw_chunks(f, entry)
    d, first = _zip_decompressor(entry, source, meter, lib)
    first = whole or first
    running = 0
    for chunk in _pump(d, source, meter, entry.name, first, sized=True):
        running = lib.crc32(chunk, running)
        yield chunk
    # More than declared was stopped by the meter (ZIP_BOMB). Fewer, with the right CRC-32, is read as
    # zipfile reads it: the CRC is what proves the data whole.
    if running != entry.crc:
        short = meter.produced < entry.declared_size
        sizes = f" (decompressed to {meter.produced} bytes, the header says {entry.declared_size})"
        raise DecompressionFailure(
            FileErrorCode.BAD_COMPRESSED_DATA, f"{entry.name}: CRC-32 mismatch{sizes if short else ''}"
        )


def _inflated_at_once(f: BinaryIO, entry: EntryPlan, meter: _Meter, lib: ModuleType) -> bytes | None:
    """A small stored or deflated entry, read and inflated in one call each, with the checks
    ``_zip_entry_chunks`` makes (the meter after its one step, the CRC-32, which also judges a stream cut
    short, as the usual way's does); None whenever the entry is not that simple (more than one step of
    output, data that will not inflate, a wrong CRC), and the usual way then reads it again and says what
    is wrong. For the 400 one-event files of files400.zip, the generators, the wrapper and the steps
    between cost more than the inflating."""
    if entry.declared_size >= _OUT_CHUNK or (data := _whole_entry(f, entry)) is None:
        return None
    if entry.method == zipfile.ZIP_STORED:
        whole, consumed = data, len(data)
    else:
        d = lib.decompressobj(-15)
        try:
            whole = d.decompress(data, _OUT_CHUNK)
        except _DECOMPRESS_ERRORS:
            return None
        if len(whole) >= _OUT_CHUNK:  # more than one step's output: the usual way steps through it
            return None
        consumed = len(data) - len(d.unused_data)
    if lib.crc32(whole) != entry.crc:
        return None  # the meter untouched: the usual way counts from zero
    meter.consumed, meter.produced = consumed, len(whole)
    meter.check()
    return whole


def _raw_chunks(f: BinaryIO, entry: EntryPlan) -> Iterator[bytes]:
    """The entry's compressed bytes, ``_IN_CHUNK`` at a time."""
    # Seek before every read: the file object is shared by the entries of one job.
    pos, left = entry.data_offset, entry.compressed_size
    while left > 0:
        f.seek(pos)
        data = f.read(min(_IN_CHUNK, left))
        if not data:
            raise DecompressionFailure(
                FileErrorCode.BAD_COMPRESSED_DATA, "entry data runs past the end of the file"
            )
        pos += len(data)
        left -= len(data)
        yield data


def _whole_entry(f: BinaryIO, entry: EntryPlan) -> bytes | None:
    """A stored or deflated entry's compressed bytes when one read gets them all: the one piece
    ``_raw_chunks`` would give, handed to ``_pump`` as its first without a generator between (the many
    tiny entries of an upload like files400.zip). None otherwise (the reads then go as usual)."""
    if entry.method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or entry.compressed_size > _IN_CHUNK:
        return None
    f.seek(entry.data_offset)
    data = f.read(entry.compressed_size)
    return data if len(data) == entry.compressed_size else None


def _zip_decompressor(
    entry: EntryPlan, source: Iterator[bytes], meter: _Meter, lib: ModuleType
) -> tuple[_Decompressor, bytes]:
    """The decompressor for the entry's method, and compressed bytes already read past its header."""
    if entry.method == zipfile.ZIP_STORED:
        return _Stored(), b""
    if entry.method == zipfile.ZIP_DEFLATED:
        return _Inflate(-15, lib), b""
    if entry.method == zipfile.ZIP_BZIP2:
        return bz2.BZ2Decompressor(), b""
    if entry.method == zipfile.ZIP_LZMA:
        header = b""
        while len(header) < 4 or len(header) < 4 + struct.unpack("<H", header[2:4])[0]:
            more = next(source, b"")
            if not more:
                break
            header += more
        d, skip = _zip_lzma(header)
        meter.consumed += skip
        return d, header[skip:]
    raise DecompressionFailure(FileErrorCode.UNSUPPORTED_COMPRESSION, f"compression method {entry.method}")


# ----------------------------------------------------------------------------------------------------- gzip


def _gunzip(source: Iterator[bytes], meter: _Meter, name: str, lib: ModuleType) -> Iterator[bytes]:
    """Gunzip a stream of chunks: every member (zlib checks each member's CRC and size); trailing zero
    padding is tolerated as gzip(1) does; anything else after a member is an error."""
    pending = b""
    while True:
        d = _Inflate(16 + lib.MAX_WBITS, lib)
        yield from _pump(d, source, meter, name, pending)
        pending = d.unused_data
        while not pending:
            nxt = next(source, None)
            if nxt is None:
                return
            pending = nxt
        if pending[:1] != b"\x1f":
            if pending.strip(b"\0") or any(c.strip(b"\0") for c in source):
                raise DecompressionFailure(
                    FileErrorCode.BAD_COMPRESSED_DATA, f"{name}: data after the end of the gzip stream"
                )
            return


def _file_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while data := f.read(_IN_CHUNK):
            yield data


def _process_gzip_upload(job: Job, out: BinaryIO | None, runs: JobRuns | None) -> FileResult:
    limit, reason = _upload_budget(job, os.path.getsize(job.source_path))
    meter = _Meter(job.display_name, job, limit, reason)
    return _extract_chunks(
        job.display_name,
        _gunzip(_file_chunks(job.source_path), meter, job.display_name, library(job.inflater)),
        out,
        runs,
        job.memory_budget,
        False,
    )


# ----------------------------------------------------------------------------------------------------- json


def _process_json(job: Job, out: BinaryIO | None, runs: JobRuns | None) -> FileResult:
    with open(job.source_path, "rb") as f:
        size = f.seek(0, io.SEEK_END)
        f.seek(0)
        if size <= job.memory_budget:
            return extract_bytes(job.display_name, f.read(), out, runs)
        return extract_stream(job.display_name, f, out, max_value_bytes=job.memory_budget, actors_out=runs)
