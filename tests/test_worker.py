"""Direct tests of ingest.worker.run_job (called in-process). Expected counts come from the events each test
generates; hostile archives are built with zipfile and then patched byte by byte."""

from __future__ import annotations

import bz2
import gzip
import pickle
import struct
import time
import tracemalloc
import zipfile
import zlib
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest

import zipcraft
from upload_server.ingest import worker as worker_module
from upload_server.ingest.archive import ArchiveLimits, EntryPlan, plan_zip
from upload_server.ingest.extract import FileResult
from upload_server.ingest.worker import Job, run_job

LIMITS = ArchiveLimits(max_entries=50_000, max_uncompressed_bytes=1 << 34, max_ratio=200.0)


def events(n: int, seed: int, with_actor: bool = True) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        aid = seed * 1000 + i % 13
        ev: dict[str, Any] = {
            "id": f"{seed}-{i}",
            "type": ("PushEvent", "WatchEvent")[i % 2],
            "repo": {"id": 1, "name": f"o/r{seed}"},
            "payload": {"msg": "x" * (i % 50), "text": f"{i * 7919 % 100_003}"},
            "created_at": "2024-01-01T00:00:00Z",
        }
        if with_actor:
            ev["actor"] = {
                "id": aid,
                "login": f"u{aid}",
                "url": "",
                "avatar_url": "",
                "display_login": f"u{aid}",
            }
        out.append(ev)
    return out


def ndjson(evs: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(e) + b"\n" for e in evs)


def check(res: FileResult, evs: list[dict[str, Any]]) -> None:
    assert res.error is None, res.error
    assert res.events == len(evs)
    assert res.event_types == dict(Counter(e["type"] for e in evs))
    assert set(res.actors) == {e["actor"]["id"] for e in evs if "actor" in e}
    assert sum(a.events for a in res.actors.values()) == sum(1 for e in evs if "actor" in e)


def zip_job(path: Path, **kw: Any) -> Job:
    return Job(source_path=str(path), content_kind="zip", entries=tuple(plan_zip(path, LIMITS).entries), **kw)


def central_records(raw: bytes) -> list[int]:
    out, i = [], raw.find(b"PK\x01\x02")
    while i >= 0:
        out.append(i)
        i = raw.find(b"PK\x01\x02", i + 4)
    return out


# ---------------------------------------------------------------------------------------------------- happy


@pytest.mark.parametrize("budget", [64 << 20, 4096])  # whole in memory / streamed
def test_all_methods_gz_entries_and_layouts(tmp_path: Path, budget: int, inflater: str) -> None:
    files = {
        "stored.json": (zipfile.ZIP_STORED, ndjson(events(300, 1))),
        "deflate.ndjson": (zipfile.ZIP_DEFLATED, orjson.dumps(events(300, 2))),
        "bzip2.jsonl": (zipfile.ZIP_BZIP2, ndjson(events(300, 3)).replace(b"\n", b"\r\n")),
        "lzma.json": (zipfile.ZIP_LZMA, b"\xef\xbb\xbf" + ndjson(events(300, 4))),
        "inner.json.gz": (zipfile.ZIP_STORED, gzip.compress(ndjson(events(300, 5)))),
        "one.json": (zipfile.ZIP_DEFLATED, orjson.dumps(events(1, 6)[0], option=orjson.OPT_INDENT_2)),
    }
    path = tmp_path / "u.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, (method, data) in files.items():
            zf.writestr(name, data, compress_type=method)
    results = run_job(zip_job(path, inflater=inflater, memory_budget=budget))
    assert [r.name for r in results] == list(files)
    assert [r.order for r in results] == list(range(6))
    for seed, r in enumerate(results, start=1):
        check(r, events(300 if seed < 6 else 1, seed))
    assert [r.layout for r in results] == ["ndjson", "array", "ndjson", "ndjson", "ndjson", "object"]
    assert results[4].size_bytes == len(ndjson(events(300, 5)))  # uncompressed JSON bytes, not gzip bytes


@pytest.mark.parametrize("budget", [64 << 20, 4096])
def test_gzip_upload_multi_member(tmp_path: Path, budget: int, inflater: str) -> None:
    a, b = events(500, 1), events(700, 2)
    path = tmp_path / "hour.json.gz"
    path.write_bytes(gzip.compress(ndjson(a)) + gzip.compress(ndjson(b)) + b"\0" * 512)
    (res,) = run_job(
        Job(str(path), "gzip", inflater=inflater, display_name="hour.json.gz", memory_budget=budget)
    )
    check(res, a + b)
    assert res.name == "hour.json.gz" and res.size_bytes == len(ndjson(a) + ndjson(b))


@pytest.mark.parametrize("budget", [64 << 20, 4096])
def test_plain_json_upload(tmp_path: Path, budget: int) -> None:
    evs = events(400, 9)
    path = tmp_path / "u.json"
    path.write_bytes(orjson.dumps(evs))
    (res,) = run_job(Job(str(path), "json", display_name="u.json", memory_budget=budget))
    check(res, evs)
    assert res.layout == "array"


def test_job_pickles() -> None:
    job = Job(
        "/x", "zip", entries=(EntryPlan(0, "a.json", 1, 2, True, 10, 8, 123, 0, 4096),), events_path="/y"
    )
    assert pickle.loads(pickle.dumps(job)) == job


@pytest.fixture(scope="module")
def twenty_thousand_entries(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once for both inflaters (read only): writing 20,000 entries is ~0.9 s of CPU."""
    path = tmp_path_factory.mktemp("many") / "many.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(20_000):
            zf.writestr(f"d/{i}.json", b'{"type":"T","actor":{"id":%d}}' % (i % 100))
    return path


def test_twenty_thousand_tiny_entries_in_one_job(twenty_thousand_entries: Path, inflater: str) -> None:
    job = zip_job(twenty_thousand_entries, inflater=inflater)
    t0 = time.perf_counter()
    results = run_job(job)
    elapsed = time.perf_counter() - t0
    assert len(results) == 20_000 and all(r.events == 1 and r.error is None for r in results)
    assert elapsed < 10  # ~1 s here; generous for a shared machine


def test_traversal_like_names_are_labels_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["../../escape.json", "/abs/evil.json", "C:\\win\\x.json", "a/../../b.json"]
    path = tmp_path / "t.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for n in names:
            zf.writestr(n, ndjson(events(3, 1)))
    work = tmp_path / "deep" / "er"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before = {p for p in tmp_path.rglob("*")}
    results = run_job(zip_job(path))
    assert [r.name for r in results] == names and all(r.events == 3 for r in results)
    assert {p for p in tmp_path.rglob("*")} == before


# ----------------------------------------------------------------------------------------- events_path


def test_events_file_holds_only_lines_of_files_that_succeeded(tmp_path: Path) -> None:
    good1, good2 = events(40, 1), events(30, 2)
    path = tmp_path / "u.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("good1.json", ndjson(good1))
        zf.writestr("bad.json", ndjson(events(500, 3)) + b'{"broken": \n')
        zf.writestr("good2.json", ndjson(good2))
        zf.writestr("bomb.json", b" " * (4 << 20))  # caught by the guards below, after some output
    patch_sizes(path, 3, 1 << 17)  # the spaces entry now passes the plan and is caught while streaming
    out = tmp_path / "events.ndjson"
    job = zip_job(path, events_path=str(out), memory_budget=1 << 16)
    results = run_job(job)
    assert [r.error["code"] if r.error else None for r in results] == [None, "INVALID_JSON", None, "ZIP_BOMB"]
    lines = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert [(x["file"], x["id"]) for x in lines] == [("good1.json", e["id"]) for e in good1] + [
        ("good2.json", e["id"]) for e in good2
    ]


# ---------------------------------------------------------------------------------------------- hostile


def patch_sizes(path: Path, index: int, declared: int) -> None:
    """Make entry ``index`` lie about its uncompressed size (central directory and local header)."""
    raw = bytearray(path.read_bytes())
    rec = central_records(raw)[index]
    struct.pack_into("<I", raw, rec + 24, declared)
    local = struct.unpack_from("<I", raw, rec + 42)[0]
    struct.pack_into("<I", raw, local + 22, declared)
    path.write_bytes(raw)


@pytest.mark.parametrize(
    "method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]
)
def test_entry_larger_than_declared_is_a_zip_bomb(tmp_path: Path, method: int, inflater: str) -> None:
    data = ndjson(events(2000, 1))
    path = tmp_path / "lie.zip"
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        zf.writestr("ok.json", ndjson(events(5, 2)))
        zf.writestr("lie.json", data)
    patch_sizes(path, 1, 1000)
    for budget in (64 << 20, 512):
        ok, lie = run_job(zip_job(path, inflater=inflater, memory_budget=budget))
        check(ok, events(5, 2))
        assert lie.error is not None and lie.error["code"] == "ZIP_BOMB", lie.error
        assert lie.events == 0


def test_bzip2_bomb_with_lying_header_is_stopped_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "bz.zip"
    zeros = bz2.compress(b" " * (128 << 20))  # ~150 bytes that expand to 128 MiB
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_BZIP2) as zf:
        zf.writestr("small.json", b"{}")
    # Replace the entry's data with the bomb, keeping a tiny declared size.
    info = zipfile.ZipFile(path).infolist()[0]
    raw = bytearray(path.read_bytes())
    start = 30 + len(info.filename.encode()) + len(info.extra)
    new = raw[:start] + zeros
    cd = raw[start + info.compress_size :]
    delta = len(zeros) - info.compress_size
    new += cd
    struct.pack_into("<I", new, 18, len(zeros))  # local compressed size
    rec = central_records(new)[0]
    struct.pack_into("<I", new, rec + 20, len(zeros))
    struct.pack_into("<I", new, rec + 24, 2)
    eocd = new.rfind(b"PK\x05\x06")
    struct.pack_into("<I", new, eocd + 16, struct.unpack_from("<I", new, eocd + 16)[0] + delta)
    path.write_bytes(new)
    tracemalloc.start()
    try:
        (res,) = run_job(zip_job(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.error is not None and res.error["code"] == "ZIP_BOMB"
    assert peak < 32 << 20


def test_gzip_ratio_and_total_guards(tmp_path: Path, inflater: str) -> None:
    spaces = tmp_path / "spaces.gz"
    spaces.write_bytes(gzip.compress(b" " * (64 << 20)))
    (res,) = run_job(Job(str(spaces), "gzip", inflater=inflater))
    assert res.error is not None and res.error["code"] == "ZIP_BOMB"
    hour = tmp_path / "hour.gz"
    data = ndjson(events(3000, 1))
    hour.write_bytes(gzip.compress(data))
    (ok,) = run_job(Job(str(hour), "gzip", inflater=inflater, max_uncompressed_bytes=len(data)))
    assert ok.error is None
    (over,) = run_job(Job(str(hour), "gzip", inflater=inflater, max_uncompressed_bytes=len(data) - 1))
    assert over.error is not None and over.error["code"] == "ZIP_BOMB"


def test_gz_entry_inside_zip_is_guarded_and_ends_its_job(tmp_path: Path, inflater: str) -> None:
    path = tmp_path / "u.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ok.json", ndjson(events(3, 1)))
        zf.writestr("bomb.json.gz", gzip.compress(b" " * (32 << 20)))
        zf.writestr("after.json", ndjson(events(3, 2)))
    ok, bomb = run_job(
        zip_job(path, inflater=inflater)
    )  # a bomb fails the upload: the entries after it are not worked on
    check(ok, events(3, 1))
    assert bomb.error is not None and bomb.error["code"] == "ZIP_BOMB"


@pytest.mark.parametrize("cut", [1, 10, 100, 1000])
def test_truncated_gzip_is_bad_compressed_data(tmp_path: Path, cut: int, inflater: str) -> None:
    path = tmp_path / "t.gz"
    path.write_bytes(gzip.compress(ndjson(events(500, 1)))[:-cut])
    (res,) = run_job(Job(str(path), "gzip", inflater=inflater))
    assert res.error is not None and res.error["code"] == "BAD_COMPRESSED_DATA"


def test_garbage_after_gzip_is_bad_compressed_data(tmp_path: Path, inflater: str) -> None:
    path = tmp_path / "t.gz"
    path.write_bytes(gzip.compress(b"{}") + b"garbage")
    (res,) = run_job(Job(str(path), "gzip", inflater=inflater))
    assert res.error is not None and res.error["code"] == "BAD_COMPRESSED_DATA"


def test_corrupt_deflate_and_bad_crc(tmp_path: Path, inflater: str) -> None:
    path = tmp_path / "c.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("corrupt.json", ndjson(events(500, 1)))
        zf.writestr("crc.json", ndjson(events(500, 2)))
        zf.writestr("ok.json", ndjson(events(5, 3)))
    raw = bytearray(path.read_bytes())
    c0, c1, _ = central_records(raw)
    local0 = struct.unpack_from("<I", raw, c0 + 42)[0]
    for i in range(local0 + 60, local0 + 90):  # scribble over the deflate stream
        raw[i] ^= 0x5A
    crc = struct.unpack_from("<I", raw, c1 + 16)[0]
    local1 = struct.unpack_from("<I", raw, c1 + 42)[0]
    struct.pack_into("<I", raw, c1 + 16, crc ^ 1)  # both headers agree; the data does not
    struct.pack_into("<I", raw, local1 + 14, crc ^ 1)
    path.write_bytes(raw)
    corrupt, bad_crc, ok = run_job(zip_job(path, inflater=inflater))
    assert corrupt.error is not None and corrupt.error["code"] in {"BAD_COMPRESSED_DATA", "INVALID_JSON"}
    assert bad_crc.error is not None and bad_crc.error["code"] == "BAD_COMPRESSED_DATA"
    check(ok, events(5, 3))


def test_encrypted_entry_fails_in_the_worker_too(tmp_path: Path) -> None:
    path = tmp_path / "e.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.json", b"{}")
    job = zip_job(path)
    job = replace(job, entries=(msgspec.structs.replace(job.entries[0], flag_bits=1),))
    (res,) = run_job(job)
    assert res.error is not None and res.error["code"] == "ENCRYPTED_ENTRY"


def test_deep_nesting_fails_only_its_file(tmp_path: Path) -> None:
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("deep.json", b"[" * 100_000)
        zf.writestr("ok.json", ndjson(events(7, 1)))
    deep, ok = run_job(zip_job(path))
    assert deep.error is not None and deep.error["code"] == "JSON_TOO_DEEP"
    check(ok, events(7, 1))


# ------------------------------------------------------------------------- small entries inflated at once


def one_shot_cases() -> list[zipcraft.Raw]:
    """Small entries, honest and not, each one the fast path must judge as the usual way does."""
    payload = ndjson(events(20, 7))
    deflated = zipcraft.compress(payload, zipcraft.DEFLATED)
    crc = zlib.crc32(payload)
    zeros = bytes(60_000)  # ~100 bytes deflated: 600:1
    return [
        zipcraft.entry("honest.json", payload),
        zipcraft.entry("stored.json", payload, zipcraft.STORED),
        zipcraft.entry("empty.json", b""),
        zipcraft.Raw(b"truncated.json", deflated[:-9], zipcraft.DEFLATED, crc, len(payload)),
        zipcraft.Raw(b"bad-crc.json", deflated, zipcraft.DEFLATED, crc ^ 1, len(payload)),
        zipcraft.Raw(b"stored-bad-crc.json", payload, zipcraft.STORED, crc ^ 1, len(payload)),
        zipcraft.Raw(b"short-declared.json", deflated, zipcraft.DEFLATED, crc, len(payload) - 10),
        zipcraft.Raw(b"trailing.json", deflated + b"junk", zipcraft.DEFLATED, crc, len(payload)),
        zipcraft.Raw(b"garbage.json", b"\xff" * 64, zipcraft.DEFLATED, crc, len(payload)),
        zipcraft.entry("ratio.json", zeros),
    ]


def test_a_small_entry_inflated_at_once_is_judged_as_the_usual_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``worker._inflated_at_once`` (one read, one inflate for a small stored or deflated entry) gives each
    entry the result, or the error, that the chunked way gives it: the chunked way is the oracle. The ratio
    guard is set low enough (10:1 past 1 KB) that the zeros entry is a bomb."""
    taken: list[str] = []
    one_shot = worker_module._inflated_at_once

    def counted(f: Any, entry: EntryPlan, meter: Any, lib: Any) -> bytes | None:
        whole = one_shot(f, entry, meter, lib)
        if whole is not None:
            taken.append(entry.name)
        return whole

    codes: dict[str, str | None] = {}
    for number, case in enumerate(one_shot_cases()):  # one archive each: a bomb ends its job
        path = tmp_path / f"case-{number}.zip"
        path.write_bytes(zipcraft.build([case]))
        job = zip_job(path, max_ratio=10.0, ratio_floor_bytes=1000)
        monkeypatch.setattr(worker_module, "_inflated_at_once", counted)
        (fast,) = run_job(job)
        monkeypatch.setattr(worker_module, "_inflated_at_once", lambda *args: None)
        (usual,) = run_job(job)
        assert pickle.dumps(fast) == pickle.dumps(usual), case.name
        codes[usual.name] = usual.error and usual.error["code"]
    assert codes["honest.json"] is None and codes["stored.json"] is None and codes["empty.json"] is None
    assert codes["short-declared.json"] == codes["ratio.json"] == "ZIP_BOMB"
    assert codes["bad-crc.json"] == codes["stored-bad-crc.json"] == "BAD_COMPRESSED_DATA"
    assert codes["truncated.json"] is not None and codes["garbage.json"] is not None
    # The honest small entries went the short way (the bombs were stopped on it, by the meter's check).
    assert taken == ["honest.json", "stored.json", "empty.json", "trailing.json"]
