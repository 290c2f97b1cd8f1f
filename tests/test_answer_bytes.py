"""The answer's bytes for valid input are pinned: the typed records (issue 13) and the hardening (issue 7)
change how results travel between processes, never what a client reads. tests/data/answer_golden.bin
holds the bytes the code rendered before those changes (commit 5dd7871 on main); regenerate it only for
an intended change of the answer, with ``uv run python tests/test_answer_bytes.py``."""

from __future__ import annotations

import gzip
import io
import sys
import zipfile
from pathlib import Path

import orjson

from events_factory import as_array, as_ndjson, make_events
from upload_server.ingest.archive import ArchiveLimits, plan_zip
from upload_server.ingest.assemble import (
    PartFiles,
    RenderRequest,
    merge_and_render,
    read_trailer,
    run_job_to_file,
)
from upload_server.ingest.extract import extract_bytes
from upload_server.ingest.results import (
    UploadReceipt,
    actor_lines,
    file_line,
    merge,
    render_answer,
    summary_line,
)
from upload_server.ingest.runs import MERGE_FAN_IN
from upload_server.ingest.worker import Job, run_job

GOLDEN = Path(__file__).parent / "data" / "answer_golden.bin"
TIMING = {"receive": 1.5, "process": 2.5}


def upload(tmp: Path) -> Path:
    """A ZIP with every layout, a .gz entry, actors shared between files, odd values. Valid input only: the
    messages of failed files are meant to change (issue 7 made them ours)."""
    first, _ = make_events(150, seed=31, without_actor_every=20)
    second, _ = make_events(90, seed=32)
    third, _ = make_events(60, seed=33)
    odd = (
        b'{"id":"x","type":null,"actor":{"id":-5,"login":"neg"},"repo":"not an object"}\n'
        b'{"id":7,"type":["t"],"actor":{"id":1.0},"created_at":123}\n[1,2]\n"text"\n'
        b'{"type":"\\u00e9\\ud83d\\ude00","actor":{"id":9223372036854775807,"login":"max"}}\n'
    )
    path = tmp / "golden.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("hour.ndjson", as_ndjson(first))
        zf.writestr("dir/array.json", as_array(second))
        zf.writestr("packed.json.gz", gzip.compress(as_ndjson(third)))
        zf.writestr("odd.json", odd)
        zf.writestr("README.md", b"#")
    return path


def render(tmp: Path) -> bytes:
    path = upload(tmp)
    plan = plan_zip(path, ArchiveLimits(max_entries=100, max_uncompressed_bytes=1 << 30, max_ratio=200.0))
    events = io.BytesIO()
    results = run_job(Job(str(path), "zip", entries=tuple(plan.entries), memory_budget=1 << 12))
    for result in results:  # the event lines, as the NDJSON answer streams them
        data = zipfile.ZipFile(path).read(result.name)
        extract_bytes(result.name, gzip.decompress(data) if result.name.endswith(".gz") else data, events)
    merged = merge([*results, *plan.failed])
    receipt = UploadReceipt("0123456789abcdef", path.stat().st_size, "0" * 64, "zip")
    answer = orjson.dumps(render_answer(merged, receipt, ignored=plan.ignored, timing_ms=TIMING))
    tail = b"".join(actor_lines(merged.actors.items())) + b"".join(file_line(r) for r in merged.files)
    tail += summary_line(merged, receipt, ignored=plan.ignored, timing_ms=TIMING)
    return answer + b"\n" + events.getvalue() + tail


def test_the_answer_bytes_are_those_rendered_before(tmp_path: Path) -> None:
    assert render(tmp_path) == GOLDEN.read_bytes()


def _before_timing(answer: bytes) -> bytes:
    """The answer (or summary line) up to its timing, the one part that differs between runs."""
    return answer[: answer.index(b',"timing_ms":')]


def test_spilled_actors_answer_the_same_bytes(tmp_path: Path) -> None:
    """The golden upload as the server processes it, its actors spilled every 2 (issue 12): runs on disk,
    merged in passes (more than 64 runs), rendered by the worker. Same bytes but the timing."""
    path = upload(tmp_path)
    plan = plan_zip(path, ArchiveLimits(max_entries=100, max_uncompressed_bytes=1 << 30, max_ratio=200.0))
    job = Job(str(path), "zip", entries=tuple(plan.entries), memory_budget=1 << 12, spill_actors=2)
    results_path = run_job_to_file(job, str(tmp_path / "results")).results_path
    rendered = {}
    for ndjson in (False, True):
        request = RenderRequest(
            receipt=UploadReceipt("0123456789abcdef", path.stat().st_size, "0" * 64, "zip"),
            result_paths=[results_path],
            answer_path=str(tmp_path / f"answer-{ndjson}"),
            parts=PartFiles.named(lambda suffix: str(tmp_path / suffix), 1),
            ndjson=ndjson,
            strict=False,
            include_actors=True,
            ignored=plan.ignored,
            failed_up_front=plan.failed,
        )
        assert merge_and_render(request).rendered
        rendered[ndjson] = Path(request.answer_path).read_bytes()
    assert len(read_trailer(results_path).runs) > MERGE_FAN_IN  # so the render merged them in passes
    assert not (tmp_path / "merge-a").exists()  # whose scratch files went with the answer written
    golden = GOLDEN.read_bytes()
    assert _before_timing(rendered[False]) == _before_timing(golden.split(b"\n", 1)[0])
    tail = rendered[True].splitlines(keepends=True)
    golden_tail = golden.splitlines(keepends=True)[-len(tail) :]
    assert tail[:-1] == golden_tail[:-1]
    assert _before_timing(tail[-1]) == _before_timing(golden_tail[-1])


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        GOLDEN.write_bytes(render(Path(tmp)))
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)", file=sys.stderr)
