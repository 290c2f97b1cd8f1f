"""Seeded fuzzing of the ingest (issue 7): broken archives and gzip files, and a differential test against
CPython's zipfile. A short, reproducible budget here (``derandomize``: the same cases on every run); the
long, randomized run is ``loadtest/fuzz_ingest.py`` (figures in BENCH_NOTES.md)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hostile

SHORT = settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
BUDGETS = st.sampled_from([1 << 12, 64 << 20])  # streamed / read whole


@SHORT
@given(raw=hostile.broken_zip(), budget=BUDGETS)
def test_a_broken_archive_is_answered_never_crashed(
    tmp_path: Path, inflater: str, raw: bytes, budget: int
) -> None:
    hostile.check_zip(raw, tmp_path / "u.zip", budget, inflater)


@SHORT
@given(raw=hostile.broken_gzip(), budget=BUDGETS)
def test_a_broken_gzip_is_answered_never_crashed(
    tmp_path: Path, inflater: str, raw: bytes, budget: int
) -> None:
    hostile.check_gzip(raw, tmp_path / "u.gz", budget, inflater)


@pytest.mark.parametrize("index", range(len(hostile.base_archives())))
def test_every_base_archive_matches_zipfile_exactly(tmp_path: Path, index: int, inflater: str) -> None:
    raw = hostile.base_archives()[index]
    assert hostile.zipfile_reads_whole(raw) is not None
    assert hostile.check_zip(raw, tmp_path / "u.zip", 1 << 12, inflater) == "answered, 0 of {} failed".format(
        sum(
            name.endswith((".json", ".ndjson", ".json.gz"))
            for name in zipfile.ZipFile(io.BytesIO(raw)).namelist()
        )
    )


@SHORT
@given(archive=hostile.written_archive())
def test_differential_against_zipfile(tmp_path: Path, inflater: str, archive: tuple[bytes, int]) -> None:
    """Any archive zipfile writes (and reads whole), data descriptors, zip64 records, comments and a
    stub before the archive included, gets from us the per-file counts of zipfile's bytes."""
    hostile.check_written(archive, tmp_path / "d.zip", inflater)


@SHORT
@given(data=hostile.json_ish(), chunk=st.integers(1, 64))
def test_json_with_unusable_numbers_never_escapes_and_agrees_in_memory_and_streamed(
    data: bytes, chunk: int
) -> None:
    hostile.check_json(data, chunk)
