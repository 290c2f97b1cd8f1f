"""Direct tests of ingest.archive over real ZIP files built (and, for the hostile ones, patched) here."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import examples
from upload_server import errors
from upload_server.ingest.archive import ArchiveLimits, ignore_reason, plan_zip

LIMITS = ArchiveLimits(max_entries=100, max_uncompressed_bytes=1 << 30, max_ratio=200.0)
EVENT = b'{"type": "PushEvent", "actor": {"id": 1, "login": "a"}}\n'


def make_zip(path: Path, entries: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


#: (central-directory offset, local-header offset) of fields that both headers carry.
FLAGS, METHOD, CRC = (8, 6), (10, 8), (16, 14)


def patch_both(raw: bytearray, record: int, where: tuple[int, int], value: int) -> None:
    """Set one 16-bit field (or the 32-bit CRC) in a central record and in its local header alike, as an
    honest writer would have written it."""
    fmt = "<I" if where == CRC else "<H"
    local = struct.unpack_from("<I", raw, record + 42)[0]
    struct.pack_into(fmt, raw, record + where[0], value)
    struct.pack_into(fmt, raw, local + where[1], value)


def central_records(raw: bytes) -> list[int]:
    """Offsets of the central-directory file headers in ``raw``."""
    out, i = [], raw.find(b"PK\x01\x02")
    while i >= 0:
        out.append(i)
        i = raw.find(b"PK\x01\x02", i + 4)
    return out


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_selection_and_ignored_reasons(tmp_path: Path) -> None:
    names = [
        "a.json",
        "dir/",
        "b.NDJSON",
        "c.jsonl.gz",
        "D.JSON.GZ",
        "__MACOSX/._a.json",
        ".DS_Store",
        "sub/._b.json",
        "inner.zip",
        "readme.txt",
        "x.txt.gz",
        "../../etc/evil.json",
        "a.json",  # a duplicate name: both are processed, told apart by index
    ]
    path = make_zip(tmp_path / "u.zip", [(n, b"" if n.endswith("/") else EVENT) for n in names])
    plan = plan_zip(path, LIMITS)
    assert [(e.index, e.name, e.gzipped) for e in plan.entries] == [
        (0, "a.json", False),
        (2, "b.NDJSON", False),
        (3, "c.jsonl.gz", True),
        (4, "D.JSON.GZ", True),
        (11, "../../etc/evil.json", False),
        (12, "a.json", False),
    ]
    assert plan.ignored == [
        ("dir/", "directory"),
        ("__MACOSX/._a.json", "macos_metadata"),
        (".DS_Store", "hidden_file"),
        ("sub/._b.json", "hidden_file"),
        ("inner.zip", "nested_archive"),
        ("readme.txt", "unsupported_name"),
        ("x.txt.gz", "unsupported_name"),
    ]
    assert plan.failed == []
    first = plan.entries[0]
    assert first.declared_size == len(EVENT) and first.compressed_size > 0


@pytest.mark.parametrize(
    "method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]
)
def test_every_supported_method_is_selected(tmp_path: Path, method: int) -> None:
    plan = plan_zip(make_zip(tmp_path / "m.zip", [("e.json", EVENT * 100)], method), LIMITS)
    assert [e.name for e in plan.entries] == ["e.json"] and plan.failed == []


def test_no_json_files(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "n.zip", [("readme.md", b"hi"), ("__MACOSX/x.json", b"{}")])
    with pytest.raises(errors.NoJsonFiles) as ei:
        plan_zip(path, LIMITS)
    assert ei.value.status == 422 and ei.value.detail["entries"] == 2


def test_empty_archive_has_no_json_files(tmp_path: Path) -> None:
    with pytest.raises(errors.NoJsonFiles):
        plan_zip(make_zip(tmp_path / "empty.zip", []), LIMITS)


@pytest.mark.parametrize("data", [b"", b"PK", b"not a zip at all" * 100, b"PK\x03\x04" + b"\0" * 200])
def test_not_a_zip_is_bad_zip(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bad.zip"
    path.write_bytes(data)
    with pytest.raises(errors.BadZip):
        plan_zip(path, LIMITS)


@settings(max_examples=examples(40))
@given(cut=st.integers(1, 10_000))
def test_any_truncation_is_bad_zip(tmp_path_factory: pytest.TempPathFactory, cut: int) -> None:
    tmp = tmp_path_factory.mktemp("trunc")
    raw = make_zip(tmp / "t.zip", [("a.json", EVENT * 50), ("b.json", EVENT * 80)]).read_bytes()
    (tmp / "t.zip").write_bytes(raw[: len(raw) - 1 - cut % (len(raw) - 1)])
    with pytest.raises(errors.BadZip):
        plan_zip(tmp / "t.zip", LIMITS)


def test_entry_count_limit(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "c.zip", [(f"{i}.json", EVENT) for i in range(6)])
    assert len(plan_zip(path, ArchiveLimits(6, 1 << 30, 200.0)).entries) == 6
    with pytest.raises(errors.ZipBomb) as ei:
        plan_zip(path, ArchiveLimits(5, 1 << 30, 200.0))
    assert ei.value.detail == {"reason": "too_many_entries", "entries": 6, "max_entries": 5}


def test_ratio_limit_applies_above_the_floor_only(tmp_path: Path) -> None:
    small = make_zip(tmp_path / "s.zip", [("zeros.json", b" " * (1 << 19))])  # ~500:1 but under 1 MiB
    assert len(plan_zip(small, LIMITS).entries) == 1
    big = make_zip(tmp_path / "b.zip", [("ok.json", EVENT), ("zeros.json", b" " * (4 << 20))])
    with pytest.raises(errors.ZipBomb) as ei:
        plan_zip(big, LIMITS)
    d = ei.value.detail
    assert d["reason"] == "ratio" and d["entry"] == "zeros.json" and d["declared_size"] == 4 << 20
    assert d["ratio"] > 200
    # An ignored entry is never decompressed, so its ratio does not matter.
    ignored = make_zip(tmp_path / "i.zip", [("ok.json", EVENT), ("zeros.txt", b" " * (4 << 20))])
    assert [e.name for e in plan_zip(ignored, LIMITS).entries] == ["ok.json"]


def test_total_uncompressed_limit(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "t.zip", [("a.json", EVENT * 100), ("b.json", EVENT * 100)])
    total = 2 * len(EVENT) * 100
    assert plan_zip(path, ArchiveLimits(10, total, 1e9)).entries
    with pytest.raises(errors.ZipBomb) as ei:
        plan_zip(path, ArchiveLimits(10, total - 1, 1e9))
    assert ei.value.detail["declared_uncompressed_bytes"] == total


def test_overlapping_entries_are_a_zip_bomb(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "o.zip", [("a.json", EVENT * 100), ("b.json", EVENT * 100)])
    raw = bytearray(path.read_bytes())
    first, second = central_records(raw)
    # Point the second directory record at the first entry's local header (the "overlapping files" trick).
    raw[second + 42 : second + 46] = raw[first + 42 : first + 46]
    path.write_bytes(raw)
    with pytest.raises(errors.ZipBomb) as ei:
        plan_zip(path, LIMITS)
    assert ei.value.detail["reason"] == "overlapping_entries"


def test_entry_reaching_into_the_directory_is_a_zip_bomb(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "o.zip", [("a.json", EVENT * 100)], zipfile.ZIP_STORED)
    raw = bytearray(path.read_bytes())
    (rec,) = central_records(raw)
    size = struct.unpack_from("<I", raw, rec + 20)[0]
    struct.pack_into("<I", raw, rec + 20, size + 30)  # compressed size now covers part of the directory
    path.write_bytes(raw)
    with pytest.raises(errors.ZipBomb):
        plan_zip(path, LIMITS)


def test_bad_local_header_is_bad_zip(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "h.zip", [("a.json", EVENT)])
    raw = bytearray(path.read_bytes())
    raw[0:4] = b"XXXX"
    path.write_bytes(raw)
    with pytest.raises(errors.BadZip):
        plan_zip(path, LIMITS)


def test_encrypted_and_unsupported_entries_fail_individually(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "e.zip", [("ok.json", EVENT), ("secret.json", EVENT), ("d64.json", EVENT)])
    raw = bytearray(path.read_bytes())
    _, secret, d64 = central_records(raw)
    patch_both(raw, secret, FLAGS, raw[secret + 8] | 0x1)  # general purpose flag bit 0: encrypted
    patch_both(raw, d64, METHOD, 9)  # compression method 9: deflate64, which we do not read
    path.write_bytes(raw)
    plan = plan_zip(path, LIMITS)
    assert [e.name for e in plan.entries] == ["ok.json"]
    assert [(f.name, f.order, f.error and f.error["code"]) for f in plan.failed] == [
        ("secret.json", 1, "ENCRYPTED_ENTRY"),
        ("d64.json", 2, "UNSUPPORTED_COMPRESSION"),
    ]
    assert all(f.events == 0 and f.layout is None for f in plan.failed)


def test_only_encrypted_json_is_answered_not_rejected(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "e.zip", [("secret.json", EVENT)])
    raw = bytearray(path.read_bytes())
    (rec,) = central_records(raw)
    patch_both(raw, rec, FLAGS, raw[rec + 8] | 0x1)
    path.write_bytes(raw)
    plan = plan_zip(path, LIMITS)
    assert plan.entries == [] and len(plan.failed) == 1


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("x.json", None),
        ("a/b/c.JsonL", None),
        ("x.ndjson.gz", None),
        ("x.gz", "unsupported_name"),
        ("json", "unsupported_name"),
        ("x.json.bak", "unsupported_name"),
        ("a\\b\\", "directory"),
        ("a\\.hidden.json", "hidden_file"),
        ("x/__MACOSX/y.json", "macos_metadata"),
        ("x.json.zip", "nested_archive"),
        ("C:\\evil\\..\\x.json", None),
        ("/abs/x.json", None),
    ],
)
def test_ignore_reason(name: str, reason: str | None) -> None:
    assert ignore_reason(name) == reason
