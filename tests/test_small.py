"""A small ZIP done in its planning call (``ingest/small.py``) answers exactly what the usual three steps
answer: the same plan, the same job, the same merge; only the timing differs. Then through the real
server: the small path is the one a small upload takes, and its answer's timing adds up."""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import zipfile
from pathlib import Path

import httpx
import pytest

from conftest import StartServer
from corpus_check import ARCHIVES, CORPUS, differences
from upload_server.ingest.archive import ArchiveLimits, plan_zip, work_bytes
from upload_server.ingest.assemble import PartFiles, RenderRequest, merge_and_render, run_job_to_file
from upload_server.ingest.dispatch import batch_entries
from upload_server.ingest.results import UploadReceipt
from upload_server.ingest.small import SMALL_WORK_BYTES, plan_and_run_small, small_file
from upload_server.ingest.worker import Job
from upload_server.receive.sniff import ContentKind

LIMITS = ArchiveLimits(max_entries=1000, max_uncompressed_bytes=1 << 30, max_ratio=200.0)
LINE = b'{"type":"PushEvent","actor":{"id":%d,"login":"u%d"}}\n'
TIMING = re.compile(rb'"timing_ms":\{[^}]*\}')


def many_files(path: Path, count: int = 400) -> Path:
    """Issue 14's small upload: many one-event files, actors shared between them, one failed file."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(count):
            zf.writestr(f"2024/{i:03d}.json", LINE % (i % 37, i % 37))
        zf.writestr("broken.json", b'{"type": ')
        zf.writestr("notes.txt", b"ignored")
    return path


def request(answer: Path, strict: bool = False) -> RenderRequest:
    receipt = UploadReceipt(upload_id="u", size_bytes=1, sha256="0" * 64, content_kind="zip")
    return RenderRequest(
        receipt=receipt,
        result_paths=[],
        answer_path=str(answer),
        parts=PartFiles.named(lambda suffix: f"{answer}-{suffix}", 1),
        ndjson=False,
        strict=strict,
        include_actors=True,
    )


def usual_way(path: Path, work: Path, strict: bool = False) -> bytes:
    """Plan, the jobs as the server batches them for 2 workers, then the merge: three steps."""
    plan = plan_zip(path, LIMITS)
    results = []
    for number, batch in enumerate(batch_entries(plan.entries, 2)):
        results.append(str(work / f"usual-{number}"))
        assert run_job_to_file(Job(str(path), "zip", entries=batch), results[-1]).bomb is None
    render = request(work / "usual-answer", strict)
    render = RenderRequest(**{**render.__dict__, "result_paths": results})
    render = RenderRequest(**{**render.__dict__, "ignored": plan.ignored, "failed_up_front": plan.failed})
    merge_and_render(render)
    return (work / "usual-answer").read_bytes()


def small_way(path: Path, work: Path, strict: bool = False) -> bytes:
    done = plan_and_run_small(
        str(path),
        LIMITS,
        Job(str(path), "zip"),
        str(work / "small"),
        request(work / "small-answer", strict),
        0.0,
    )
    assert done.done and done.rendered is not None and done.rendered.rendered
    return (work / "small-answer").read_bytes()


@pytest.mark.parametrize("archive", [*ARCHIVES, "many_files"])
def test_the_answer_is_that_of_the_three_steps(tmp_path: Path, archive: str) -> None:
    path = many_files(tmp_path / "many.zip") if archive == "many_files" else CORPUS / archive
    usual, small = usual_way(path, tmp_path), small_way(path, tmp_path)
    assert TIMING.sub(b"", small) == TIMING.sub(b"", usual)
    assert len(TIMING.findall(small)) == 1


@pytest.mark.parametrize("spill_actors", [10, 1000])
def test_results_are_held_in_memory_unless_a_run_was_spilled(tmp_path: Path, spill_actors: int) -> None:
    """The job's results stay in memory when all its 37 actors stay under the spill threshold (the results
    file is left empty); past it (10), they go through the file as any job's do. The same answer both ways."""
    path = many_files(tmp_path / "many.zip")
    usual = TIMING.sub(b"", usual_way(path, tmp_path))
    job = Job(str(path), "zip", spill_actors=spill_actors)
    done = plan_and_run_small(str(path), LIMITS, job, str(tmp_path / "r"), request(tmp_path / "a"), 0.0)
    assert done.rendered is not None and done.rendered.actors == 37
    assert TIMING.sub(b"", (tmp_path / "a").read_bytes()) == usual
    assert ((tmp_path / "r").stat().st_size == 0) == (spill_actors > 37)


@pytest.mark.parametrize("limit", [0, 100, 1 << 20])
def test_an_answer_within_its_limit_comes_back_in_memory(tmp_path: Path, limit: int) -> None:
    """Over the limit (100 bytes: the bytes held so far go to the file first) or with none, the answer
    is in its file, as before; within it, it comes back whole and no file is made."""
    path = many_files(tmp_path / "many.zip")
    usual = TIMING.sub(b"", usual_way(path, tmp_path))
    render = dataclasses.replace(request(tmp_path / "answer"), answer_in_memory=limit)
    done = plan_and_run_small(str(path), LIMITS, Job(str(path), "zip"), str(tmp_path / "r"), render, 0.0)
    assert done.rendered is not None and done.rendered.rendered
    if limit >= len(usual):
        assert done.rendered.answer is not None and TIMING.sub(b"", done.rendered.answer) == usual
        assert not (tmp_path / "answer").exists()
    else:
        assert done.rendered.answer is None
        assert TIMING.sub(b"", (tmp_path / "answer").read_bytes()) == usual


@pytest.mark.parametrize("kind", ["gzip", "json"])
def test_a_gzip_or_json_upload_answers_as_its_two_steps(tmp_path: Path, kind: str) -> None:
    body = b"".join(LINE % (i % 50, i % 50) for i in range(3000)) + b'"not an object"\n'
    path = tmp_path / "upload"
    path.write_bytes(gzip.compress(body) if kind == "gzip" else body)
    job = Job(str(path), kind, display_name="hour.json.gz" if kind == "gzip" else "upload.json")
    assert run_job_to_file(job, str(tmp_path / "usual")).bomb is None
    usual = request(tmp_path / "usual-answer")
    merge_and_render(RenderRequest(**{**usual.__dict__, "result_paths": [str(tmp_path / "usual")]}))
    done = plan_and_run_small(
        str(path), None, job, str(tmp_path / "small"), request(tmp_path / "answer"), 0.0
    )
    assert done.done and done.job is not None and done.job.events == 3000
    small_answer, usual_answer = (tmp_path / "answer").read_bytes(), (tmp_path / "usual-answer").read_bytes()
    assert TIMING.sub(b"", small_answer) == TIMING.sub(b"", usual_answer)


def test_which_gzip_and_json_uploads_are_small() -> None:
    assert small_file(ContentKind.JSON, SMALL_WORK_BYTES)
    assert not small_file(ContentKind.JSON, SMALL_WORK_BYTES + 1)
    assert small_file(ContentKind.GZIP, SMALL_WORK_BYTES // 8)  # counted as inflating 8 times
    assert not small_file(ContentKind.GZIP, SMALL_WORK_BYTES // 8 + 1)


def test_a_plan_over_the_limit_comes_back_as_a_plan_only(tmp_path: Path) -> None:
    path = tmp_path / "big.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(4):
            zf.writestr(f"{i}.json", b"".join(LINE % (j, i) for j in range(30_000)))  # ~1.5 MB each
    plan = plan_zip(path, LIMITS)
    assert sum(map(work_bytes, plan.entries)) > SMALL_WORK_BYTES
    done = plan_and_run_small(
        str(path), LIMITS, Job(str(path), "zip"), str(tmp_path / "r"), request(tmp_path / "a"), 0.0
    )
    assert not done.done and done.job is None and done.rendered is None
    assert done.plan == plan
    assert not (tmp_path / "r").exists() and not (tmp_path / "a").exists()


def test_a_bomb_is_found_and_nothing_rendered(tmp_path: Path) -> None:
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ok.json", LINE % (1, 1))
        zf.writestr("bomb.json.gz", gzip.compress(b" " * (8 << 20)))
    done = plan_and_run_small(
        str(path), LIMITS, Job(str(path), "zip"), str(tmp_path / "r"), request(tmp_path / "a"), 0.0
    )
    assert done.done and done.job is not None and done.job.bomb is not None
    assert done.rendered is None and not (tmp_path / "a").exists()


def test_strict_mode_refuses_as_the_usual_way_does(tmp_path: Path) -> None:
    path = many_files(tmp_path / "many.zip", 5)
    done = plan_and_run_small(
        str(path), LIMITS, Job(str(path), "zip"), str(tmp_path / "r"), request(tmp_path / "a", True), 0.0
    )
    assert done.rendered is not None and not done.rendered.rendered
    assert [failure["name"] for failure in done.rendered.failed] == ["broken.json"]


async def test_through_the_server_with_its_timing(start_server: StartServer, tmp_path: Path) -> None:
    server = await start_server()
    async with httpx.AsyncClient(base_url=server.url, timeout=60, verify=False) as client:
        calls = server.state.workers.done
        small = await client.post("/api/v1/upload", content=many_files(tmp_path / "m.zip").read_bytes())
        assert server.state.workers.done == calls + 1  # one worker call: plan, job and merge in one
        corpus = await client.post("/api/v1/upload", content=(CORPUS / "layouts.zip").read_bytes())
        strict = await client.post("/api/v1/upload?strict=true", content=(tmp_path / "m.zip").read_bytes())
    assert small.status_code == 200, small.text
    answer = small.json()
    assert answer["summary"]["events"] == 400 and len(answer["files"]) == 401
    timing = answer["timing_ms"]
    assert timing["queue"] >= 0 and 0 < timing["process"] < 60_000
    assert corpus.status_code == 200 and differences("layouts.zip", corpus.json()) == []
    assert strict.status_code == 422, strict.text
    assert json.loads(strict.text)["error"]["detail"]["failed"][0]["name"] == "broken.json"
    assert server.leftover_files() == []


async def test_gzip_and_json_through_the_server(start_server: StartServer) -> None:
    """A small gzip is one worker call; a JSON upload over the limit takes the usual two (job, merge)."""
    server = await start_server()
    small = gzip.compress(b"".join(LINE % (i, i) for i in range(1000)))
    large = b"".join(LINE % (i % 999, i) for i in range(SMALL_WORK_BYTES // len(LINE % (1, 1)) + 1000))
    calls: list[int] = []
    answers = []
    async with httpx.AsyncClient(base_url=server.url, timeout=60, verify=False) as client:
        for body in (small, large):
            before = server.state.workers.done
            answers.append(await client.post("/api/v1/upload", content=body))
            calls.append(server.state.workers.done - before)
    assert [answer.status_code for answer in answers] == [200, 200], answers[0].text
    assert (
        answers[0].json()["summary"]["events"] == 1000
        and answers[0].json()["summary"]["unique_actors"] == 1000
    )
    assert answers[1].json()["summary"]["events"] == len(large.splitlines())
    assert calls == [1, 2]
    assert server.leftover_files() == []
