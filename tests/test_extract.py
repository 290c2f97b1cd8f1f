"""Direct tests of ingest.extract. Expected counts are computed here from the generated Python objects."""

from __future__ import annotations

import io
import json
import pickle
import tracemalloc
from collections import Counter
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import examples
from upload_server.ingest.extract import (
    MAX_EVENT_TYPE_LENGTH,
    MAX_EVENT_TYPES,
    Actor,
    FileResult,
    extract_bytes,
    extract_stream,
)

INT64_MAX = (1 << 63) - 1


# ---------------------------------------------------------------------------------------------- ground truth


def expected_counts(items: list[Any]) -> dict[str, Any]:
    """Count what the rules say, straight from the Python values (no parsing involved)."""
    events = 0
    skipped: Counter[str] = Counter()
    types: Counter[str] = Counter()
    actors: dict[int, list[Any]] = {}
    for it in items:
        if not isinstance(it, dict):
            skipped["not_an_object"] += 1
            continue
        events += 1
        t = it.get("type")
        if isinstance(t, str):
            types[t if len(t) <= MAX_EVENT_TYPE_LENGTH else "<too-long>"] += 1
        else:
            types["<missing>" if t is None else "<non-string>"] += 1
        a = it.get("actor")
        if a is None:
            skipped["no_actor"] += 1
        elif (
            isinstance(a, dict)
            and isinstance(a.get("id"), int)
            and not isinstance(a.get("id"), bool)
            and -(1 << 63) <= a["id"] <= INT64_MAX
        ):
            aid = a["id"]
            if aid in actors:
                actors[aid][5] += 1
            else:
                keys = ("login", "display_login", "avatar_url", "url", "gravatar_id")
                actors[aid] = [a.get(k) for k in keys] + [1]
        else:
            skipped["invalid_actor"] += 1
    return {
        "events": events,
        "skipped": dict(skipped),
        "event_types": dict(types),
        "actors": {k: Actor(*v) for k, v in actors.items()},
    }


def assert_matches(res: FileResult, items: list[Any]) -> None:
    exp = expected_counts(items)
    assert res.error is None, res.error
    assert res.events == exp["events"]
    assert res.skipped == exp["skipped"]
    assert res.event_types == exp["event_types"]
    assert res.actors == exp["actors"]


def stream_result(data: bytes, chunk: int = 7, **kw: Any) -> FileResult:
    return extract_stream("f.json", io.BytesIO(data), chunk_size=chunk, **kw)


# ----------------------------------------------------------------------------------------------- strategies

text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
json_values = st.recursive(
    scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(text, kids, max_size=3), max_leaves=8
)
actor_ids = st.integers(1, 40) | st.integers(-(1 << 63), INT64_MAX) | st.integers(INT64_MAX + 1, 1 << 70)
good_actor = st.fixed_dictionaries(
    {"id": actor_ids},
    optional={
        "login": text,
        "display_login": text,
        "avatar_url": text,
        "url": text,
        "gravatar_id": st.just(""),
    },
)
bad_actor = (
    st.fixed_dictionaries(
        {"id": st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | text | st.none()}
    )
    | st.fixed_dictionaries({"login": text})
    | st.lists(scalars, max_size=2)
    | text
    | st.integers()
)
event = st.fixed_dictionaries(
    {},
    optional={
        "id": text,
        "type": st.sampled_from(["PushEvent", "WatchEvent", "CreateEvent"]) | scalars,
        "actor": good_actor | good_actor | bad_actor | st.none(),
        "repo": st.fixed_dictionaries({"name": text}) | scalars,
        "payload": json_values,
        "created_at": text,
    },
)
item = event | event | event | scalars | st.lists(scalars, max_size=2)


def dumps(v: Any, pretty: bool = False) -> bytes:
    return json.dumps(v, ensure_ascii=False, indent=2 if pretty else None).encode()


def render(items: list[Any], layout: str, bom: bool, crlf: bool) -> bytes:
    if layout == "array":
        body = b"[" + b",\n ".join(dumps(v) for v in items) + b"]"
    elif layout == "ndjson":
        body = b"".join(dumps(v) + b"\n" for v in items)
    elif layout == "concat":  # objects glued together, no separator where JSON allows it
        body = b"".join(
            dumps(v) if isinstance(v, dict | list) or v is None else b" " + dumps(v) + b" " for v in items
        )
    else:  # pretty-printed, blank lines between
        body = b"\n\n".join(dumps(v, pretty=True) for v in items)
    if crlf:
        body = body.replace(b"\n", b"\r\n")
    return (b"\xef\xbb\xbf" if bom else b"") + body


# ------------------------------------------------------------------------------------------------ properties


@settings(max_examples=examples(300), suppress_health_check=[HealthCheck.too_slow])
@given(
    items=st.lists(item, max_size=12),
    layout=st.sampled_from(["array", "ndjson", "concat", "pretty"]),
    bom=st.booleans(),
    crlf=st.booleans(),
    chunk=st.integers(1, 64),
)
def test_counts_match_ground_truth_in_every_layout(
    items: list[Any], layout: str, bom: bool, crlf: bool, chunk: int
) -> None:
    # By the layout rule a file whose first value is an array IS the array layout (covered separately).
    assume(layout == "array" or not (items and isinstance(items[0], list)))
    data = render(items, layout, bom, crlf)
    mem = extract_bytes("f.json", data)
    streamed = stream_result(data, chunk=chunk)
    assert_matches(mem, items)
    assert_matches(streamed, items)
    assert mem.size_bytes == streamed.size_bytes == len(data)
    if layout == "array":
        expected_layout = "array"
    elif len(items) == 1 and isinstance(items[0], dict):
        expected_layout = "object"
    else:
        expected_layout = "ndjson"
    assert mem.layout == streamed.layout == expected_layout


class CollectingSpill:
    """An ``ActorSpill`` that keeps each set it is handed, for the tests to fold again."""

    def __init__(self, limit: int, byte_limit: int) -> None:
        self.limit = limit
        self.byte_limit = byte_limit
        self.sets: list[dict[int, Actor]] = []

    def spill(self, actors: dict[int, Actor]) -> None:
        assert 0 < len(actors) <= self.limit
        self.sets.append(dict(actors))

    def folded(self, rest: dict[int, Actor]) -> dict[int, Actor]:
        """The sets in the order spilled, then ``rest``: first attributes kept, events summed."""
        merged: dict[int, Actor] = {}
        for actors in [*self.sets, rest]:
            for aid, actor in actors.items():
                if aid in merged:
                    merged[aid].events += actor.events
                else:
                    merged[aid] = Actor(*(getattr(actor, f) for f in Actor.__struct_fields__))
        return merged


@settings(max_examples=examples(150), suppress_health_check=[HealthCheck.too_slow])
@given(
    items=st.lists(item, max_size=12),
    layout=st.sampled_from(["array", "ndjson", "concat", "pretty"]),
    chunk=st.integers(1, 64),
    limit=st.integers(1, 4),
    byte_limit=st.sampled_from([1, 40, 1 << 30]),
)
def test_spilled_actors_fold_back_to_the_held_ones(
    items: list[Any], layout: str, chunk: int, limit: int, byte_limit: int
) -> None:
    """In every layout, in memory or streamed: actors handed out every ``limit`` actors or ``byte_limit``
    bytes, folded back in order with what the result still holds, are exactly the actors held without a
    spill; every other count is unchanged."""
    assume(layout == "array" or not (items and isinstance(items[0], list)))
    data = render(items, layout, False, False)
    expected = expected_counts(items)
    for streamed in (False, True):
        spill = CollectingSpill(limit, byte_limit)
        if streamed:
            res = stream_result(data, chunk=chunk, actors_out=spill)
        else:
            res = extract_bytes("f.json", data, None, spill)
        assert res.error is None, res.error
        assert (res.events, res.skipped, res.event_types) == (
            expected["events"],
            expected["skipped"],
            expected["event_types"],
        )
        assert spill.folded(res.actors) == expected["actors"]
        assert len(res.actors) < limit
        if byte_limit == 1:  # spilled after every batch: nothing is left held
            assert res.actors == {}


@settings(max_examples=examples(150))
@given(items=st.lists(item, min_size=1, max_size=8), cut=st.integers(0, 10_000), chunk=st.integers(1, 32))
def test_truncated_file_fails_as_a_whole(items: list[Any], cut: int, chunk: int) -> None:
    data = b"[" + b",".join(dumps(v) for v in items) + b"]"
    cut = cut % len(data)  # always drops at least the closing "]"
    broken = data[:cut]
    for res in (extract_bytes("f", broken), stream_result(broken, chunk=chunk)):
        if cut == 0:  # nothing left: an empty file
            assert res.error is None and res.events == 0
            continue
        assert res.error is not None and res.error["code"] == "INVALID_JSON"
        assert res.events == 0 and res.actors == {} and res.event_types == {} and res.skipped == {}


# ------------------------------------------------------------------------------------------ realistic data


def gh_events(n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        aid = 1000 + i % 37
        out.append(
            {
                "id": str(5_000_000 + i),
                "type": ["PushEvent", "IssuesEvent", "WatchEvent"][i % 3],
                "actor": {
                    "id": aid,
                    "login": f"user{aid}",
                    "display_login": f"user{aid}",
                    "gravatar_id": "",
                    "url": f"https://api.github.com/users/user{aid}",
                    "avatar_url": f"https://avatars.githubusercontent.com/u/{aid}?",
                },
                "repo": {"id": i, "name": f"o/r{i % 5}", "url": "https://api.github.com/repos/o/r"},
                "payload": {"commits": [{"message": "fix: ünïcode ✓ " * (i % 7)}], "size": i % 7},
                "public": True,
                "created_at": "2024-01-01T15:00:00Z",
            }
        )
    return out


def test_gh_like_ndjson_same_in_memory_and_streamed() -> None:
    evs = gh_events(3000)
    data = b"".join(orjson.dumps(e) + b"\n" for e in evs)
    a = extract_bytes("f.json", data)
    b = stream_result(data, chunk=4096)
    assert_matches(a, evs)
    assert a == b
    assert a.layout == "ndjson" and a.size_bytes == len(data)
    # First seen attributes and per-actor event counts.
    assert a.actors[1000] == Actor(
        "user1000",
        "user1000",
        "https://avatars.githubusercontent.com/u/1000?",
        "https://api.github.com/users/user1000",
        "",
        len(range(0, 3000, 37)),
    )


def test_first_seen_attributes_win_within_a_file() -> None:
    items = [{"actor": {"id": 7, "login": "old"}}, {"actor": {"id": 7, "login": "new"}}]
    data = b"\n".join(dumps(v) for v in items)
    res = extract_bytes("f", data)
    assert res.actors == {7: Actor("old", None, None, None, None, 2)}


def test_events_out_lines() -> None:
    evs = [*gh_events(50), {"type": 5, "id": "x"}, "not an event", {"actor": {"id": True}, "repo": "r"}]
    data = b"".join(dumps(e) + b"\n" for e in evs)
    for res_fn in (
        lambda o: extract_bytes("f.json", data, o),
        lambda o: extract_stream("f.json", io.BytesIO(data), o),
    ):
        out = io.BytesIO()
        res = res_fn(out)
        lines = [orjson.loads(x) for x in out.getvalue().splitlines()]
        assert out.getvalue().endswith(b"\n")
        assert len(lines) == res.events == 52
        assert lines[0] == {
            "kind": "event",
            "file": "f.json",
            "id": "5000000",
            "type": "PushEvent",
            "created_at": "2024-01-01T15:00:00Z",
            "actor_id": 1000,
            "actor_login": "user1000",
            "repo": "o/r0",
        }
        assert lines[50] == {
            "kind": "event",
            "file": "f.json",
            "id": "x",
            "type": 5,
            "created_at": None,
            "actor_id": None,
            "actor_login": None,
            "repo": None,
        }
        assert lines[51]["actor_id"] is None and lines[51]["repo"] is None


@pytest.mark.parametrize("streamed", [False, True])
def test_failed_file_leaves_no_event_lines(streamed: bool) -> None:
    good = b"".join(dumps(e) + b"\n" for e in gh_events(2000))
    bad = good + b'{"actor": {"id": 1}, "oops"}\n'
    out = io.BytesIO()
    out.write(b"previous file's lines\n")
    if streamed:
        res = extract_stream("f", io.BytesIO(bad), out, chunk_size=4096)
    else:
        res = extract_bytes("f", bad, out)
    assert res.error is not None and res.error["code"] == "INVALID_JSON"
    assert res.error["line"] == 2001
    assert res.error["offset"] >= len(good)
    assert out.getvalue() == b"previous file's lines\n"


# ---------------------------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("data", [b"", b"   \r\n\t ", b"\xef\xbb\xbf", b"\xef\xbb\xbf  \n"])
def test_empty_or_whitespace_file_is_zero_events_not_an_error(data: bytes) -> None:
    for res in (extract_bytes("e", data), stream_result(data, chunk=1)):
        assert (
            res.error is None and res.layout == "ndjson" and res.events == 0 and res.size_bytes == len(data)
        )


@pytest.mark.parametrize(
    ("data", "line", "offset"),
    [
        (b'{"a": 1}\n{"b": x}\n', 2, 15),
        (b'{"a": 1}\r\n\r\n{"b": 2} ]', 3, 21),
        (b'[{"a": 1},\n {"b": 2},\n]', 3, 22),
        (b"[1, 2] [3]", 1, 7),
        (b'{"a": "\xff"}', 1, 7),
        (b'[{"actor": {"id": 1, "login": "\xe2\x82"}}]', 1, 31),
    ],
)
def test_invalid_json_reports_line_and_offset(data: bytes, line: int, offset: int) -> None:
    for res in (extract_bytes("f", data), stream_result(data, chunk=3)):
        assert res.error is not None
        assert res.error["code"] == "INVALID_JSON"
        assert (res.error["line"], res.error["offset"]) == (line, offset), res.error
        assert res.events == 0 and res.actors == {}


@pytest.mark.parametrize("data", [b"[" * 100_000, b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000])
def test_deep_nesting_is_a_clean_file_error(data: bytes) -> None:
    for res in (extract_bytes("deep", data), stream_result(data, chunk=4096)):
        assert res.error is not None and res.error["code"] == "JSON_TOO_DEEP"
        assert res.events == 0


def test_actor_id_rules() -> None:
    items = [
        {"actor": {"id": 1}},
        {"actor": {"id": True}},
        {"actor": {"id": 1.0}},
        {"actor": {"id": "1"}},
        {"actor": {"id": 1 << 64}},
        {"actor": {"login": "no id"}},
        {"actor": []},
        {"actor": None},
        {},
        [{"actor": {"id": 2}}],
    ]
    data = b"\n".join(dumps(v) for v in items)
    res = extract_bytes("f", data)
    assert res.events == 9
    assert res.skipped == {"invalid_actor": 6, "no_actor": 2, "not_an_object": 1}
    assert list(res.actors) == [1]
    assert res.event_types == {"<missing>": 9}


def test_file_result_pickles() -> None:
    res = extract_bytes("f", b"".join(dumps(e) + b"\n" for e in gh_events(100)))
    assert pickle.loads(pickle.dumps(res)) == res


SPACES = 512 << 20


class Spaces(io.RawIOBase):
    """An endless-looking stream of spaces (optionally after a prefix) that allocates nothing per read."""

    def __init__(self, total: int, prefix: bytes = b"") -> None:
        self.left = total
        self.prefix = prefix
        self.block = b" " * (1 << 20)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.prefix:
            p, self.prefix = self.prefix, b""
            return p
        if self.left <= 0:
            return b""
        k = min(n, self.left, len(self.block))
        self.left -= k
        return self.block if k == len(self.block) else self.block[:k]


@pytest.mark.parametrize(
    ("prefix", "code"), [(b"", None), (b'{"a": 1}\n', None), (b'[{"a": 1}, ', "INVALID_JSON")]
)
def test_a_long_run_of_spaces_streams_in_bounded_memory(prefix: bytes, code: str | None) -> None:
    # Whitespace between values is valid JSON: it is skipped (not buffered) however long it is.
    tracemalloc.start()
    try:
        # 512 MiB, 32 times the memory bound below: enough to show the run is not buffered (2 GiB took
        # 4x the time to show the same).
        res = extract_stream("spaces.json", Spaces(SPACES, prefix))  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (res.error or {}).get("code") == code
    assert res.size_bytes == SPACES + len(prefix)
    assert peak < 16 << 20


@pytest.mark.parametrize("prefix", [b'{"a":', b'[{"a": 1}, {"b": ', b'{"a": 1}\n{"b": ', b'{"a": 1}\n1234'])
def test_unbounded_value_is_rejected_at_the_cap(prefix: bytes) -> None:
    tracemalloc.start()
    try:
        res = extract_stream("bomb.json", Spaces(2 << 30, prefix), max_value_bytes=4 << 20)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.error is not None and res.error["code"] == "VALUE_TOO_LARGE"
    assert res.size_bytes < 64 << 20  # gave up early, did not read the 2 GiB
    assert peak < 32 << 20


def test_long_single_line_value_within_cap_streams() -> None:
    big = {"actor": {"id": 9, "login": "big"}, "payload": {"blob": "x" * (3 << 20)}}
    data = dumps({"actor": {"id": 1}}) + b"\n" + dumps(big) + b"\n"
    res = stream_result(data, chunk=1 << 12)
    assert_matches(res, [{"actor": {"id": 1}}, big])
    too_small = stream_result(data, chunk=1 << 12, max_value_bytes=1 << 20)
    assert too_small.error is not None and too_small.error["code"] == "VALUE_TOO_LARGE"


def test_stream_errors_propagate_to_the_caller() -> None:
    class Boom(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            raise EOFError("compressed data ended early")

    with pytest.raises(EOFError):
        extract_stream("f", Boom())  # type: ignore[arg-type]


def test_large_files_mixing_lines_pretty_values_and_long_lines() -> None:
    # Bigger than the in-memory slice (256 KiB) and the stream chunk, so slices end inside values.
    evs = gh_events(3000)
    long_one = {"actor": {"id": 424242, "login": "long"}, "type": "PushEvent", "payload": "y" * (700 << 10)}
    items: list[Any] = [*evs[:1500], long_one, *evs[1500:]]
    parts = [dumps(e) for e in evs[:1500]] + [dumps(long_one)] + [dumps(e, pretty=True) for e in evs[1500:]]
    data = b"\n".join(parts) + b"\n"
    assert len(data) > 2 << 20
    for res in (extract_bytes("f", data), stream_result(data, chunk=1 << 16)):
        assert_matches(res, items)
        assert res.layout == "ndjson"
    broken = data[: len(data) - 5]
    for res in (extract_bytes("f", broken), stream_result(broken, chunk=1 << 16)):
        assert res.error is not None and res.error["code"] == "INVALID_JSON" and res.events == 0


# ---------------------------------------------------------------------------------- event types: the bounds


def typed_events(types: list[Any]) -> list[dict[str, Any]]:
    return [{"type": t, "actor": {"id": i + 1, "login": f"u{i}"}} for i, t in enumerate(types)]


@settings(max_examples=40, deadline=None)
@given(
    distinct=st.integers(MAX_EVENT_TYPES - 3, MAX_EVENT_TYPES + 3) | st.integers(3, 2 * MAX_EVENT_TYPES),
    repeats=st.integers(0, 50),
    layout=st.sampled_from(["ndjson", "array", "pretty"]),
    chunk=st.sampled_from([7, 1 << 12, 1 << 20]),
)
def test_distinct_event_types_within_the_bound_count_and_past_it_fail_the_file(
    distinct: int, repeats: int, layout: str, chunk: int
) -> None:
    # The buckets count among the distinct types too: the last two are <missing> and <non-string>.
    names: list[Any] = [f"T{i}" for i in range(distinct - 2)] + [None, 5]
    items: list[Any] = typed_events(names + names[:repeats])
    data = render(items, layout, bom=False, crlf=False)
    outs = [io.BytesIO(b"before\n"), io.BytesIO(b"before\n")]
    for out in outs:
        out.seek(0, 2)
    results = (extract_bytes("f", data, outs[0]), stream_result(data, chunk=chunk, events_out=outs[1]))
    for res, out in zip(results, outs, strict=True):
        if distinct <= MAX_EVENT_TYPES:
            assert_matches(res, items)
            assert len(res.event_types) == distinct
        else:
            assert res.error is not None and res.error["code"] == "TOO_MANY_EVENT_TYPES"
            assert str(MAX_EVENT_TYPES) in res.error["message"]
            assert (res.events, res.event_types, res.actors, res.skipped) == (0, {}, {}, {})
            assert out.getvalue() == b"before\n"  # all or nothing: its event lines were taken back


def test_too_many_event_types_stops_reading_the_file() -> None:
    """After the head, 32 MiB more of one known type: the extractor stops at the 1,001st distinct type,
    within a read or two, rather than reading them."""
    head = b"".join(b'{"type":"T%d"}\n' % i for i in range(MAX_EVENT_TYPES + 1))
    line = b'{"type":"PushEvent","actor":{"id":1}}\n'

    class Endless(io.RawIOBase):
        def __init__(self) -> None:
            self.given = 0

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            if self.given >= 32 << 20:
                return b""
            data = head if self.given == 0 else line * max(1, n // len(line))
            self.given += len(data)
            return data

    endless = Endless()
    res = extract_stream("f", endless, chunk_size=1 << 16)  # type: ignore[arg-type]
    assert res.error is not None and res.error["code"] == "TOO_MANY_EVENT_TYPES"
    assert endless.given < len(head) + (1 << 17)  # the head and at most the next read or two
    assert res.size_bytes == endless.given


@settings(max_examples=30, deadline=None)
@given(
    extra=st.integers(0, 3),
    char=st.sampled_from(["a", "é", "\U0001f600"]),
    streamed=st.booleans(),
)
def test_a_type_over_the_length_bound_counts_as_too_long(extra: int, char: str, streamed: bool) -> None:
    # Characters, not bytes: 128 emoji are a type like 128 letters.
    at_bound = char * MAX_EVENT_TYPE_LENGTH
    over = char * (MAX_EVENT_TYPE_LENGTH + 1 + extra)
    items: list[Any] = typed_events([at_bound, over, over + "x", at_bound])
    out = io.BytesIO()
    data = render(items, "ndjson", bom=False, crlf=False)
    res = stream_result(data, events_out=out) if streamed else extract_bytes("f", data, out)
    assert_matches(res, items)
    assert res.event_types == {at_bound: 2, "<too-long>": 2}
    # The event lines still carry each type as found.
    assert [orjson.loads(line)["type"] for line in out.getvalue().splitlines()] == [
        at_bound,
        over,
        over + "x",
        at_bound,
    ]


def test_megabyte_types_are_not_held() -> None:
    """Forty distinct 1 MB types (all of them held before the bound) leave one small key behind."""
    items: list[Any] = typed_events([f"{i:04d}" + "t" * (1 << 20) for i in range(40)])
    data = render(items, "ndjson", bom=False, crlf=False)
    tracemalloc.start()
    try:
        res = stream_result(data, chunk=1 << 16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.event_types == {"<too-long>": 40}
    assert peak < 16 << 20, peak  # a few of them at a time while decoded, not all 40 MB
