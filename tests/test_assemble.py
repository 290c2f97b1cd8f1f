"""The worker-side steps around run_job: results to files, then one merge and render into the answer."""

from __future__ import annotations

from pathlib import Path

import orjson

from events_factory import as_ndjson, make_events
from upload_server.ingest.assemble import RenderRequest, merge_and_render, run_job_to_file
from upload_server.ingest.results import UploadReceipt
from upload_server.ingest.worker import Job

RECEIPT = UploadReceipt(upload_id="u", size_bytes=1, sha256="0" * 64, content_kind="json")


def _job_files(tmp_path: Path, bodies: list[bytes]) -> list[str]:
    paths = []
    for number, body in enumerate(bodies):
        source = tmp_path / f"in-{number}.json"
        source.write_bytes(body)
        outcome = run_job_to_file(
            Job(str(source), "json", display_name=f"f{number}.json"), str(tmp_path / f"r{number}")
        )
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
        ndjson=False,
        strict=True,
        include_actors=True,
    )
    outcome = merge_and_render(request)
    assert not outcome.rendered
    assert [failure["name"] for failure in outcome.failed] == ["f1.json"]
    assert outcome.failed[0]["error"]["code"] == "INVALID_JSON"
    assert not (tmp_path / "answer").exists()
