"""Actors spilled as sorted runs while files are extracted (runs.JobRuns), merged in bounded passes
(runs.bounded_runs): the same actors, attributes and counts as holding every file's actors in memory."""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from conftest import examples
from upload_server.ingest import runs as runs_module
from upload_server.ingest.extract import FileResult, extract_bytes, extract_stream
from upload_server.ingest.partition import bounds, runs_in_range, split_ids
from upload_server.ingest.results import ActorRow, merge, merge_runs
from upload_server.ingest.runs import (
    CHUNK_BYTES,
    MIN_SPILL_ACTORS,
    JobRuns,
    Run,
    bounded_runs,
    read_run,
    runs_of,
    spill_threshold,
)

#: A file: its events' (actor id, login tag) in order, and whether it ends in bad JSON (after its spills).
FileSpec = tuple[list[tuple[int, str]], bool]

files_strategy = st.lists(
    st.tuples(
        st.lists(st.tuples(st.integers(-3, 40), st.sampled_from("abc")), max_size=40),
        st.booleans(),
    ),
    max_size=6,
)


def ndjson(occurrences: list[tuple[int, str]], broken: bool) -> bytes:
    """Events whose actor's login differs between occurrences, so which occurrence wins shows."""
    lines = [
        orjson.dumps({"type": "T", "actor": {"id": aid, "login": f"{tag}{aid}-{n}"}})
        for n, (aid, tag) in enumerate(occurrences)
    ]
    return b"\n".join(lines) + (b'\n{"actor": {"id": 1' if broken else b"\n")


#: Read 64 bytes at a time, a file is decoded a few lines at a time: a broken file has spilled before its
#: bad line is reached (whole, its one slice would fail before a single event is counted).
SMALL_READS = 64


def spilled_job(
    path: Path, files: list[FileSpec], orders: list[int], limit: int, byte_limit: int = 1 << 30
) -> list[FileResult]:
    """The files extracted one after another as a job does it (streamed in small reads), spilling into
    ``path``."""
    results = []
    with open(path, "wb") as out:
        runs = JobRuns(out, limit, byte_limit)
        for number, (occurrences, broken) in enumerate(files):
            runs.begin_file(orders[number])
            data = io.BytesIO(ndjson(occurrences, broken))
            result = extract_stream(f"f{number}", data, None, chunk_size=SMALL_READS, actors_out=runs)
            result.order = orders[number]
            runs.end_file(result)
            assert result.actors == {}  # they are in the runs now, or were dropped with a failed file
            results.append(result)
        runs.finish()
    path.with_suffix(".lengths").write_bytes(orjson.dumps(runs.runs))
    path.with_suffix(".firsts").write_bytes(orjson.dumps(runs.firsts))
    return results


def held_in_memory(files: list[FileSpec], orders: list[int]) -> list[FileResult]:
    results = []
    for number, (occurrences, broken) in enumerate(files):
        result = extract_bytes(f"f{number}", ndjson(occurrences, broken))
        result.order = orders[number]
        results.append(result)
    return results


@hsettings(max_examples=examples(60))
@given(
    jobs=st.lists(files_strategy, min_size=1, max_size=4),
    limit=st.integers(1, 6),
    byte_limit=st.sampled_from([1 << 30, 200, 1]),
    fan_in=st.integers(2, 5),
    merge_bytes=st.sampled_from([1, 300, 1 << 30]),
    seed=st.integers(0, 1000),
    chunk_rows=st.sampled_from([1, 3, 1024]),
    parts=st.integers(1, 5),
)
def test_spilled_runs_merge_to_the_in_memory_answer(
    tmp_path_factory: object,
    jobs: list[list[FileSpec]],
    limit: int,
    byte_limit: int,
    fan_in: int,
    merge_bytes: int,
    seed: int,
    chunk_rows: int,
    parts: int,
) -> None:
    """Jobs whose files spill every ``limit`` actors or ``byte_limit`` bytes (failed files' runs cut off
    again), merged in passes of ``fan_in`` runs or ``merge_bytes`` of chunks, give exactly the actors of
    one in-memory merge of every file: ids, first attributes by file order, summed events. So do ``parts``
    id ranges cut at chunk first ids (chunks of ``chunk_rows``), each merged alone, put one after another:
    the runs of one file that share an id (spilled twice) keep the earlier run's attributes in every part."""
    tmp = Path(tmp_path_factory.mktemp("runs"))  # type: ignore[attr-defined]
    count = sum(len(files) for files in jobs)
    orders = random.Random(seed).sample(range(100), count)
    runs, expected, start = [], [], 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runs_module, "ACTOR_CHUNK_ROWS", chunk_rows)
        for number, files in enumerate(jobs):
            path = tmp / f"job-{number}"
            job_orders = orders[start : start + len(files)]
            start += len(files)
            results = spilled_job(path, files, job_orders, limit, byte_limit)
            assert [r.error is not None for r in results] == [broken for _, broken in files]
            lengths, firsts = (
                orjson.loads(path.with_suffix(suffix).read_bytes()) for suffix in (".lengths", ".firsts")
            )
            runs += runs_of(str(path), lengths, firsts)
            expected += held_in_memory(files, job_orders)
    scratch = (str(tmp / "a"), str(tmp / "b"))
    truth = list(merge(expected).actors.items())
    bounded = bounded_runs(runs, scratch, fan_in, merge_bytes)
    assert len(bounded) <= fan_in
    assert len(bounded) <= 1 or sum(max(run.chunks) for run in bounded) <= merge_bytes
    assert list(merge_runs(map(read_run, bounded))) == truth
    assert all(len(run.firsts) == len(run.chunks) for run in runs)
    cut = bounds(split_ids((first for run in runs for first in run.firsts), parts))
    assert len(cut) <= parts
    partitioned = []
    for low, high in cut:
        part = bounded_runs(runs_in_range(runs, low, high), scratch, fan_in, merge_bytes)
        partitioned += merge_runs(map(read_run, part))
    assert partitioned == truth


def test_a_file_spills_each_time_it_holds_the_limit(tmp_path: Path) -> None:
    """Ten distinct actors with a limit of three: three runs of three while the file is read, and the
    last actor in the job's pending run when the job finishes."""
    occurrences = [(aid, "a") for aid in range(10)]
    results = spilled_job(tmp_path / "job", [(occurrences, False)], [0], 3)
    lengths = orjson.loads((tmp_path / "job.lengths").read_bytes())
    rows = [[row.id for row in read_run(run)] for run in runs_of(str(tmp_path / "job"), lengths)]
    assert rows == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert results[0].events == 10


def test_large_attributes_spill_by_bytes(tmp_path: Path) -> None:
    """Few actors, each with a 10 KB login: the count limit is far off, the bytes they came in are not.
    Spilled every time 25 KB of JSON have been read, the job never holds more than a few of them."""
    logins = [(aid, "x" * 10_000) for aid in range(12)]
    (result,) = spilled_job(tmp_path / "job", [(logins, False)], [0], 1000, 25_000)
    lengths = orjson.loads((tmp_path / "job.lengths").read_bytes())
    sizes = [len(list(read_run(run))) for run in runs_of(str(tmp_path / "job"), lengths)]
    assert sum(sizes) == 12 and len(sizes) >= 4 and max(sizes) <= 3
    assert result.events == 12


def test_chunks_of_large_actors_are_cut_until_they_fit(tmp_path: Path) -> None:
    """Ten actors with 400 KB logins: no chunk of their run is over CHUNK_BYTES (1 MiB) unless it is one
    row, and the rows read back whole."""
    logins = [(aid, "x" * 400_000) for aid in range(10)]
    spilled_job(tmp_path / "job", [(logins, False)], [0], 1000)
    (run,) = runs_of(str(tmp_path / "job"), orjson.loads((tmp_path / "job.lengths").read_bytes()))
    assert len(run.chunks) > 1 and max(run.chunks) <= CHUNK_BYTES
    expected = [(aid, f"{tag}{aid}-{aid}") for aid, tag in logins]  # the login ndjson() gives
    assert [(row.id, row.login) for row in read_run(run)] == expected


def test_a_failed_file_leaves_no_run_behind(tmp_path: Path) -> None:
    """A file that spilled and then failed is cut off the results file: its size is what the good file
    before it wrote."""
    good = ([(aid, "a") for aid in range(4)], False)
    bad = ([(aid, "b") for aid in range(100, 120)], True)
    spilled_job(tmp_path / "bad", [bad], [0], 2)
    assert (tmp_path / "bad").stat().st_size == 0
    spilled_job(tmp_path / "good", [good], [0], 2)
    spilled_job(tmp_path / "both", [good, bad], [0, 1], 2)
    assert (tmp_path / "both").read_bytes() == (tmp_path / "good").read_bytes()
    assert (tmp_path / "both.lengths").read_bytes() == (tmp_path / "good.lengths").read_bytes()


def test_the_spill_threshold_follows_the_memory_budget() -> None:
    assert spill_threshold(64 << 20) > 90_000
    assert spill_threshold(1 << 10) == MIN_SPILL_ACTORS


def test_a_merge_of_hundreds_of_runs_holds_one_descriptor_at_most(tmp_path: Path) -> None:
    """300 jobs' runs, merged in passes down to 8 runs, then merged into the answer's stream: a run's file
    is opened per chunk read, so however many runs are merged, at most one descriptor is held at a time."""
    runs = []
    for number in range(300):
        path = tmp_path / f"job-{number}"
        spilled_job(path, [([(number * 7 % 101 + k, "a") for k in range(3)], False)], [number], 64)
        runs += runs_of(str(path), orjson.loads(path.with_suffix(".lengths").read_bytes()))
    baseline = len(os.listdir("/proc/self/fd"))
    most = 0

    def watched(run: Run) -> Iterator[ActorRow]:
        nonlocal most
        for row in read_run(run):
            most = max(most, len(os.listdir("/proc/self/fd")) - baseline)
            yield row

    scratch = (str(tmp_path / "a"), str(tmp_path / "b"))
    bounded = bounded_runs(runs, scratch, fan_in=8)
    assert len(bounded) <= 8
    merged = list(merge_runs(map(watched, bounded)))
    assert [aid for aid, _ in merged] == sorted(
        {number * 7 % 101 + k for number in range(300) for k in range(3)}
    )
    assert most <= 1
