"""Merge per-file results into one upload's answer; render the JSON answer and the NDJSON lines. Pure.

Ordering: results may be added in any order (as workers finish). Files are listed by ``FileResult.order``
(the ``infolist()`` index; ties keep arrival order), and an actor's attributes are those of the file that
comes first in that order, whatever order the results arrived in. Actors are sorted by id.

Two ways in, one rule: ``Merger`` merges results held in memory; ``merge_rows`` / ``merge_runs`` merge
sorted actor runs streamed from disk (``runs``), so that an upload of millions of actors never holds them
all at once.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import orjson

from upload_server.errors import TooManyEventTypes
from upload_server.ingest.extract import MAX_EVENT_TYPES, Actor, FileResult

__all__ = [
    "ActorRow",
    "Frame",
    "Hole",
    "Merged",
    "Merger",
    "UploadReceipt",
    "actor_line",
    "actor_lines",
    "add_event_types",
    "error_line",
    "file_line",
    "fill",
    "json_frame",
    "merge",
    "merge_chunks",
    "merge_rows",
    "merge_runs",
    "ndjson_tail_frame",
    "render_answer",
    "row_id",
    "summary_line",
    "write_actors",
]


#: Most bytes of actors gathered before a write: an actor's attributes are any JSON values, so 1,000 of
#: them can be far more than the ~300 KB GitHub-like ones make.
BATCH_BYTES = 1 << 20


class ActorRow(Actor):
    """One row of a job's actor run (``merge_runs``): an actor of the job (its events in the job), its id,
    and the order of the file whose attributes it keeps. Written to the results file packed as an array,
    like the Actor it extends."""

    id: int
    order: int

    @staticmethod
    def sorted_rows(actors: Mapping[int, Actor], order: int | Mapping[int, int]) -> Iterator[ActorRow]:
        """``actors`` as rows in id order, each with ``order`` (one for all, or by id), built one at a time
        without a call per row (``ActorRow.of`` per row was a fifth of writing a job's run)."""
        row = ActorRow
        for aid in sorted(actors):
            a = actors[aid]
            mine = order if isinstance(order, int) else order[aid]
            yield row(a.login, a.display_login, a.avatar_url, a.url, a.gravatar_id, a.events, aid, mine)

    def actor(self, events: int) -> Actor:
        return Actor(self.login, self.display_login, self.avatar_url, self.url, self.gravatar_id, events)


@dataclass
class Merged:
    """One upload's totals. ``actors`` maps id → Actor (its events summed over the upload), in id order."""

    files: list[FileResult] = field(default_factory=list)
    files_failed: int = 0
    events: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    event_types: dict[str, int] = field(default_factory=dict)
    actors: dict[int, Actor] = field(default_factory=dict)
    #: ``len(actors)``, or the count of actors streamed by ``merge_runs`` when ``actors`` is left empty.
    unique_actors: int = 0

    def summary(self, files_ignored: int) -> dict[str, Any]:
        return {
            "files": len(self.files),
            "files_failed": self.files_failed,
            "files_ignored": files_ignored,
            "events": self.events,
            "skipped": self.skipped,
            "unique_actors": self.unique_actors,
            "event_types": self.event_types,
        }


class Merger:
    """Incremental merge: ``add`` results as they arrive, ``result()`` once at the end."""

    def __init__(self) -> None:
        self._files: list[FileResult] = []
        self._failed = 0
        self._events = 0
        self._skipped: dict[str, int] = {}
        self._types: dict[str, int] = {}
        self._actors: dict[int, Actor] = {}
        self._first_order: dict[int, int] = {}  # id -> order of the file whose attributes it keeps

    def add(self, result: FileResult, *, take: bool = False) -> None:
        """Add a file's result. ``take``: its actor records become this merger's own (the caller drops
        them), so the first file's are not copied one by one (~5 ms per 10,000 actors, measured)."""
        self._files.append(result)
        if result.error is not None:
            self._failed += 1
            return  # a failed file counts for nothing (its counts are empty anyway)
        self._events += result.events
        # Most results have nothing skipped, and none has its event types here once a job took them
        # (``runs.JobRuns``): added only when there are some (an upload of 400 tiny files adds 800 results).
        if result.skipped:
            _add_counts(self._skipped, result.skipped)
        if result.event_types:
            add_event_types(self._types, result.event_types)
        order = result.order
        actors, first_order = self._actors, self._first_order
        if take and not actors:
            self._actors = dict(result.actors)
            self._first_order = dict.fromkeys(result.actors, order)
            return
        for aid, rec in result.actors.items():
            mine = actors.get(aid)
            if mine is None:
                actors[aid] = msgspec.structs.replace(rec)  # a copy: the result's own record stays as it is
                first_order[aid] = order
            elif order < first_order[aid]:  # an earlier file arrived later: its attributes win
                actors[aid] = msgspec.structs.replace(rec, events=mine.events + rec.events)
                first_order[aid] = order
            else:
                mine.events += rec.events

    def extend(self, results: Iterable[FileResult]) -> None:
        for r in results:
            self.add(r)

    def add_event_types(self, counts: Mapping[str, int]) -> None:
        """Counts of event types gathered apart from the files' results (a job's: ``runs.JobRuns``)."""
        add_event_types(self._types, counts)

    def result(self) -> Merged:
        return Merged(
            files=sorted(self._files, key=lambda r: r.order),
            files_failed=self._failed,
            events=self._events,
            skipped=dict(sorted(self._skipped.items())),
            event_types=dict(sorted(self._types.items())),
            actors=self.sorted_actors(),
            unique_actors=len(self._actors),
        )

    def sorted_actors(self) -> dict[int, Actor]:
        """The actors merged so far, by id."""
        return dict(sorted(self._actors.items()))

    @property
    def actor_count(self) -> int:
        return len(self._actors)

    def actor_run(self) -> list[ActorRow]:
        """The actors as one sorted run for ``merge_runs``, by id."""
        return list(ActorRow.sorted_rows(self._actors, self._first_order))


def merge_rows(runs: Iterable[Iterable[ActorRow]]) -> Iterator[ActorRow]:
    """Merge runs of rows, each sorted by id with each id once, into rows in id order, each id once:
    ``Merger``'s rule (the attributes and order of the lowest order, the events summed). Rows of one id and
    one order keep the first run's attributes, so a file's runs must come in the order they were written
    (``runs``). ``merge_chunks`` on the runs cut into lists of 1,024 rows."""
    return merge_chunks(map(_batched, runs))


def _batched(rows: Iterable[ActorRow]) -> Iterator[list[ActorRow]]:
    source = iter(rows)
    while batch := list(itertools.islice(source, 1024)):
        yield batch


def merge_chunks(runs: Iterable[Iterable[list[ActorRow]]]) -> Iterator[ActorRow]:
    """``merge_rows`` of runs given as their chunks (lists of rows), holding one chunk per run.

    A batch at a time rather than a row at a time through ``heapq.merge`` (its Python generator and key
    calls per row were half of a render's CPU, measured on large24): every row up to the smallest last id
    of the runs' current chunks is known, since each run's later rows come after its current chunk's last.
    Those rows, put together in run order, are sorted by (id, order) in one stable ``list.sort`` (so ties
    keep the earlier run's row first, as ``heapq.merge`` did), and each id's rows folded into one."""
    sources = [iter(run) for run in runs]
    heads = [(chunk, 0, source) for source in sources if (chunk := _next_chunk(source))]
    while heads:
        frontier = min(chunk[-1].id for chunk, _, _ in heads)
        batch: list[ActorRow] = []
        kept: list[tuple[list[ActorRow], int, Iterator[list[ActorRow]]]] = []
        for chunk, start, source in heads:
            if chunk[-1].id <= frontier:
                batch += chunk[start:] if start else chunk
                if following := _next_chunk(source):
                    kept.append((following, 0, source))
                continue
            cut = bisect.bisect_right(chunk, frontier, lo=start, key=row_id)
            batch += chunk[start:cut]
            kept.append((chunk, cut, source))
        batch.sort(key=_run_key)
        yield from _folded(batch)
        heads = kept


def _next_chunk(source: Iterator[list[ActorRow]]) -> list[ActorRow] | None:
    """The next chunk that has a row, or None at the run's end."""
    for chunk in source:
        if chunk:
            return chunk
    return None


def _folded(batch: list[ActorRow]) -> Iterator[ActorRow]:
    """Sorted rows, each id's rows as one: the first's attributes, the events summed."""
    current = batch[0]
    events = current.events
    for row in itertools.islice(batch, 1, None):
        if row.id == current.id:
            events += row.events  # the lowest order came first (the sort): its attributes stay
            continue
        yield current if events == current.events else msgspec.structs.replace(current, events=events)
        current, events = row, row.events
    yield current if events == current.events else msgspec.structs.replace(current, events=events)


def merge_runs(runs: Iterable[Iterable[ActorRow]]) -> Iterator[tuple[int, Actor]]:
    """``merge_rows`` as ``(id, Actor)`` pairs, the form the answer is rendered from."""
    for row in merge_rows(runs):
        yield row.id, row.actor(row.events)


def row_id(row: ActorRow) -> int:
    """A row's actor id: the key runs are sorted and cut by."""
    return row.id


_run_key = operator.attrgetter("id", "order")


def _add_counts(into: dict[str, int], counts: Mapping[str, int]) -> None:
    for k, n in counts.items():
        into[k] = into.get(k, 0) + n


def add_event_types(into: dict[str, int], counts: Mapping[str, int]) -> None:
    """Add ``counts`` to ``into``; raise TooManyEventTypes when ``into`` then holds more than
    ``MAX_EVENT_TYPES`` (each file keeps to it, so ``into`` holds twice that at most)."""
    _add_counts(into, counts)
    if len(into) > MAX_EVENT_TYPES:
        raise TooManyEventTypes(
            f"The upload's files have more than {MAX_EVENT_TYPES} distinct event types together "
            "(GitHub has about 20).",
            detail={"limit": MAX_EVENT_TYPES},
        )


def merge(results: Iterable[FileResult]) -> Merged:
    """Merge results given in any order (see the module docstring for the ordering rules)."""
    m = Merger()
    m.extend(results)
    return m.result()


def _file_dict(r: FileResult) -> dict[str, Any]:
    return {
        "name": r.name,
        "layout": r.layout,
        "size_bytes": r.size_bytes,
        "events": r.events,
        "skipped": dict(sorted(r.skipped.items())) if r.skipped else {},
        "error": r.error,
    }


def _actor_dict(aid: int, rec: Actor) -> dict[str, Any]:
    return {
        "id": aid,
        "login": rec.login,
        "display_login": rec.display_login,
        "avatar_url": rec.avatar_url,
        "url": rec.url,
        "gravatar_id": rec.gravatar_id,
        "events": rec.events,
    }


@dataclass(frozen=True)
class UploadReceipt:
    """What was received, as the answer states it."""

    upload_id: str
    size_bytes: int
    sha256: str
    content_kind: str


def render_answer(
    merged: Merged,
    receipt: UploadReceipt,
    *,
    ignored: Sequence[tuple[str, str]],
    timing_ms: Mapping[str, float],
    include_actors: bool = True,
    include_files: bool = True,
) -> dict[str, Any]:
    """The JSON answer. ``timing_ms`` is passed through (``{"receive", "queue", "process"}``)."""
    answer: dict[str, Any] = {
        "upload_id": receipt.upload_id,
        "size_bytes": receipt.size_bytes,
        "sha256": receipt.sha256,
        "content_kind": receipt.content_kind,
        "summary": merged.summary(len(ignored)),
    }
    if include_files:
        answer["files"] = [_file_dict(r) for r in merged.files]
    answer["ignored"] = [{"name": n, "reason": why} for n, why in ignored]
    if include_actors:
        answer["actors"] = [_actor_dict(aid, rec) for aid, rec in merged.actors.items()]
    answer["timing_ms"] = dict(timing_ms)
    return answer


def _line(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)


def actor_line(actor_id: int, rec: Actor) -> bytes:
    """``{"kind": "actor", "id", "login", "display_login", "avatar_url", "url", "gravatar_id", "events"}``."""
    return _line({"kind": "actor", **_actor_dict(actor_id, rec)})


def actor_lines(actors: Iterable[tuple[int, Actor]], batch: int = 1000) -> Iterator[bytes]:
    """The actor lines of ``(id, record)`` pairs in id order, ``batch`` lines (or ``BATCH_BYTES``' worth)
    joined per item (fewer writes for a chunked answer)."""
    lines: list[bytes] = []
    size = 0
    for aid, rec in actors:
        lines.append(line := actor_line(aid, rec))
        size += len(line)
        if len(lines) >= batch or size >= BATCH_BYTES:
            yield b"".join(lines)
            lines, size = [], 0
    if lines:
        yield b"".join(lines)


def file_line(result: FileResult) -> bytes:
    """``{"kind": "file", "name", "layout", "size_bytes", "events", "skipped", "error"}``."""
    return _line({"kind": "file", **_file_dict(result)})


def summary_line(
    merged: Merged,
    receipt: UploadReceipt,
    *,
    ignored: Sequence[tuple[str, str]],
    timing_ms: Mapping[str, float],
) -> bytes:
    """The last line: the JSON answer without ``files`` and ``actors`` (they came as their own lines)."""
    body = render_answer(
        merged, receipt, ignored=ignored, timing_ms=timing_ms, include_actors=False, include_files=False
    )
    return _line({"kind": "summary", **body})


def error_line(error: Mapping[str, Any]) -> bytes:
    """``{"kind": "error", "error": {"code", "message", "detail"}}``: ends a stream that failed midway."""
    return _line({"kind": "error", "error": error})


# ------------------------------------------------------------------- an answer rendered in parts (issue 14)


class Hole(enum.Enum):
    """What a ``Frame`` leaves to be filled in once the actors are merged: their count (the summary gives
    it), the actors themselves (parts written by workers side by side), and the timing (taken last)."""

    COUNT = "count"
    ACTORS = "actors"
    TIMING = "timing"


@dataclass(frozen=True)
class Frame:
    """An answer around its actors: bytes and holes in order, and what goes between two parts' actors."""

    pieces: list[bytes | Hole]
    separator: bytes = b""


#: The count rendered in a frame, then cut out: a count is never negative, so these bytes cannot be a
#: ``skipped`` count (its keys are the extractor's own reasons anyway); and a string's quotes are escaped,
#: so they cannot be inside one. What precedes the summary's ``unique_actors`` holds neither.
_COUNT_MARK = b'"unique_actors":-1'


def _cut_at_count(data: bytes) -> list[bytes | Hole]:
    cut = data.index(_COUNT_MARK) + len(_COUNT_MARK) - 2
    return [data[:cut], Hole.COUNT, data[cut + 2 :]]


def json_frame(
    merged: Merged, receipt: UploadReceipt, *, ignored: Sequence[tuple[str, str]], include_actors: bool
) -> Frame:
    """The JSON answer (``render_answer``'s bytes) with its count, actors and timing left as holes."""
    merged.unique_actors = -1
    answer = render_answer(merged, receipt, ignored=ignored, timing_ms={}, include_actors=False)
    del answer["timing_ms"]
    pieces = _cut_at_count(orjson.dumps(answer)[:-1])
    actors: list[bytes | Hole] = [b',"actors":[', Hole.ACTORS, b"]"] if include_actors else []
    return Frame([*pieces, *actors, b',"timing_ms":', Hole.TIMING, b"}"], separator=b",")


def ndjson_tail_frame(merged: Merged, receipt: UploadReceipt, *, ignored: Sequence[tuple[str, str]]) -> Frame:
    """The NDJSON tail (actor lines, file lines, the summary line) with the same holes."""
    files = b"".join(file_line(result) for result in merged.files)
    merged.unique_actors = -1
    line = summary_line(merged, receipt, ignored=ignored, timing_ms={})
    end = b"{}}\n"  # the empty timing, the line's end
    assert line.endswith(end)
    return Frame([Hole.ACTORS, files, *_cut_at_count(line[: -len(end)]), Hole.TIMING, b"}\n"])


class Writable(Protocol):
    """Where bytes are written: a binary file, or anything with its ``write``."""

    def write(self, data: bytes, /) -> object: ...


def write_actors(out: Writable, actors: Iterable[tuple[int, Actor]], *, ndjson: bool) -> int:
    """Write the actors as NDJSON lines, or as the JSON answer's list items (comma-separated, without the
    brackets), 1,000 (or ``BATCH_BYTES``' worth) per write; how many there were."""
    if ndjson:
        counted = _Counted(actors)
        for lines in actor_lines(counted):
            out.write(lines)
        return counted.count
    count = 0
    pieces: list[bytes] = []
    size = 0
    for aid, rec in actors:
        pieces.append(piece := orjson.dumps(_actor_dict(aid, rec)))
        size += len(piece)
        if len(pieces) >= 1000 or size >= BATCH_BYTES:
            out.write((b"," if count else b"") + b",".join(pieces))
            count, pieces, size = count + len(pieces), [], 0
    if pieces:
        out.write((b"," if count else b"") + b",".join(pieces))
        count += len(pieces)
    return count


class _Counted:
    """Passes ``(id, record)`` pairs through and counts them."""

    def __init__(self, pairs: Iterable[tuple[int, Actor]]) -> None:
        self.pairs = pairs
        self.count = 0

    def __iter__(self) -> Iterator[tuple[int, Actor]]:
        for pair in self.pairs:
            self.count += 1
            yield pair


def fill(
    frame: Frame, count: int, parts: Sequence[tuple[str | bytes, int]], timing_ms: Mapping[str, float]
) -> list[bytes | str]:
    """The answer in order: bytes, or the path of a part file to be sent as it is. ``parts`` are the part
    files (or a part's bytes) with the actors each holds, in id order; adjacent bytes come as one piece."""
    pieces: list[bytes | str] = []
    for piece in frame.pieces:
        if piece is Hole.ACTORS:
            written = [path for path, actors in parts if actors]
            for number, path in enumerate(written):
                pieces += [frame.separator, path] if number and frame.separator else [path]
            continue
        data = piece if isinstance(piece, bytes) else _filled(piece, count, timing_ms)
        if pieces and isinstance(pieces[-1], bytes):
            pieces[-1] += data
        else:
            pieces.append(data)
    return [piece for piece in pieces if piece != b""]


def _filled(hole: Hole, count: int, timing_ms: Mapping[str, float]) -> bytes:
    return str(count).encode() if hole is Hole.COUNT else orjson.dumps(dict(timing_ms))
