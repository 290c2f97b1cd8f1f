"""The worker-side steps around run_job: results to files, then one merge and render into the answer."""

from __future__ import annotations

import tracemalloc
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from events_factory import as_ndjson, make_events
from upload_server.ingest import assemble, runs
from upload_server.ingest.assemble import RenderRequest, merge_and_render, run_job_to_file
from upload_server.ingest.results import (
    UploadReceipt,
    actor_lines,
    file_line,
    merge,
    render_answer,
    summary_line,
)
from upload_server.ingest.worker import Job, run_job

RECEIPT = UploadReceipt(upload_id="u", size_bytes=1, sha256="0" * 64, content_kind="json")


def _job_files(tmp_path: Path, bodies: list[bytes], spill_actors: int = Job.spill_actors) -> list[str]:
    paths = []
    for number, body in enumerate(bodies):
        source = tmp_path / f"in-{number}.json"
        source.write_bytes(body)
        job = Job(str(source), "json", display_name=f"f{number}.json", spill_actors=spill_actors)
        outcome = run_job_to_file(job, str(tmp_path / f"r{number}"))
        assert outcome.bomb is None
        paths.append(outcome.results_path)
    return paths


def test_json_answer_merges_every_job(tmp_path: Path) -> None:
    first, truth = make_events(60, seed=1)
    second, second_truth = make_events(40, seed=2)
    truth.merge(second_truth)
    request = RenderRequest(
        receipt=RECEIPT,
        result_paths=_job_files(tmp_path, [as_ndjson(first), as_ndjson(second)]),
        answer_path=str(tmp_path / "answer"),
        scratch_paths=(str(tmp_path / "merge-a"), str(tmp_path / "merge-b")),
        ndjson=False,
        strict=False,
        include_actors=True,
        receive_ms=1.0,
    )
    outcome = merge_and_render(request)
    assert outcome.rendered and outcome.failed == []
    answer = orjson.loads((tmp_path / "answer").read_bytes())
    assert answer["summary"]["events"] == truth.events
    assert {actor["id"]: actor["events"] for actor in answer["actors"]} == dict(truth.actor_events)
    assert [entry["name"] for entry in answer["files"]] == ["f0.json", "f1.json"]


def test_ndjson_tail_is_actors_then_files_then_summary(tmp_path: Path) -> None:
    events, truth = make_events(30, seed=3)
    request = RenderRequest(
        receipt=RECEIPT,
        result_paths=_job_files(tmp_path, [as_ndjson(events)]),
        answer_path=str(tmp_path / "tail"),
        scratch_paths=(str(tmp_path / "merge-a"), str(tmp_path / "merge-b")),
        ndjson=True,
        strict=False,
        include_actors=True,
    )
    assert merge_and_render(request).rendered
    lines = [orjson.loads(line) for line in (tmp_path / "tail").read_bytes().splitlines()]
    kinds = [line["kind"] for line in lines]
    assert kinds == ["actor"] * len(truth.actor_events) + ["file", "summary"]
    assert lines[-1]["summary"]["events"] == truth.events


def test_strict_mode_renders_nothing_and_names_the_failures(tmp_path: Path) -> None:
    events, _ = make_events(5, seed=4)
    request = RenderRequest(
        receipt=RECEIPT,
        result_paths=_job_files(tmp_path, [as_ndjson(events), b"{not json"]),
        answer_path=str(tmp_path / "answer"),
        scratch_paths=(str(tmp_path / "merge-a"), str(tmp_path / "merge-b")),
        ndjson=False,
        strict=True,
        include_actors=True,
    )
    outcome = merge_and_render(request)
    assert not outcome.rendered
    assert [failure["name"] for failure in outcome.failed] == ["f1.json"]
    assert outcome.failed[0]["error"]["code"] == "INVALID_JSON"
    assert not (tmp_path / "answer").exists()


@pytest.mark.parametrize("spill_actors", [Job.spill_actors, 3, 1])
@pytest.mark.parametrize("ndjson", [False, True])
def test_streamed_merge_answers_the_same_bytes_as_the_in_memory_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ndjson: bool, spill_actors: int
) -> None:
    """Three jobs sharing actors, their runs in chunks of 7 rows: the answer is byte for byte what merging
    every FileResult in memory (``results.merge``) and rendering it gives; also when the jobs spill every
    3 actors, or every actor (more than ``MERGE_FAN_IN`` runs: merged in passes)."""
    monkeypatch.setattr(runs, "ACTOR_CHUNK_ROWS", 7)
    bodies = [as_ndjson(make_events(count, seed=seed)[0]) for count, seed in ((90, 5), (70, 6), (1, 7))]
    paths = _job_files(tmp_path, bodies, spill_actors)
    request = RenderRequest(
        receipt=RECEIPT,
        result_paths=paths,
        answer_path=str(tmp_path / "answer"),
        scratch_paths=(str(tmp_path / "merge-a"), str(tmp_path / "merge-b")),
        ndjson=ndjson,
        strict=False,
        include_actors=True,
        ignored=[("notes.txt", "unsupported_name")],
    )
    assert merge_and_render(request).rendered
    produced = (tmp_path / "answer").read_bytes()
    results = []
    for number in range(len(bodies)):
        results += run_job(Job(str(tmp_path / f"in-{number}.json"), "json", display_name=f"f{number}.json"))
    merged = merge(results)
    if ndjson:
        timing = orjson.loads(produced.splitlines()[-1])["timing_ms"]
        expected = b"".join(actor_lines(merged.actors.items()))
        expected += b"".join(map(file_line, merged.files))
        expected += summary_line(merged, RECEIPT, ignored=request.ignored, timing_ms=timing)
    else:
        timing = orjson.loads(produced)["timing_ms"]
        expected = orjson.dumps(
            render_answer(merged, RECEIPT, ignored=request.ignored, timing_ms=timing, include_actors=True)
        )
    assert len(merged.actors) > 7 * 3
    assert produced == expected
    written = sum(len(assemble.read_trailer(path).runs) for path in paths)
    if spill_actors == Job.spill_actors:
        assert written == len(bodies)  # one run per job: nothing spilled
    else:
        assert written >= len(merged.actors) // spill_actors
    assert (written > runs.MERGE_FAN_IN) is (spill_actors == 1)  # then merged in passes (test_runs)
    # The passes' scratch files go once the answer is written, not when the upload ends.
    assert not (tmp_path / "merge-a").exists() and not (tmp_path / "merge-b").exists()


def _traced_peak(job: Job, results_path: str) -> int:
    tracemalloc.start()
    try:
        run_job_to_file(job, results_path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_job_holds_a_bounded_set_of_actors_however_many_there_are(tmp_path: Path) -> None:
    """100,000 distinct actors in one file, spilled every 2,000 (or every MiB read): the job's peak of
    traced memory is what reading the file costs, not what its actors would (held, several times more)."""
    source = tmp_path / "many.json"
    source.write_bytes(
        b"".join(
            b'{"type":"PushEvent","actor":{"id":%d,"login":"user%d","url":"https://x/users/user%d"}}\n'
            % (n, n, n)
            for n in range(100_000)
        )
    )
    job = Job(str(source), "json", display_name="many.json", memory_budget=1 << 20, spill_actors=2000)
    spilled = _traced_peak(job, str(tmp_path / "spilled"))
    # Nothing spilled (neither by count nor by bytes read): the file's actors held until it ends.
    held = _traced_peak(replace(job, spill_actors=1 << 30, memory_budget=1 << 30), str(tmp_path / "held"))
    assert spilled < 16 << 20 and spilled * 3 < held, (spilled, held)
