"""The fuzzing engine shared by tests/test_fuzz_ingest.py (a short, seeded budget) and
loadtest/fuzz_ingest.py (the long run): valid archives, the ways to break them, and the oracle.

Archives are built with zipfile (every method, a ``.gz`` entry, data descriptors, zip64 records) and then
broken where it matters: central-directory fields, local-header fields, data descriptors, the compressed
streams, the end record; raw gzip files likewise (header, deflate stream, trailer). The oracle: the ingest
answers every file either with results whose error codes are ours, or with a 4xx error; and when CPython's
zipfile reads every entry of the archive whole, and we do not refuse it for a limit, our counts are
those of zipfile's bytes.
"""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import assume
from hypothesis import strategies as st

from upload_server import errors
from upload_server.codes import FileErrorCode
from upload_server.ingest.archive import ArchiveLimits, ignore_reason, plan_zip
from upload_server.ingest.extract import FileResult, extract_bytes, extract_stream
from upload_server.ingest.inflate import AUTO
from upload_server.ingest.worker import Job, run_job

LIMITS = ArchiveLimits(max_entries=64, max_uncompressed_bytes=64 << 20, max_ratio=200.0)
#: Per-file error codes a result may carry: the one enum the workers use.
FILE_CODES = frozenset(FileErrorCode)


def events(n: int, seed: int) -> bytes:
    return b"".join(
        b'{"id":"%d","type":"T%d","actor":{"id":%d,"login":"u%d"},"repo":{"name":"r"}}\n'
        % (seed * 1000 + i, i % 3, (seed + i) % 7, (seed + i) % 7)
        for i in range(n)
    )


def zip_with(
    entries: list[tuple[str, bytes, int]], *, stream: bool = False, zip64: bool = False, comment: bytes = b""
) -> bytes:
    """An archive from zipfile. ``stream``: written to an unseekable file, so every entry gets a data
    descriptor; ``zip64``: every entry forced to zip64 local records."""
    sink = io.BytesIO()
    target: Any = _Unseekable(sink) if stream else sink
    with zipfile.ZipFile(target, "w") as zf:
        zf.comment = comment
        for name, data, method in entries:
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = method
            with zf.open(info, "w", force_zip64=zip64) as out:
                out.write(data)
    return sink.getvalue()


class _Unseekable(io.RawIOBase):
    def __init__(self, sink: io.BytesIO) -> None:
        self.sink = sink

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return self.sink.write(data)

    def flush(self) -> None:
        pass


def base_archives() -> list[bytes]:
    """Valid archives of every shape the fuzzing starts from."""
    methods = [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]
    mixed = [(f"m{m}.json", events(20, m), m) for m in methods]
    mixed.append(("packed.json.gz", gzip.compress(events(30, 9)), zipfile.ZIP_STORED))
    mixed.append(("notes.txt", b"not json", zipfile.ZIP_DEFLATED))
    array = [("a.json", b"[" + events(15, 3).replace(b"\n", b",")[:-1] + b"]", zipfile.ZIP_DEFLATED)]
    return [
        zip_with(mixed),
        zip_with(mixed[:2] + mixed[4:5], stream=True),
        zip_with(mixed[1:3], zip64=True),
        zip_with([*array, ("b.ndjson", events(40, 4), zipfile.ZIP_DEFLATED)]),
    ]


def base_gzips() -> list[bytes]:
    return [gzip.compress(events(60, 1)), gzip.compress(events(20, 2)) + gzip.compress(events(10, 3))]


# ------------------------------------------------------------------------------------------------ mutation


@dataclass(frozen=True)
class Field:
    offset: int
    size: int  # 1, 2 or 4 bytes


LOCAL_FIELDS = [Field(o, s) for o, s in ((4, 2), (6, 2), (8, 2), (14, 4), (18, 4), (22, 4), (26, 2), (28, 2))]
CENTRAL_FIELDS = [
    Field(o, s)
    for o, s in (
        (6, 2),
        (8, 2),
        (10, 2),
        (16, 4),
        (20, 4),
        (24, 4),
        (28, 2),
        (30, 2),
        (32, 2),
        (34, 2),
        (42, 4),
    )
]
END_FIELDS = [Field(o, s) for o, s in ((4, 2), (6, 2), (8, 2), (10, 2), (12, 4), (16, 4), (20, 2))]
DESCRIPTOR_FIELDS = [Field(o, 4) for o in (0, 4, 8, 12)]
GZIP_FIELDS = [Field(o, s) for o, s in ((2, 1), (3, 1), (4, 4), (8, 1), (9, 1))]
BOUNDARY = [0, 1, 2, 0x7F, 0x80, 0xFF, 0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFF0, 0x8000_0000]


def zip_regions(raw: bytes) -> dict[str, list[tuple[int, list[Field] | None, int]]]:
    """Where to break a valid archive: (start, fields there or None for free bytes, length) per region."""
    out: dict[str, list[tuple[int, list[Field] | None, int]]] = {
        "local": [],
        "data": [],
        "descriptor": [],
        "central": [],
        "end": [],
    }
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        for info in zf.infolist():
            start = info.header_offset
            name_len, extra_len = struct.unpack_from("<HH", raw, start + 26)
            out["local"].append((start, LOCAL_FIELDS, 30))
            data = start + 30 + name_len + extra_len
            out["data"].append((data, None, max(info.compress_size, 1)))
            if info.flag_bits & 0x8:
                out["descriptor"].append((data + info.compress_size, DESCRIPTOR_FIELDS, 16))
    position = raw.find(b"PK\x01\x02")
    while position >= 0:
        out["central"].append((position, CENTRAL_FIELDS, 46))
        position = raw.find(b"PK\x01\x02", position + 4)
    out["end"].append((raw.rfind(b"PK\x05\x06"), END_FIELDS, 22))
    return {k: v for k, v in out.items() if v}


@st.composite
def mutation(
    draw: st.DrawFn, regions: dict[str, list[tuple[int, list[Field] | None, int]]], size: int
) -> Any:
    kind = draw(st.sampled_from(["field", "field", "flip", "cut"]))
    if kind == "cut":
        return ("cut", draw(st.integers(0, size - 1)))
    region = draw(st.sampled_from(sorted(regions)))
    start, fields, length = draw(st.sampled_from(regions[region]))
    if kind == "field" and fields:
        field = draw(st.sampled_from(fields))
        value = draw(st.one_of(st.sampled_from(BOUNDARY), st.integers(0, (1 << (8 * field.size)) - 1)))
        return ("field", start + field.offset, field.size, value)
    return ("flip", start + draw(st.integers(0, length - 1)), draw(st.integers(1, 255)))


def apply(raw: bytes, mutations: list[Any]) -> bytes:
    data = bytearray(raw)
    for m in mutations:
        if m[0] == "cut":
            del data[max(m[1], 1) :]
        elif m[0] == "field":
            _, at, size, value = m
            if at + size <= len(data):
                data[at : at + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        elif m[1] < len(data):
            data[m[1]] ^= m[2]
    return bytes(data)


@st.composite
def broken_zip(draw: st.DrawFn) -> bytes:
    raw = draw(st.sampled_from(_BASES))
    regions = _REGIONS[raw]
    return apply(raw, draw(st.lists(mutation(regions, len(raw)), min_size=1, max_size=3)))


@st.composite
def broken_gzip(draw: st.DrawFn) -> bytes:
    raw = draw(st.sampled_from(_GZIPS))
    regions = {
        "header": [(0, GZIP_FIELDS, 10)],
        "stream": [(10, None, len(raw) - 18)],
        "trailer": [(len(raw) - 8, [Field(0, 4), Field(4, 4)], 8)],
    }
    return apply(raw, draw(st.lists(mutation(regions, len(raw)), min_size=1, max_size=3)))


@st.composite
def written_archive(draw: st.DrawFn) -> tuple[bytes, int]:
    """An archive as zipfile writes it, in any of its shapes (data descriptors, zip64 records, a comment,
    a stub before it), and how many JSON entries it holds."""
    name = draw(
        st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1, max_size=12)
    )
    sizes = draw(st.lists(st.integers(0, 60), min_size=1, max_size=5))
    method = draw(
        st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
    )
    entries = [(f"{name}{i}.json", events(n, i), method) for i, n in enumerate(sizes)]
    raw = zip_with(
        entries,
        stream=draw(st.booleans()),
        zip64=draw(st.booleans()),
        comment=draw(st.binary(max_size=40)),
    )
    selected = sum(ignore_reason(entry[0]) is None for entry in entries)  # ".x0.json" is a hidden file
    return draw(st.sampled_from([b"", b"MZ" + b"\0" * 100])) + raw, selected


def check_written(archive: tuple[bytes, int], path: Path, inflater: str = AUTO) -> str:
    """The differential test: zipfile reads it whole, and we answer every entry with zipfile's counts."""
    raw, count = archive
    # zipfile cannot read every archive it writes: a comment holding the end record's signature hides
    # the real one from it. Such a case says nothing about us.
    assume(zipfile_reads_whole(raw) is not None)
    outcome = check_zip(raw, path, 1 << 12, inflater)
    assert outcome == (f"answered, 0 of {count} failed" if count else "refused NO_JSON_FILES"), outcome
    return outcome


_BASES = base_archives()
_REGIONS = {raw: zip_regions(raw) for raw in _BASES}
_GZIPS = base_gzips()


# ------------------------------------------------------------------------------------------------ the oracle


def zipfile_reads_whole(raw: bytes) -> dict[str, bytes] | None:
    """Every entry's bytes as CPython's zipfile reads them, or None when it cannot read them all. An archive
    where zipfile finds another number of entries than the end record declares is not read whole either:
    zipfile then reads a mangled directory record as one with a long extra field and silently loses the
    entries after it, where we answer BAD_ZIP."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            end = len(raw) - 22 - len(zf.comment)  # the end record zipfile used (a comment may hold "PK\5\6")
            if struct.unpack_from("<H", raw, end + 10)[0] not in (len(zf.infolist()), 0xFFFF):
                return None
            return {f"{i}": zf.read(info) for i, info in enumerate(zf.infolist())}
    except Exception:
        return None


def check_zip(raw: bytes, path: Path, memory_budget: int, inflater: str = AUTO) -> str:
    """Run the ingest on ``raw`` and hold it to the oracle; return what happened (for statistics)."""
    path.write_bytes(raw)
    whole = zipfile_reads_whole(raw)
    try:
        plan = plan_zip(path, LIMITS)
    except errors.UploadServerError as refused:
        assert 400 <= refused.status < 500, refused
        # What zipfile reads whole we may refuse for a limit (ZIP_BOMB), never as unreadable.
        assert whole is None or not isinstance(refused, errors.BadZip), refused
        return f"refused {refused.code}"
    job = Job(str(path), "zip", entries=tuple(plan.entries), memory_budget=memory_budget, inflater=inflater)
    results = run_job(job)
    for result in [*results, *plan.failed]:
        assert result.error is None or result.error["code"] in FILE_CODES, result.error
    if whole is not None and not any(r.error is not None and r.error["code"] == "ZIP_BOMB" for r in results):
        _compare_with_zipfile(whole, results)
    failed = sum(result.error is not None for result in results)
    return f"answered, {failed} of {len(results)} failed"


def _compare_with_zipfile(whole: dict[str, bytes], results: list[FileResult]) -> None:
    """Our counts are those of the bytes zipfile read (gunzipped for a ``.gz`` entry, when CPython's gzip
    reads it)."""
    for result in results:
        data: bytes | None = whole[f"{result.order}"]
        if result.name.lower().endswith(".gz"):
            try:
                data = gzip.decompress(data)  # type: ignore[arg-type]
            except Exception:
                continue
        expected = extract_bytes(result.name, data)  # type: ignore[arg-type]
        assert (result.events, result.skipped, result.event_types, result.actors) == (
            expected.events,
            expected.skipped,
            expected.event_types,
            expected.actors,
        ), (result.name, result.error, expected.error)


def check_gzip(raw: bytes, path: Path, memory_budget: int, inflater: str = AUTO) -> str:
    path.write_bytes(raw)
    job = Job(str(path), "gzip", display_name="x.json.gz", memory_budget=memory_budget, inflater=inflater)
    (result,) = run_job(job)
    assert result.error is None or result.error["code"] in FILE_CODES, result.error
    try:
        data = gzip.decompress(raw)
    except Exception:
        data = None
    if data is not None and result.error is None:
        assert result.events == extract_bytes("x", data).events
    return "answered" if result.error is None else f"failed {result.error['code']}"


def checksum(raw: bytes) -> int:
    return zlib.crc32(raw)


# ------------------------------------------------------------------------------------------------ JSON

FIELD = st.sampled_from([b'"id"', b'"type"', b'"actor"', b'"repo"', b'"created_at"', b'"name"', b'"x"'])
SCALAR = st.sampled_from(
    [b"1", b"1e400", b"-1e400", b"9" * 5000, b'"s"', b'"\\ud800"', b"null", b"tru", b"x"]
)


@st.composite
def json_ish(draw: st.DrawFn) -> bytes:
    """Event-shaped JSON with unusable numbers, lone surrogates and syntax errors in the fields we read."""

    def obj(depth: int) -> bytes:
        members = []
        for _ in range(draw(st.integers(0, 3))):
            value = obj(depth + 1) if depth < 2 and draw(st.booleans()) else draw(SCALAR)
            members.append(draw(FIELD) + b":" + value)
        return b"{" + b",".join(members) + b"}"

    values = [obj(0) if draw(st.booleans()) else draw(SCALAR) for _ in range(draw(st.integers(1, 4)))]
    if draw(st.booleans()):
        return b"[" + b",".join(values) + b"]"
    return draw(st.sampled_from([b"\n", b" ", b"\n\n"])).join(values)


def check_json(data: bytes, chunk: int) -> str:
    """Never an exception; the same events, skips and error code in memory and streamed."""
    whole = extract_bytes("f.json", data)
    streamed = extract_stream("f.json", io.BytesIO(data), chunk_size=chunk)
    code = (whole.error or {}).get("code")
    assert code in (None, "INVALID_JSON"), whole.error
    assert (whole.events, whole.skipped, code) == (
        streamed.events,
        streamed.skipped,
        (streamed.error or {}).get("code"),
    )
    return f"{code or 'answered'}"


# ------------------------------------------------------------------------------------------------ HTTP heads

UPLOAD_HEAD = b"POST /api/v1/upload HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
REQUESTS = [
    UPLOAD_HEAD + b"Transfer-Encoding: chunked\r\n\r\n8\r\n" + b'{"a":1}\n' + b"\r\n0\r\n\r\n",
    UPLOAD_HEAD + b"Content-Length: 8\r\n\r\n" + b'{"a":1}\n',
    b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n",
]
INSERTS = [b" ", b"\t", b"\r", b"\n", b"\r\n ", b"\r\n\t", b"0" * 30, b"f" * 40, b":", b"\x00", b"\xff", b";"]


@st.composite
def broken_request(draw: st.DrawFn) -> bytes:
    """A request whose head (or chunk framing) is broken: bytes flipped, inserted, deleted, lines doubled."""
    data = bytearray(draw(st.sampled_from(REQUESTS)))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "double"]))
        if kind == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[at:at] = draw(st.sampled_from(INSERTS))
        elif kind == "delete":
            del data[at]
        else:
            start = data.rfind(b"\n", 0, at) + 1
            end = data.find(b"\n", at) + 1 or len(data)
            data[end:end] = data[start:end]
    return bytes(data)
