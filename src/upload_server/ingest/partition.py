"""Cut an upload's actors by id into parts that workers merge and render side by side (issue 14). Pure.

The final merge and render ran on one worker after the last job: on large24 (126,000 actors in 24 runs)
0.7-0.8 s of a 2.2-3.2 s upload with the other core idle (``loadtest/trace_upload.py``). Every run is
sorted by id, so the actors of an id range are merged from only the chunks of each run that overlap it,
and the ranges' answers, put one after another, are the whole answer.

The ranges are cut at chunk first ids (``JobRuns.firsts``, one per 1,024 rows written): each part gets
about as many chunks, and so about as many rows to merge, as the others.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Iterable, Sequence

from .assemble import JobOutcome, PartOutcome, PartRequest, RenderOutcome, RenderRequest
from .results import fill
from .runs import Run

__all__ = ["assembled", "bounds", "part_requests", "runs_in_range", "split_ids"]

#: The fewest chunks per part worth a part of its own: a part costs a worker round trip (~1-5 ms on a busy
#: machine) and a file, more than merging a few thousand rows.
MIN_PART_CHUNKS = 4


def split_ids(firsts: Iterable[int], parts: int) -> list[int]:
    """At most ``parts - 1`` ids, ascending, that cut the chunks starting at ``firsts`` into ``parts`` of
    about as many chunks each; fewer when there are too few chunks for ``parts`` parts worth their cost."""
    ordered = sorted(firsts)
    parts = min(parts, len(ordered) // MIN_PART_CHUNKS)
    if parts < 2:
        return []
    cuts = {ordered[len(ordered) * number // parts] for number in range(1, parts)}
    return sorted(cut for cut in cuts if cut > ordered[0])  # never an empty first part


def bounds(splits: Sequence[int]) -> list[tuple[int | None, int | None]]:
    """The ``[low, high)`` ranges the ``splits`` cut every id into (None: unbounded)."""
    edges: list[int | None] = [None, *splits, None]
    return list(itertools.pairwise(edges))


def runs_in_range(runs: Sequence[Run], low: int | None, high: int | None) -> list[Run]:
    """Of each run, the chunks that may hold ids with ``low <= id < high``, as a run bounded to them (runs
    with none are left out; the order of the others is kept, which the merge's ties need). A chunk holds
    ids from its first id up to the next chunk's first id."""
    if low is None and high is None:
        return list(runs)  # the whole of every run, whether or not its first ids are known
    selected: list[Run] = []
    for run in runs:
        firsts = run.firsts
        start = 0 if low is None else max(0, bisect.bisect_right(firsts, low) - 1)
        end = len(firsts) if high is None else bisect.bisect_left(firsts, high)
        if start >= end:
            continue
        offset = run.offset + sum(run.chunks[:start])
        selected.append(Run(run.path, offset, run.chunks[start:end], firsts[start:end], low, high))
    return selected


def part_requests(request: RenderRequest, outcomes: Sequence[JobOutcome], workers: int) -> list[PartRequest]:
    """The parts of ``request``'s render, one per worker at most (``request.parts`` at most), each with the
    runs of every job bounded to its id range, in the jobs' order (which the merge's ties need). The first
    part frames the answer too."""
    runs = [run for outcome in outcomes for run in outcome.runs]
    firsts = (first for run in runs for first in run.firsts)
    ranges = bounds(split_ids(firsts, min(workers, len(request.parts))))
    write = request.ndjson or request.include_actors
    return [
        PartRequest(
            runs_in_range(runs, low, high),
            request.parts[number],
            request.ndjson,
            write,
            frame=request if number == 0 else None,
        )
        for number, (low, high) in enumerate(ranges)
    ]


def assembled(
    request: RenderRequest, parts: Sequence[PartRequest], done: Sequence[PartOutcome]
) -> tuple[RenderOutcome, list[bytes | str]]:
    """The render's outcome from its parts' (``done[i]`` of ``parts[i]``), and the answer's pieces: the
    first part's frame filled in with the actors' count, the part files in id order and the timing."""
    if done[0].refused is not None:
        raise done[0].refused
    framed = done[0].framed
    assert framed is not None
    if framed.frame is None:  # strict mode refused the upload
        return framed.outcome, []
    count = sum(outcome.actors for outcome in done)
    files = [
        (part.files.actors, outcome.actors) for part, outcome in zip(parts, done, strict=True) if part.write
    ]
    pieces = fill(framed.frame, count, files, request.timing_ms())
    return dataclasses.replace(framed.outcome, actors=count), pieces
