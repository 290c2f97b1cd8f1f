"""Issue 7: one regression test per class of hostile input, each building its own sample (function level;
the same samples through the real server are in test_hostile_server.py)."""

from __future__ import annotations

import functools
import gzip
import io
import lzma
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest

from upload_server import errors
from upload_server.ingest.archive import ArchiveLimits, plan_zip
from upload_server.ingest.extract import FileResult, extract_bytes, extract_stream
from upload_server.ingest.worker import DecompressionFailure, Job, lzma1_filter, run_job
from zipcraft import BZIP2, DEFLATED, LZMA, STORED, Raw, build, entry

LIMITS = ArchiveLimits(max_entries=10_000, max_uncompressed_bytes=16 << 30, max_ratio=200.0)
LINE = b'{"type":"PushEvent","actor":{"id":7,"login":"u7"}}\n'


def write(tmp_path: Path, data: bytes, name: str = "u.zip") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def zip_job(path: Path, **kw: Any) -> Job:
    return Job(str(path), "zip", entries=tuple(plan_zip(path, LIMITS).entries), **kw)


# --------------------------------------------------------------------- class 1: values read from the ZIP


def version_needed_sample() -> bytes:
    """'Version needed to extract' 25.5: zipfile refuses the archive (NotImplementedError, a 500 before);
    the method and flags are what decide whether we can read an entry, and they are plain deflate."""
    return build([entry("a.json", LINE * 3, version=255)])


def zip64_offset_sample() -> bytes:
    """A zip64 local-header offset near the top of the 64-bit range ('[Errno 22]' or OverflowError)."""
    return build([entry("a.json", LINE, zip64_offset=(1 << 64) - 16)])


def test_a_version_needed_beyond_6_3_is_read(tmp_path: Path, inflater: str) -> None:
    with pytest.raises(NotImplementedError):
        zipfile.ZipFile(io.BytesIO(version_needed_sample()))
    (result,) = run_job(zip_job(write(tmp_path, version_needed_sample()), inflater=inflater))
    assert result.error is None and result.events == 3


#: Every value a directory carries, pushed out of range one at a time: each is BAD_ZIP naming the entry.
OUT_OF_RANGE = {
    "zip64 offset near 2**64": dict(zip64_offset=(1 << 64) - 16),
    "zip64 offset past the file": dict(zip64_offset=1 << 40),
    "offset into the directory": dict(central={"csize": 0}, zip64_offset=0xFFFFFFF0),
    "compressed size past the file": dict(central={"csize": 0xFFFFFFF0}, local={"csize": 0xFFFFFFF0}),
    "name of 65535 bytes": dict(central={"name": b"x" * 65535}),
    # Two fields are 0xFFFFFFFF (the size, and the offset the extra field holds), one value given.
    "zip64 extra field too short": dict(central={"usize": 0xFFFFFFFF}, zip64_offset=0),
}


@pytest.mark.parametrize("change", OUT_OF_RANGE.values(), ids=OUT_OF_RANGE.keys())
def test_every_value_out_of_range_is_bad_zip_naming_the_entry(tmp_path: Path, change: dict) -> None:
    sample = build([entry("ok.json", LINE), entry("bad.json", LINE, **change)])
    with pytest.raises((errors.BadZip, errors.ZipBomb)) as raised:
        plan_zip(write(tmp_path, sample), LIMITS)
    error = raised.value
    assert isinstance(error, errors.BadZip) or error.detail["reason"] in (
        "header_mismatch",
        "overlapping_entries",
    )
    assert "Errno" not in error.message and "Errno" not in str(error.detail)
    assert "bad.json" in error.message or error.detail.get("entry") == 1


@pytest.mark.parametrize("cut", [1, 5, 21, 22, 40, 46, 60])
def test_directory_records_cut_anywhere_are_bad_zip(tmp_path: Path, cut: int) -> None:
    sample = bytearray(build([entry("a.json", LINE), entry("b.json", LINE)]))
    end = sample.rfind(b"PK\x05\x06")
    size = struct.unpack_from("<I", sample, end + 12)[0]
    struct.pack_into("<I", sample, end + 12, size - cut)  # the directory claims fewer bytes than it has
    with pytest.raises(errors.BadZip) as raised:
        plan_zip(write(tmp_path, bytes(sample)), LIMITS)
    assert "Errno" not in raised.value.message


# -------------------------------------------------------------- class 2: drain before calling it truncated


def drain_sample() -> tuple[bytes, int]:
    """Fixed-Huffman deflate of 1 MiB + 42 bytes whose output cap (1 MiB per step) falls inside the last
    back-reference once zlib has taken all the input: zlib still holds output when the input is over."""
    lines = [
        b'{"id":"%d","type":"PushEvent","actor":{"id":%d}}\n' % (i * 7919, i % 97) for i in range(40_000)
    ]
    body = b"".join(lines)
    cut = body.rfind(b"\n", 0, (1 << 20) - 300) + 1
    payload = body[:cut] + b" " * ((1 << 20) + 42 - cut)  # the length found by a search for the edge
    return build([entry("edge.json", payload, strategy=zlib.Z_FIXED)]), body[:cut].count(b"\n")


def test_the_sample_has_its_edge() -> None:
    sample, _ = drain_sample()
    info = zipfile.ZipFile(io.BytesIO(sample)).infolist()[0]
    data = sample[30 + len(info.filename) : 30 + len(info.filename) + info.compress_size]
    d = zlib.decompressobj(-15)
    d.decompress(data, 1 << 20)
    assert not d.unconsumed_tail and not d.eof  # all input taken, output still held


def test_a_valid_entry_ending_in_a_back_reference_is_read_whole(tmp_path: Path, inflater: str) -> None:
    sample, events = drain_sample()
    with zipfile.ZipFile(io.BytesIO(sample)) as zf:
        assert zf.read("edge.json").count(b"\n") == events
    (result,) = run_job(zip_job(write(tmp_path, sample), inflater=inflater))
    assert result.error is None and result.events == events


# ------------------------------------------------------------------------- class 3: bombs under each limit


@functools.cache
def layered_sample() -> bytes:
    """A .json.gz inside a deflated ZIP entry: each layer under 200:1, together ~15,000:1."""
    inner = b"".join(b'{"a":%d}' % (i % 10) + b" " * 300 + b"\n" for i in range((4 << 20) // 308))
    gz = zlib.compressobj(9, zlib.DEFLATED, 31)
    gzipped = gz.compress(inner) + gz.flush()
    assert len(inner) / len(gzipped) < 200
    sample = build([entry("hour.json.gz", gzipped)])
    assert len(gzipped) / (len(sample) - 200) < 200
    return sample


def test_ratios_multiplied_across_layers_are_a_bomb(tmp_path: Path, inflater: str) -> None:
    (result,) = run_job(zip_job(write(tmp_path, layered_sample()), inflater=inflater))
    assert result.error is not None and result.error["code"] == "ZIP_BOMB"
    assert result.error["produced"] <= 2 << 20  # stopped within the floor's reach, not at 4 MB


@functools.cache
def under_the_floor_sample(count: int = 2000) -> bytes:
    """Entries each just under the 1 MiB ratio floor (~1000:1 each), which add up."""
    payload = b" " * ((1 << 20) - 1)
    one = entry("x.json", payload)
    return build([Raw(f"{i}.json".encode(), one.data, DEFLATED, one.crc, one.usize) for i in range(count)])


def test_entries_under_the_floor_add_up_to_a_bomb_before_any_inflating(tmp_path: Path) -> None:
    with pytest.raises(errors.ZipBomb) as raised:
        plan_zip(write(tmp_path, under_the_floor_sample()), LIMITS)
    detail = raised.value.detail
    assert detail["reason"] == "upload_ratio"
    assert detail["declared_uncompressed_bytes"] > detail["limit"] == 200 * detail["upload_bytes"]


def test_gzip_layers_get_their_share_reserved_before_inflating(tmp_path: Path) -> None:
    part = gzip.compress(LINE * 20_000, 9)  # ~1 MB of JSON from a few KB: 300:1 within one gzip
    sample = build([entry(f"p{i}.json.gz", part, STORED) for i in range(3)])
    plan = plan_zip(write(tmp_path, sample), LIMITS)
    budget = 200 * len(sample)
    assert sum(e.declared_size + e.gzip_budget for e in plan.entries) <= budget


@functools.cache
def gzip_bomb() -> bytes:
    return gzip.compress(b" " * (16 << 20))


def test_the_ratio_guard_trips_within_a_few_mib_of_output(tmp_path: Path, inflater: str) -> None:
    path = write(tmp_path, gzip_bomb(), "spaces.gz")
    (result,) = run_job(Job(str(path), "gzip", inflater=inflater, display_name="spaces.json.gz"))
    assert result.error is not None and result.error["code"] == "ZIP_BOMB"
    assert result.error["produced"] <= 4 << 20  # was ~51 MB: consumption counted per 256 KiB read
    assert "archive" not in result.error["message"]  # a plain gzip upload has no archive headers


@pytest.mark.parametrize("method", [BZIP2, LZMA])
def test_opaque_decompressors_are_metered_closely_too(tmp_path: Path, method: int, inflater: str) -> None:
    # bz2 and LZMA do not say how much input they used: a gzip bomb inside a bz2/LZMA entry is still
    # stopped within a few MiB, the bytes of the upload they consumed being counted 16 KiB at a time.
    sample = build([entry("s.json.gz", gzip_bomb(), method)])
    (result,) = run_job(zip_job(write(tmp_path, sample), inflater=inflater))
    assert result.error is not None and result.error["code"] == "ZIP_BOMB"
    assert result.error["produced"] <= 2 << 20


# -------------------------------------------------------------------------- class 4: headers that lie


LIES = {
    "name": {"name": b"other.json"},
    "method": {"method": STORED},
    "crc": {"crc": 1},
    "compressed_size": {"csize": 3},
    "uncompressed_size": {"usize": 3},
    "encrypted": {"flags": 1},
    "data_descriptor": {"flags": 8},
}


@pytest.mark.parametrize("field", LIES)
def test_a_local_header_that_contradicts_the_directory_is_refused(tmp_path: Path, field: str) -> None:
    sample = build([entry("ok.json", LINE), entry("a.json", LINE * 40, local=LIES[field])])
    with pytest.raises(errors.ZipBomb) as raised:
        plan_zip(write(tmp_path, sample), LIMITS)
    assert raised.value.detail == {"reason": "header_mismatch", "entry": "a.json", "field": field}


def test_a_data_descriptor_entry_with_zero_local_sizes_is_honest(tmp_path: Path, inflater: str) -> None:
    honest = entry("a.json", LINE * 40, flags=8, local={"crc": 0, "csize": 0, "usize": 0})
    (result,) = run_job(zip_job(write(tmp_path, build([honest])), inflater=inflater))
    assert result.error is None and result.events == 40


# ---------------------------------------------------------------------------- class 7: smaller points


def test_lzma_properties_are_decoded_without_private_functions() -> None:
    props = bytes([(2 * 5 + 0) * 9 + 3]) + struct.pack("<I", 1 << 23)
    assert lzma1_filter(props) == {"id": lzma.FILTER_LZMA1, "lc": 3, "lp": 0, "pb": 2, "dict_size": 1 << 23}
    for bad in (b"", bytes([225]) + b"\0" * 4, b"\x5d\0\0\x80"):
        with pytest.raises(DecompressionFailure):
            lzma1_filter(bad)


def test_zipfile_lzma_entries_are_read(tmp_path: Path) -> None:
    path = tmp_path / "l.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_LZMA) as zf:
        zf.writestr("a.json", LINE * 500)
    (result,) = run_job(zip_job(path))
    assert result.error is None and result.events == 500


# ------------------------------------------------------------------------------------- class 5: JSON rules


HUGE_INTEGER = b"9" * 5000


def streamed(data: bytes, chunk: int) -> FileResult:
    return extract_stream("f.json", io.BytesIO(data), chunk_size=chunk)


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", HUGE_INTEGER])
@pytest.mark.parametrize("layout", ["ndjson", "array", "pretty"])
def test_an_actor_id_no_integer_can_hold_is_an_invalid_actor(number: bytes, layout: str) -> None:
    good = b'{"type":"A","actor":{"id":1,"login":"a"}}'
    bad = b'{"type":"B","actor":{"id":' + number + b',"login":"b"}}'
    data = {
        "ndjson": good + b"\n" + bad + b"\n" + good + b"\n",
        "array": b"[" + good + b"," + bad + b"," + good + b"]",
        "pretty": good + b"\n" + bad.replace(b",", b",\n  ") + b"\n" + good + b"\n",
    }[layout]
    for result in (extract_bytes("f.json", data), streamed(data, 7), streamed(data, 1 << 20)):
        assert result.error is None, result.error
        assert result.events == 3 and result.skipped == {"invalid_actor": 1}
        assert list(result.actors) == [1] and result.actors[1].events == 2
        assert result.event_types == {"A": 2, "B": 1}


def test_unusable_numbers_elsewhere_are_null_not_a_failed_file() -> None:
    data = (
        b'{"id":1e400,"type":1e400,"created_at":' + HUGE_INTEGER + b',"repo":{"name":1e400},'
        b'"actor":{"id":5,"login":1e400}}\n1e400\n{"actor":1e400}\n'
    )
    out = io.BytesIO()
    result = extract_bytes("f.json", data, out)
    assert result.error is None
    assert result.events == 2 and result.skipped == {"not_an_object": 1, "invalid_actor": 1}
    assert result.event_types == {"<non-string>": 1, "<missing>": 1}
    first = orjson.loads(out.getvalue().splitlines()[0])
    assert (first["id"], first["type"], first["created_at"], first["repo"], first["actor_id"]) == (
        None,
        None,
        None,
        None,
        5,
    )
    assert first["actor_login"] is None


@pytest.mark.parametrize(
    ("data", "offset"),
    [
        (b'{"a": "\\ud800"}', 7),
        (b'{"a": "x\\ud800y"}\n', 8),
        (b'[{"a": 1}, "\\udc00"]', 12),
        (b'{"ok": "\\ud83d\\ude00"}\n{"a": "\\udfff"}', 30),
    ],
)
def test_a_lone_surrogate_is_named_as_such_not_truncation(data: bytes, offset: int) -> None:
    for result in (extract_bytes("f.json", data), streamed(data, 3)):
        assert result.error is not None and result.error["code"] == "INVALID_JSON"
        assert "surrogate" in result.error["message"] and "truncated" not in result.error["message"]
        assert result.error["offset"] == offset


def test_a_truncated_file_is_still_called_truncated() -> None:
    for data in (b'{"a": "abc', b'[{"a": 1}, {"b"', b'{"a": [1, 2'):
        for result in (extract_bytes("f.json", data), streamed(data, 2)):
            assert result.error is not None and "truncated" in result.error["message"]
            assert result.error["offset"] == len(data)


@pytest.mark.parametrize(
    "data",
    [
        b'{"actor": {"id": 1e400}, "b": x}',
        b'{"id": 1e400, "b": x}\n{}',
        b'[{"id": 1e400}, x]',
        b'{"type": ' + HUGE_INTEGER + b"\n",
    ],
)
def test_an_unusable_number_before_bad_json_is_still_invalid_json(data: bytes) -> None:
    # The lenient pass parses what the first pass did not reach: its syntax errors are the file's error.
    for result in (extract_bytes("f.json", data), streamed(data, 5)):
        assert result.error is not None and result.error["code"] == "INVALID_JSON"


def test_a_fault_before_an_open_value_is_reported_where_it_is() -> None:
    data = b'{"id": "1", "type": "PushEvent"}\n{"id": 2, oops\n'
    for result in (extract_bytes("f.json", data), streamed(data, 4)):
        assert result.error is not None and result.error["message"] == "invalid JSON"
        assert (result.error["line"], result.error["offset"]) == (2, data.index(b"oops"))
