"""Job planning (pure): how entries are grouped into worker jobs."""

from __future__ import annotations

from upload_server.ingest.archive import EntryPlan
from upload_server.ingest.dispatch import BATCH_MAX_ENTRIES, batch_entries


def entry(index: int, size: int, gzipped: bool = False) -> EntryPlan:
    return EntryPlan(
        index=index, name=f"{index}.json", compressed_size=size, declared_size=size, gzipped=gzipped
    )


def test_tiny_entries_share_jobs_and_keep_archive_order() -> None:
    entries = [entry(i, 100) for i in range(20_000)]
    batches = batch_entries(entries, workers=2)
    assert len(batches) == 20_000 // BATCH_MAX_ENTRIES
    assert [e.index for batch in batches for e in batch] == list(range(20_000))


def test_large_entries_get_a_job_each() -> None:
    entries = [entry(i, 200 << 20) for i in range(5)]
    assert [len(batch) for batch in batch_entries(entries, workers=2)] == [1] * 5


def test_a_medium_archive_is_split_so_every_worker_gets_work() -> None:
    entries = [entry(i, 1 << 20) for i in range(16)]  # 16 MiB in all
    batches = batch_entries(entries, workers=2)
    assert len(batches) >= 2 * 2
    assert sum(len(batch) for batch in batches) == 16


def test_many_tiny_files_are_shared_between_the_workers() -> None:
    entries = [entry(i, 1400) for i in range(400)]  # issue 14's 400 one-event files: 0.6 MB in all
    batches = batch_entries(entries, workers=2)
    assert len(batches) >= 2
    assert [e.index for batch in batches for e in batch] == list(range(400))


def test_gzipped_entries_weigh_more_than_their_compressed_size() -> None:
    plain = batch_entries([entry(i, 4 << 20) for i in range(8)], workers=1)
    gzipped = batch_entries([entry(i, 4 << 20, gzipped=True) for i in range(8)], workers=1)
    assert len(gzipped) > len(plain)


def test_no_entries_no_jobs() -> None:
    assert batch_entries([], workers=2) == []
