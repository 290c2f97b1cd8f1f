"""Direct tests of ingest.results. Expected totals are computed here from the FileResults' own inputs."""

from __future__ import annotations

import dataclasses
import io
import itertools
import random
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import examples
from upload_server.errors import TooManyEventTypes
from upload_server.ingest.assemble import write_pieces
from upload_server.ingest.extract import MAX_EVENT_TYPES, Actor, FileResult
from upload_server.ingest.results import (
    BATCH_BYTES,
    ActorRow,
    Frame,
    Merged,
    Merger,
    UploadReceipt,
    actor_line,
    actor_lines,
    file_line,
    fill,
    json_frame,
    merge,
    merge_chunks,
    merge_rows,
    merge_runs,
    ndjson_tail_frame,
    render_answer,
    summary_line,
    write_actors,
)
from upload_server.ingest.runs import JobRuns


def fr(name: str, order: int, actors: dict[int, tuple[Any, ...]], **kw: Any) -> FileResult:
    events = kw.pop("events", sum(a[5] for a in actors.values()))
    records = {aid: Actor(*rec) for aid, rec in actors.items()}
    return FileResult(
        name=name, layout="ndjson", size_bytes=100, events=events, actors=records, order=order, **kw
    )


def info(login: str, n: int) -> tuple[Any, ...]:
    return (login, login, f"https://a/{login}", f"https://u/{login}", "", n)


ANSWER_ARGS: dict[str, Any] = {
    "receipt": UploadReceipt(upload_id="u1", size_bytes=1234, sha256="ab" * 32, content_kind="zip"),
    "ignored": [("__MACOSX/x", "macos_metadata"), ("r.txt", "unsupported_name")],
    "timing_ms": {"receive": 1.5, "process": 20.0},
}


def test_merge_dedups_actors_first_seen_in_file_order_whatever_the_arrival_order() -> None:
    a = fr("a.json", 0, {5: info("old5", 2), 9: info("nine", 1)}, event_types={"PushEvent": 3})
    b = fr("b.json", 1, {5: info("new5", 4), 1: info("one", 1)}, event_types={"PushEvent": 2, "X": 3})
    bad = FileResult(
        name="bad.json", layout="ndjson", error={"code": "INVALID_JSON", "message": "m"}, order=2
    )
    for arrival in ([a, b, bad], [bad, b, a], [b, a, bad]):
        m = merge(arrival)
        assert [f.name for f in m.files] == ["a.json", "b.json", "bad.json"]
        assert list(m.actors) == [1, 5, 9]
        assert m.actors[5] == Actor(*info("old5", 0)[:5], 6)
        assert m.events == 8 and m.files_failed == 1
        assert m.event_types == {"PushEvent": 5, "X": 3}


@settings(max_examples=examples(100))
@given(
    st.lists(
        st.lists(st.tuples(st.integers(1, 30), st.sampled_from(["a", "b", "c"])), max_size=15),
        min_size=1,
        max_size=6,
    ),
    st.randoms(),
)
def test_merge_totals_match_independent_count(files: list[list[tuple[int, str]]], rnd: random.Random) -> None:
    # Each file is a list of (actor id, login) events; build the FileResults the way extract would.
    results = []
    for order, evs in enumerate(files):
        actors: dict[int, tuple[Any, ...]] = {}
        for aid, login in evs:
            if aid in actors:
                actors[aid] = (*actors[aid][:5], actors[aid][5] + 1)
            else:
                actors[aid] = (*info(f"{login}{order}", 0)[:5], 1)
        results.append(fr(f"{order}.json", order, actors, event_types={"T": len(evs)} if evs else {}))
    shuffled = results[:]
    rnd.shuffle(shuffled)
    merger = Merger()
    for r in shuffled:
        merger.add(r)
    m = merger.result()
    all_events = [ev for evs in files for ev in evs]
    assert m.events == len(all_events)
    assert dict(Counter(aid for aid, _ in all_events)) == {aid: rec.events for aid, rec in m.actors.items()}
    first_login = {}
    for order, evs in enumerate(files):
        for aid, login in evs:
            first_login.setdefault(aid, f"{login}{order}")
    assert {aid: rec.login for aid, rec in m.actors.items()} == first_login
    assert list(m.actors) == sorted(m.actors)


def test_render_answer_shape() -> None:
    ok = fr(
        "a.json", 0, {7: info("seven", 2)}, skipped={"no_actor": 1, "invalid_actor": 2}, event_types={"P": 5}
    )
    ok.events = 5
    bad = FileResult(name="b.json", error={"code": "INVALID_JSON", "message": "x", "line": 3}, order=1)
    m = merge([bad, ok])
    ans = render_answer(m, include_actors=True, **ANSWER_ARGS)
    assert list(ans) == [
        "upload_id",
        "size_bytes",
        "sha256",
        "content_kind",
        "summary",
        "files",
        "ignored",
        "actors",
        "timing_ms",
    ]
    assert ans["summary"] == {
        "files": 2,
        "files_failed": 1,
        "files_ignored": 2,
        "events": 5,
        "skipped": {"invalid_actor": 2, "no_actor": 1},
        "unique_actors": 1,
        "event_types": {"P": 5},
    }
    assert ans["files"] == [
        {
            "name": "a.json",
            "layout": "ndjson",
            "size_bytes": 100,
            "events": 5,
            "skipped": {"invalid_actor": 2, "no_actor": 1},
            "error": None,
        },
        {
            "name": "b.json",
            "layout": None,
            "size_bytes": 0,
            "events": 0,
            "skipped": {},
            "error": {"code": "INVALID_JSON", "message": "x", "line": 3},
        },
    ]
    assert ans["ignored"] == [
        {"name": "__MACOSX/x", "reason": "macos_metadata"},
        {"name": "r.txt", "reason": "unsupported_name"},
    ]
    assert ans["actors"] == [
        {
            "id": 7,
            "login": "seven",
            "display_login": "seven",
            "avatar_url": "https://a/seven",
            "url": "https://u/seven",
            "gravatar_id": "",
            "events": 2,
        }
    ]
    assert ans["timing_ms"] == {"receive": 1.5, "process": 20.0}
    orjson.dumps(ans)  # serialisable as is
    assert "actors" not in render_answer(m, include_actors=False, **ANSWER_ARGS)


def test_ndjson_lines() -> None:
    m = merge([fr("a.json", 0, {i: info(f"u{i}", 1) for i in range(2500)})])
    chunks = list(actor_lines(m.actors.items(), batch=1000))
    assert len(chunks) == 3
    lines = b"".join(chunks).splitlines(keepends=True)
    assert len(lines) == 2500 and all(x.endswith(b"\n") for x in lines)
    first = orjson.loads(lines[0])
    assert first == {
        "kind": "actor",
        "id": 0,
        "login": "u0",
        "display_login": "u0",
        "avatar_url": "https://a/u0",
        "url": "https://u/u0",
        "gravatar_id": "",
        "events": 1,
    }
    assert actor_line(0, m.actors[0]) == lines[0]
    f = orjson.loads(file_line(m.files[0]))
    assert f == {"kind": "file", "name": "a.json", "layout": "ndjson", "size_bytes": 100, "events": 2500} | {
        "skipped": {},
        "error": None,
    }
    s = summary_line(m, **ANSWER_ARGS)
    assert s.endswith(b"\n") and s.count(b"\n") == 1
    body = orjson.loads(s)
    assert body["kind"] == "summary" and body["summary"]["unique_actors"] == 2500
    assert body["upload_id"] == "u1" and body["ignored"][0]["reason"] == "macos_metadata"
    assert "files" not in body and "actors" not in body


def test_empty_merge() -> None:
    m = merge([])
    assert m.summary(0) == {
        "files": 0,
        "files_failed": 0,
        "files_ignored": 0,
        "events": 0,
        "skipped": {},
        "unique_actors": 0,
        "event_types": {},
    }
    assert list(actor_lines(m.actors.items())) == []


@settings(max_examples=60, deadline=None)
@given(
    files=st.lists(
        st.dictionaries(
            st.integers(min_value=-3, max_value=40),
            st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(min_value=1, max_value=5)),
            max_size=25,
        ),
        max_size=8,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=8), max_size=4),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_merge_runs_follows_the_merger_rule(
    files: list[dict[int, tuple[str, int]]], cuts: list[int], seed: int
) -> None:
    """Files grouped into jobs (each job's run made by a Merger), the runs merged as streams, equal the
    one in-memory merge of every file, whatever the files' orders and the grouping."""
    orders = random.Random(seed).sample(range(100), len(files))
    results = [
        fr(f"f{n}.json", orders[n], {aid: info(f"{tag}{aid}", count) for aid, (tag, count) in actors.items()})
        for n, actors in enumerate(files)
    ]
    bounds = sorted({0, len(results), *(cut for cut in cuts if cut <= len(results))})
    runs = []
    for start, end in itertools.pairwise(bounds):
        job = Merger()
        job.extend(results[start:end])
        runs.append(job.actor_run())
    assert list(merge_runs(runs)) == list(merge(results).actors.items())


def _filled(frame: Frame, merged: Merged, cuts: list[int], tmp: Path, *, ndjson: bool) -> bytes:
    """The answer as the server assembles it: the actors cut into parts at ``cuts`` (indexes), each written
    to its file by ``write_actors``, the frame filled in with them."""
    actors = list(merged.actors.items())
    edges = [0, *sorted(cuts), len(actors)]
    parts = []
    for number, (start, end) in enumerate(itertools.pairwise(edges)):
        path = tmp / f"part-{number}"
        with open(path, "wb") as out:
            parts.append((str(path), write_actors(out, actors[start:end], ndjson=ndjson)))
    assert [count for _, count in parts] == [end - start for start, end in itertools.pairwise(edges)]
    out = io.BytesIO()
    write_pieces(out, fill(frame, len(actors), parts, ANSWER_ARGS["timing_ms"]))
    return out.getvalue()


@settings(max_examples=examples(60), deadline=None)
@given(
    count=st.integers(0, 2500),
    cuts=st.lists(st.floats(0, 1), max_size=5),
    include_actors=st.booleans(),
    failed=st.booleans(),
)
def test_a_frame_filled_with_parts_is_the_answer_byte_for_byte(
    count: int, cuts: list[float], include_actors: bool, failed: bool
) -> None:
    """However the actors are cut into parts (none, empty ones, one each), the frame filled in with them is
    byte for byte the answer rendered whole: JSON with or without its actors, and the NDJSON tail."""
    a = fr("a.json", 0, {i * 7 - 900: info(f"u{i}", 1 + i % 3) for i in range(count)})
    bad = FileResult(
        name="bad.json", layout="ndjson", error={"code": "INVALID_JSON", "message": "m"}, order=1
    )
    m = merge([a, bad] if failed else [a])
    indexes = [int(cut * count) for cut in cuts]
    args = {key: ANSWER_ARGS[key] for key in ("receipt", "ignored")}
    with tempfile.TemporaryDirectory() as tmp:
        frame = json_frame(dataclasses.replace(m), **args, include_actors=include_actors)
        answer = _filled(frame, m, indexes if include_actors else [], Path(tmp), ndjson=False)
        assert answer == orjson.dumps(render_answer(m, include_actors=include_actors, **ANSWER_ARGS))
        tail = _filled(ndjson_tail_frame(dataclasses.replace(m), **args), m, indexes, Path(tmp), ndjson=True)
    expected = b"".join(actor_lines(m.actors.items())) + b"".join(map(file_line, m.files))
    assert tail == expected + summary_line(m, **ANSWER_ARGS)


class CountingWrites(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def write(self, data: Any) -> int:
        self.largest = max(self.largest, len(data))
        return super().write(data)


def test_large_actors_are_written_a_megabyte_at_a_time() -> None:
    """Twenty actors of 300 KB each: the JSON answer's actor items and the actor lines are the same bytes as
    rendered whole, and no write or item holds more than BATCH_BYTES and one actor more."""
    m = merge([fr("a.json", 0, {i: info("x" * 300_000 + str(i), 1) for i in range(20)})])
    out = CountingWrites()
    assert write_actors(out, m.actors.items(), ndjson=False) == 20
    whole = orjson.dumps(render_answer(m, include_actors=True, **ANSWER_ARGS)["actors"])
    assert out.getvalue() == whole[1:-1]
    assert out.largest < BATCH_BYTES + 310_000
    items = list(actor_lines(m.actors.items()))
    assert b"".join(items) == b"".join(actor_line(aid, rec) for aid, rec in m.actors.items())
    assert len(items) > 1 and max(map(len, items)) < BATCH_BYTES + 310_000


# ---------------------------------------------------------------------------------- event types: the bound


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, MAX_EVENT_TYPES), min_size=1, max_size=5),
    overlap=st.integers(0, MAX_EVENT_TYPES),
    seed=st.integers(0, 1000),
)
def test_distinct_types_across_files_are_bounded_in_any_order(
    sizes: list[int], overlap: int, seed: int
) -> None:
    """Each file keeps to the bound (extract fails a file past it); their union may not pass it either,
    whatever order the results arrive in, in a Merger and in a job's JobRuns alike."""
    shared = [f"S{i}" for i in range(overlap)]
    files = [
        fr(
            f"{n}.json",
            n,
            {},
            events=size,
            event_types=dict.fromkeys(
                shared[:size] + [f"F{n}.{i}" for i in range(size - min(size, overlap))], 1
            ),
        )
        for n, size in enumerate(sizes)
    ]
    union = Counter[str]()
    for f in files:
        union.update(f.event_types)
    random.Random(seed).shuffle(files)
    merger = Merger()
    job = JobRuns(io.BytesIO(), limit=1000, byte_limit=1 << 20)
    if len(union) <= MAX_EVENT_TYPES:
        merger.extend(msgspec.structs.replace(f) for f in files)
        assert merger.result().event_types == dict(sorted(union.items()))
        for f in files:
            job.end_file(f)
            assert f.event_types == {}  # taken out of the result: the job holds one set, not one per file
        assert job.event_types == dict(union)
    else:
        with pytest.raises(TooManyEventTypes) as refused:
            merger.extend(files)
        assert refused.value.status == 422 and refused.value.code == "TOO_MANY_EVENT_TYPES"
        assert refused.value.detail == {"limit": MAX_EVENT_TYPES}
        with pytest.raises(TooManyEventTypes):
            for f in files:
                job.end_file(f)


def test_a_failed_file_types_count_for_nothing() -> None:
    job = JobRuns(io.BytesIO(), limit=1000, byte_limit=1 << 20)
    failed = fr("bad.json", 0, {}, event_types={f"T{i}": 1 for i in range(MAX_EVENT_TYPES)})
    failed.error = {"code": "INVALID_JSON", "message": "invalid JSON"}
    good = fr("good.json", 1, {}, event_types={"PushEvent": 3})
    assert merge([failed, good]).event_types == {"PushEvent": 3}
    job.end_file(failed)
    job.end_file(good)
    assert job.event_types == {"PushEvent": 3}


@settings(max_examples=examples(150), deadline=None)
@given(
    runs=st.lists(
        st.dictionaries(st.integers(-20, 20), st.tuples(st.integers(0, 3), st.integers(1, 3)), max_size=25),
        max_size=6,
    ),
    cuts=st.lists(st.integers(0, 25), max_size=8),
)
def test_merge_chunks_is_the_stable_sort_of_all_rows_folded(
    runs: list[dict[int, tuple[int, int]]], cuts: list[int]
) -> None:
    """Runs (sorted by id, each id once; ``(order, events)`` per id) cut into chunks anywhere, empty ones
    too: the merge is every row sorted stably by (id, order) (so equal keys keep the earlier run's row),
    then each id's rows folded into the first, events summed."""
    tagged = [
        [
            ActorRow(f"r{number}", None, None, None, None, events, aid, order)
            for aid, (order, events) in sorted(run.items())
        ]
        for number, run in enumerate(runs)
    ]
    chunked = []
    for rows in tagged:
        edges = [0, *sorted(cut for cut in cuts if cut <= len(rows)), len(rows)]
        chunked.append([rows[start:end] for start, end in itertools.pairwise(edges)])
    expected: dict[int, ActorRow] = {}
    for row in sorted(itertools.chain(*tagged), key=lambda r: (r.id, r.order)):
        first = expected.get(row.id)
        expected[row.id] = (
            row if first is None else msgspec.structs.replace(first, events=first.events + row.events)
        )
    assert list(merge_chunks(chunked)) == list(expected.values())
    assert list(merge_rows(tagged)) == list(expected.values())
