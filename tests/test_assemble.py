"""The worker-side steps around run_job: results to files, then one merge and render into the answer."""

from __future__ import annotations

import io
import tracemalloc
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from events_factory import as_ndjson, make_events
from upload_server.ingest import assemble, runs
from upload_server.ingest.assemble import (
    JobOutcome,
    PartFiles,
    RenderOutcome,
    RenderRequest,
    merge_and_render,
    render_part,
    run_job_to_file,
    write_pieces,
)
from upload_server.ingest.partition import assembled, part_requests
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


def _job_outcomes(
    tmp_path: Path, bodies: list[bytes], spill_actors: int = Job.spill_actors
) -> list[JobOutcome]:
    outcomes = []
    for number, body in enumerate(bodies):
        source = tmp_path / f"in-{number}.json"
        source.write_bytes(body)
        job = Job(str(source), "json", display_name=f"f{number}.json", spill_actors=spill_actors)
        outcome = run_job_to_file(job, str(tmp_path / f"r{number}"))
        assert outcome.bomb is None
        outcomes.append(outcome)
    return outcomes


def _job_files(tmp_path: Path, bodies: list[bytes], spill_actors: int = Job.spill_actors) -> list[str]:
    return [outcome.results_path for outcome in _job_outcomes(tmp_path, bodies, spill_actors)]


def rendered_in_parts(
    request: RenderRequest, outcomes: list[JobOutcome], workers: int
) -> tuple[RenderOutcome, bytes, int]:
    """What ``dispatch.render_in_parts`` does, each part's worker call made here in turn: the outcome, the
    answer's bytes and how many parts there were."""
    parts = part_requests(request, outcomes, workers)
    outcome, pieces = assembled(request, parts, [render_part(part) for part in parts])
    answer = io.BytesIO()
    write_pieces(answer, pieces)
    return outcome, answer.getvalue(), len(parts)


def test_json_answer_merges_every_job(tmp_path: Path) -> None:
    first, truth = make_events(60, seed=1)
    second, second_truth = make_events(40, seed=2)
    truth.merge(second_truth)
    request = RenderRequest(
        receipt=RECEIPT,
        result_paths=_job_files(tmp_path, [as_ndjson(first), as_ndjson(second)]),
        answer_path=str(tmp_path / "answer"),
        parts=PartFiles.named(lambda suffix: str(tmp_path / suffix), 1),
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
        parts=PartFiles.named(lambda suffix: str(tmp_path / suffix), 1),
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
        parts=PartFiles.named(lambda suffix: str(tmp_path / suffix), 1),
        ndjson=False,
        strict=True,
        include_actors=True,
    )
    outcome = merge_and_render(request)
    assert not outcome.rendered
    assert [failure["name"] for failure in outcome.failed] == ["f1.json"]
    assert outcome.failed[0]["error"]["code"] == "INVALID_JSON"
    assert not (tmp_path / "answer").exists()


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("spill_actors", [Job.spill_actors, 3, 1])
@pytest.mark.parametrize("ndjson", [False, True])
def test_streamed_merge_answers_the_same_bytes_as_the_in_memory_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ndjson: bool, spill_actors: int, workers: int
) -> None:
    """Three jobs sharing actors, their runs in chunks of 7 rows: the answer is byte for byte what merging
    every FileResult in memory (``results.merge``) and rendering it gives; also when the jobs spill every
    3 actors, or every actor (more than ``MERGE_FAN_IN`` runs: merged in passes); in one call
    (``merge_and_render``) and rendered in parts by id range side by side (as ``render_in_parts``)."""
    monkeypatch.setattr(runs, "ACTOR_CHUNK_ROWS", 7)
    bodies = [as_ndjson(make_events(count, seed=seed)[0]) for count, seed in ((90, 5), (70, 6), (1, 7))]
    outcomes = _job_outcomes(tmp_path, bodies, spill_actors)
    paths = [outcome.results_path for outcome in outcomes]
    request = RenderRequest(
        receipt=RECEIPT,
        result_paths=paths,
        answer_path=str(tmp_path / "answer"),
        parts=PartFiles.named(lambda suffix: str(tmp_path / suffix), workers),
        ndjson=ndjson,
        strict=False,
        include_actors=True,
        ignored=[("notes.txt", "unsupported_name")],
    )
    if workers == 1:
        rendered = merge_and_render(request)
        produced = (tmp_path / "answer").read_bytes()
    else:
        rendered, produced, parts = rendered_in_parts(request, outcomes, workers)
        assert parts == workers
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
    assert rendered.rendered and rendered.actors == len(merged.actors) and rendered.events == merged.events
    written = sum(len(assemble.read_trailer(path).runs) for path in paths)
    if spill_actors == Job.spill_actors:
        assert written == len(bodies)  # one run per job: nothing spilled
    else:
        assert written >= len(merged.actors) // spill_actors
    assert (written > runs.MERGE_FAN_IN) is (spill_actors == 1)  # then merged in passes (test_runs)
    # The passes' scratch files go once each part is written, not when the upload ends.
    assert not [
        path.name for path in tmp_path.iterdir() if "-merge-" in path.name or path.name.startswith("merge-")
    ]


@pytest.mark.parametrize("ndjson", [False, True])
def test_strict_mode_refuses_in_parts_too(tmp_path: Path, ndjson: bool) -> None:
    """A render in parts refuses a failed file in strict mode as the one call does: no answer, the
    failures named, and nothing counted."""
    good = as_ndjson(make_events(400, seed=8)[0])
    outcomes = _job_outcomes(tmp_path, [good, b'{"type": '], spill_actors=5)
    request = RenderRequest(
        receipt=RECEIPT,
        result_paths=[outcome.results_path for outcome in outcomes],
        answer_path=str(tmp_path / "answer"),
        parts=PartFiles.named(lambda suffix: str(tmp_path / suffix), 2),
        ndjson=ndjson,
        strict=True,
        include_actors=True,
    )
    rendered, produced, parts = rendered_in_parts(request, outcomes, 2)
    assert parts == 2 and produced == b""
    assert not rendered.rendered and rendered.actors == 0
    assert [failure["name"] for failure in rendered.failed] == ["f1.json"]


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
