"""Sorted actor runs on disk: how a worker keeps an upload's actors out of its memory (issue 12).

A run is a job's actors (or part of them) as ``ActorRow``s sorted by id, each id once, written in msgpack
chunks of ``ACTOR_CHUNK_ROWS`` rows (fewer when that passes ``CHUNK_BYTES``). ``results.merge_chunks``
merges runs into one stream by ``Merger``'s rule.

* **While a file is extracted** (``JobRuns``, given to ``extract`` as its ``ActorSpill``): when the file's
  actor set reaches ``limit`` actors, or was gathered from ``byte_limit`` bytes of JSON (attributes may be
  any JSON value: a count alone bounds nothing), it is written as a run and cleared. When the file ends,
  what is left joins the job's pending set (a ``Merger`` of the job's finished files), written as a run
  before it would reach ``limit``. A failed file has its runs cut off the file again (all or nothing).
* **When the runs are merged** (``bounded_runs``): at most ``MERGE_FAN_IN`` runs, whose largest chunks add
  up to ``MERGE_BYTES`` at most, are read at once, each a chunk at a time; more are merged in passes into
  scratch files first.

Ties: two rows of one id and one file order come from one file's runs, and the earlier run holds the
earlier occurrence. The merge sorts stably (like ``sorted(itertools.chain(...))``), so runs
are always passed in the order they were written, and a pass merges consecutive runs only.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from typing import BinaryIO

import msgspec

from .extract import Actor, FileResult, rewind
from .results import ActorRow, Merger, add_event_types, merge_chunks, row_id

__all__ = [
    "ACTOR_BYTES",
    "ACTOR_CHUNK_ROWS",
    "CHUNK_BYTES",
    "MERGE_BYTES",
    "MERGE_FAN_IN",
    "JobRuns",
    "Run",
    "bounded_runs",
    "read_chunks",
    "read_run",
    "spill_threshold",
    "write_run",
]

#: Actor rows per chunk: a merge holds one decoded chunk per run it reads (~0.35 MiB at 1,024 rows of
#: GitHub-like actors, 123 bytes each encoded).
ACTOR_CHUNK_ROWS = 1024
#: A chunk's most encoded bytes, unless it is one row: attributes are any JSON values, so rows are cut
#: until they fit (a hostile file's actors can be megabytes each; GitHub-like ones never come near).
CHUNK_BYTES = 1 << 20
#: Runs merged at once: 64 chunks of GitHub-like actors are ~22 MiB decoded; a thousand jobs' runs
#: merge in two passes.
MERGE_FAN_IN = 64
#: At most this many encoded bytes of chunks (each run's largest) are read at once: fewer runs are merged
#: at a time when their chunks are large.
MERGE_BYTES = 32 << 20
#: What one actor costs a worker while held (its dict entry, its Actor and five strings as GitHub's are),
#: measured: the 3,000,000 distinct actors of loadtest/bench_many_actors.py held in one file took a worker
#: from 31 to 1,414 MiB, 483 bytes each.
ACTOR_BYTES = 480
#: The fewest actors held before a spill, whatever the budget (a run of fewer rows is mostly overhead).
MIN_SPILL_ACTORS = 64

_ENCODER = msgspec.msgpack.Encoder()
_ROWS_DECODER = msgspec.msgpack.Decoder(list[ActorRow])


def spill_threshold(memory_budget: int) -> int:
    """Actors a set holds before it is spilled: ``--worker-memory-budget`` worth (64 MiB: 139,810). A worker
    holds two sets at most: the file's, and the job's pending one."""
    return max(MIN_SPILL_ACTORS, memory_budget // ACTOR_BYTES)


class Run(msgspec.Struct, frozen=True):
    """Where a run lies: the file, the offset of its first chunk, and its chunks' lengths; the first id of
    each chunk, when known (``JobRuns.firsts``: what ``partition`` cuts an upload's actors by). Only its
    rows with ``low <= id < high`` are read, where those are given (a part of a partitioned render)."""

    path: str
    offset: int
    chunks: list[int]
    firsts: list[int] = msgspec.field(default_factory=list)
    low: int | None = None
    high: int | None = None


def write_run(out: BinaryIO, rows: Iterable[ActorRow]) -> tuple[list[int], list[int]]:
    """Write ``rows`` (sorted by id, each id once) at ``out``'s position; the lengths of its chunks and the
    first id of each."""
    chunks: list[int] = []
    firsts: list[int] = []
    batch: list[ActorRow] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= ACTOR_CHUNK_ROWS:
            for first, chunk in _encoded(batch):
                chunks.append(out.write(chunk))
                firsts.append(first)
            batch = []
    if batch:
        for first, chunk in _encoded(batch):
            chunks.append(out.write(chunk))
            firsts.append(first)
    return chunks, firsts


def _encoded(batch: list[ActorRow]) -> Iterator[tuple[int, bytes]]:
    """``batch`` as chunks (with their first ids) of at most ``CHUNK_BYTES`` each, or of one row: cut into
    as many rows as fit at the batch's average row size, each piece cut again if its rows are larger than
    the average."""
    data = _ENCODER.encode(batch)
    if len(data) <= CHUNK_BYTES or len(batch) == 1:
        yield batch[0].id, data
        return
    step = max(1, len(batch) * CHUNK_BYTES // len(data))
    del data  # not held while the pieces are encoded
    for start in range(0, len(batch), step):
        yield from _encoded(batch[start : start + step])


def read_run(run: Run) -> Iterator[ActorRow]:
    """A run's rows (those within its bounds), a chunk at a time (``read_chunks``)."""
    for rows in read_chunks(run):
        yield from rows


def read_chunks(run: Run) -> Iterator[list[ActorRow]]:
    """A run's chunks (their rows within its bounds). The file is opened per chunk, so a merge of many runs
    holds no descriptor between reads (issue 12: descriptors run out before memory does)."""
    offset = run.offset
    for length in run.chunks:
        with open(run.path, "rb") as source:
            source.seek(offset)
            rows = _ROWS_DECODER.decode(source.read(length))
        offset += length
        if run.low is not None or run.high is not None:
            rows = _within(rows, run.low, run.high)
        yield rows


def _within(rows: list[ActorRow], low: int | None, high: int | None) -> list[ActorRow]:
    """The rows (sorted by id) with ``low <= id < high``: all of them but in a bounded run's end chunks."""
    start = 0 if low is None or rows[0].id >= low else bisect.bisect_left(rows, low, key=row_id)
    end = len(rows) if high is None or rows[-1].id < high else bisect.bisect_left(rows, high, key=row_id)
    return rows if start == 0 and end == len(rows) else rows[start:end]


def runs_of(path: str, lengths: Sequence[list[int]], firsts: Sequence[list[int]] = ()) -> list[Run]:
    """The runs a job wrote one after another from the start of ``path`` (``JobRuns.runs``, and
    ``JobRuns.firsts`` when given)."""
    runs: list[Run] = []
    offset = 0
    for number, chunks in enumerate(lengths):
        runs.append(Run(path, offset, chunks, list(firsts[number]) if firsts else []))
        offset += sum(chunks)
    return runs


def bounded_runs(
    runs: list[Run], scratch: Sequence[str], fan_in: int = MERGE_FAN_IN, merge_bytes: int = MERGE_BYTES
) -> list[Run]:
    """``runs``, merged in passes of consecutive runs until they can be read at once: at most ``fan_in``
    runs whose largest chunks add up to ``merge_bytes`` at most (or one run). A pass groups as many runs
    as those bounds allow, two at least, so each pass at least halves them. Pass outputs alternate between
    the two ``scratch`` paths (a pass reads the other one, or the jobs' files)."""
    passes = 0
    while len(runs) > 1 and (len(runs) > fan_in or _held(runs) > merge_bytes):
        path = scratch[passes % 2]
        merged: list[Run] = []
        with open(path, "wb", buffering=1 << 20) as out:
            for group in _groups(runs, fan_in, merge_bytes):
                offset = out.tell()
                chunks, firsts = write_run(out, merge_chunks(map(read_chunks, group)))
                merged.append(Run(path, offset, chunks, firsts))
        runs, passes = merged, passes + 1
    return runs


def _held(runs: Sequence[Run]) -> int:
    """The encoded bytes a merge of ``runs`` holds at most: each run's largest chunk."""
    return sum(max(run.chunks, default=0) for run in runs)


def _groups(runs: list[Run], fan_in: int, merge_bytes: int) -> Iterator[list[Run]]:
    """Consecutive runs, as many at a time as ``bounded_runs``'s bounds allow, two at least."""
    group: list[Run] = []
    held = 0
    for run in runs:
        largest = max(run.chunks, default=0)
        if len(group) >= 2 and (len(group) >= fan_in or held + largest > merge_bytes):
            yield group
            group, held = [], 0
        group.append(run)
        held += largest
    if group:
        yield group


class JobRuns:
    """One job's actor runs, written one after another to ``out`` (its results file) as they fill.

    ``limit``, ``byte_limit`` and ``spill`` are the extractor's ``ActorSpill``; ``begin_file`` and
    ``end_file`` frame each file of the job; ``finish`` writes what is pending. ``runs`` lists the runs'
    chunk lengths in order. The pending set stays under ``limit`` actors (it is spilled before a file's
    actors would take it past), and its attributes came from the job's files, a batch of small ones
    (``dispatch.BATCH_MAX_BYTES``) or one file whose own set is bounded.

    ``event_types`` sums the good files' counts, which are taken out of their results as each file ends:
    a job holds one set of at most ``extract.MAX_EVENT_TYPES`` (raising TooManyEventTypes past it), not one
    per file (a batch is up to 2,000 files, each of up to that many types).
    """

    def __init__(self, out: BinaryIO, limit: int, byte_limit: int) -> None:
        self.limit = limit
        self.byte_limit = byte_limit
        self.runs: list[list[int]] = []
        #: The first id of each chunk of each run.
        self.firsts: list[list[int]] = []
        self._out = out
        self._pending = Merger()
        self.event_types: dict[str, int] = {}
        self._order = 0
        self._mark = (0, 0)

    def begin_file(self, order: int) -> None:
        self._order = order
        self._mark = (self._out.tell(), len(self.runs))

    def spill(self, actors: dict[int, Actor]) -> None:
        """The current file's actors so far, as a run (the caller then starts a new set)."""
        self._written(write_run(self._out, ActorRow.sorted_rows(actors, self._order)))

    def _written(self, run: tuple[list[int], list[int]]) -> None:
        chunks, firsts = run
        self.runs.append(chunks)
        self.firsts.append(firsts)

    def end_file(self, result: FileResult) -> None:
        """A failed file's runs are cut off again; a good file's remaining actors join the pending set."""
        if result.error is not None:
            position, count = self._mark
            rewind(self._out, position)
            del self.runs[count:], self.firsts[count:]
            return
        add_event_types(self.event_types, result.event_types)
        result.event_types = {}
        if self._pending.actor_count + len(result.actors) >= self.limit:
            self.finish()
        self._pending.add(result, take=True)
        result.actors = {}  # the pending set holds them now

    def held_actors(self) -> dict[int, Actor] | None:
        """The job's actors merged, by id, when none was written as a run: all of them are in the pending
        set, under ``limit``. None once a run was written (the actors are in the runs then)."""
        return None if self.runs else self._pending.sorted_actors()

    def finish(self) -> None:
        if self._pending.actor_count:
            self._written(write_run(self._out, self._pending.actor_run()))
        self._pending = Merger()
