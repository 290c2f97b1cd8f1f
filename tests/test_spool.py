"""The spool's hashing and writing threads: every byte written and hashed in order, whatever the piece and
batch sizes, and no thread or file left behind when the upload fails midway. Real files in a temp dir."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
import trio

from upload_server.errors import InsufficientStorage, root_cause
from upload_server.receive import spool as spool_module
from upload_server.receive.spool import (
    BATCH_BYTES,
    INLINE_BYTES,
    INLINE_REMOVE_BYTES,
    STAGE_THREAD_NICENESS,
    STAGE_THREADS,
    THREAD_NAME_PREFIX,
    Spool,
    _Stage,
    _stage_threads,
    open_append,
    open_spool,
)


def pieces(sizes: list[int]) -> list[bytes]:
    return [os.urandom(size) for size in sizes]


@pytest.mark.parametrize(
    ("batch", "sizes"),
    [
        (1 << 20, [1 << 20] * 9 + [7]),  # the lone upload: 1 MiB reads and batches
        (64 << 10, [100] * 3000 + [70_000] * 20),  # small pieces gathered, then pieces past a batch
        # Pieces far larger than QUEUED_BATCHES batches: each batch alone is over the bound, and the loop
        # must still only wait for what is queued (it once waited for bytes that would never come).
        (16 << 10, [1 << 20, 3 << 20, 1, 2 << 20]),
    ],
)
async def test_every_byte_is_written_and_hashed_in_order(
    tmp_path: Path, batch: int, sizes: list[int]
) -> None:
    data = pieces(sizes)
    with trio.fail_after(30):
        async with open_spool(tmp_path, 1 << 30, batch_size=lambda: batch) as spool:
            for piece in data:
                await spool.write(bytearray(piece))
            await spool.finish()
            written = spool.path.read_bytes()
    whole = b"".join(data)
    assert written == whole
    assert spool.size == len(whole)
    assert spool.sha256 == hashlib.sha256(whole).hexdigest()
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("size", [0, 100, INLINE_BYTES, INLINE_BYTES + 1])
async def test_a_body_of_one_small_batch_is_written_without_a_thread(
    tmp_path: Path, size: int, thread_hops: list[object]
) -> None:
    """A body within INLINE_BYTES, all of it still in its first batch when it ends, is hashed and written
    on the loop: no thread hop for a small upload. One byte more takes the threads, as any batch does."""
    hops = thread_hops
    data = pieces([size // 2, size - size // 2])
    with trio.fail_after(30):
        async with open_spool(tmp_path, 1 << 30, batch_size=lambda: 1 << 20) as spool:
            for piece in data:
                await spool.write(piece)
            await spool.finish()
            written, threads = spool.path.read_bytes(), len(hops)
    assert written == b"".join(data)
    assert spool.sha256 == hashlib.sha256(written).hexdigest()
    assert threads == (0 if size <= INLINE_BYTES else 2)  # hashing and writing
    assert not os.listdir(tmp_path)


async def test_a_small_body_takes_the_threads_while_another_upload_is_writing(
    tmp_path: Path, thread_hops: list[object]
) -> None:
    """While any upload's hashing or writing thread is at work (a token of the stage threads' limiter is
    held), a small body is not written on the loop: its write could wait in the kernel's dirty-page
    throttling there."""
    data = pieces([1000])
    # A token held: another upload's thread at work.
    with trio.fail_after(30):
        async with _stage_threads(), open_spool(tmp_path, 1 << 30, batch_size=lambda: 1 << 20) as spool:
            await spool.write(data[0])
            await spool.finish()
            hops = len(thread_hops)
    assert hops == 2  # hashing and writing, as for any batch
    assert spool.sha256 == hashlib.sha256(data[0]).hexdigest()


@pytest.mark.parametrize("sibling_size", [1000, INLINE_REMOVE_BYTES])
async def test_small_files_are_removed_on_the_loop_and_each_once(
    tmp_path: Path, sibling_size: int, thread_hops: list[object]
) -> None:
    """An upload's files are unlinked on the loop while they total at most INLINE_REMOVE_BYTES, else in a
    thread; a second removal does nothing, and the spool's own on exit removes a sibling named since."""
    async with open_spool(tmp_path, 1 << 30) as spool:
        await spool.write(os.urandom(1000))
        await spool.finish()
        spool.sibling("results").write_bytes(bytes(sibling_size))
        await spool.remove_files()
        assert not os.listdir(tmp_path)
        hops = len(thread_hops)
        assert hops == (0 if sibling_size + 1000 <= INLINE_REMOVE_BYTES else 1)
        await spool.remove_files()
        assert len(thread_hops) == hops  # nothing left to remove: no hop
        late = spool.sibling("late")
        late.write_bytes(b"x")
    assert not late.exists() and not os.listdir(tmp_path)


@pytest.mark.parametrize("size", [100, INLINE_BYTES + 1])
async def test_a_body_that_cannot_be_stored_is_insufficient_storage(tmp_path: Path, size: int) -> None:
    """A write that fails for want of space is 507, on the loop (a small body) as in the writing thread."""
    fd = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
    try:
        with trio.fail_after(30), pytest.raises(BaseException) as raised:  # the root cause is checked below
            async with trio.open_nursery() as nursery:
                spool = Spool(tmp_path / "upload", 1 << 30, fd, batch_size=lambda: 1 << 20)
                spool.run_threads_in(nursery)
                await spool.write(os.urandom(size))
                await spool.finish()
    finally:
        os.close(fd)
    assert isinstance(root_cause(raised.value), InsufficientStorage)


async def test_an_append_uses_the_named_digest(tmp_path: Path) -> None:
    path = tmp_path / "resumable"
    path.write_bytes(b"kept" + b"cut off")
    more = pieces([300_000, 5, 2 << 20])
    with trio.fail_after(30):
        async with open_append(path, 4, 1 << 30, hash_name="sha1", batch_size=lambda: 256 << 10) as spool:
            for piece in more:
                await spool.write(piece)
            await spool.finish()
    assert path.read_bytes() == b"kept" + b"".join(more)
    assert spool.digest == hashlib.sha1(b"".join(more)).digest()


async def test_a_failed_upload_ends_its_threads_and_removes_its_file(tmp_path: Path) -> None:
    """An error while batches are still queued: the context exits (its threads ended: it waits for them),
    and the file is gone."""

    class Refused(Exception):
        pass

    with trio.fail_after(30), pytest.RaisesGroup(Refused):
        async with open_spool(tmp_path, 1 << 30, batch_size=lambda: 64 << 10) as spool:
            for piece in pieces([64 << 10] * 40):
                await spool.write(piece)
            raise Refused
    assert spool_threads() == []  # the context waited for them
    assert not os.listdir(tmp_path)


def spool_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith(THREAD_NAME_PREFIX)]


async def test_an_upload_between_batches_holds_no_thread(tmp_path: Path) -> None:
    """A slow client's upload (here: between two batches) keeps no hashing or writing thread: 1,024 of them
    would otherwise hold 2,048 idle threads. The threads are back as soon as a batch comes."""
    with trio.fail_after(30):
        async with open_spool(tmp_path, 1 << 30, batch_size=lambda: 64 << 10) as spool:
            await spool.write(bytes(64 << 20))  # ~40 ms of hashing: the threads are seen at work
            seen: set[str] = set()
            with trio.move_on_after(5):
                while len(seen) < 2:
                    seen.update(name.split()[1] for name in spool_threads())
                    await trio.sleep(0.0005)
            assert seen == {"hashing", "writing"}
            for round_no in range(3):
                await spool.write(os.urandom(100_000))
                await spool.finish()  # every byte so far hashed and written
                for _ in range(200):  # a thread sets done just before it finds the queue empty and ends
                    if not spool_threads():
                        break
                    await trio.sleep(0.005)
                assert spool_threads() == [], round_no
            assert spool.size == (64 << 20) + 300_000


async def test_the_stage_threads_run_below_the_event_loop(tmp_path: Path) -> None:
    """A spool's hashing and writing threads take the lowest nice value, so that on a busy core the event
    loop of the same process comes first; the loop's own is untouched."""
    loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: dict[str, int] = {}
    with trio.fail_after(30):
        async with open_spool(tmp_path, 1 << 30, batch_size=lambda: 1 << 20) as spool:
            await spool.write(bytes(64 << 20))
            with trio.move_on_after(5):
                while len(seen) < 2 or set(seen.values()) != {STAGE_THREAD_NICENESS}:
                    for thread in threading.enumerate():
                        if thread.name.startswith(THREAD_NAME_PREFIX) and thread.native_id is not None:
                            with contextlib.suppress(OSError):  # the thread ended meanwhile
                                nice = os.getpriority(os.PRIO_PROCESS, thread.native_id)
                                seen[thread.name.split()[1]] = nice
                    await trio.sleep(0.0005)
            await spool.finish()
    assert seen == {"hashing": STAGE_THREAD_NICENESS, "writing": STAGE_THREAD_NICENESS}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == loop_nice


async def test_the_stage_threads_of_all_uploads_are_bounded_together(tmp_path: Path) -> None:
    """Many uploads receiving at once share STAGE_THREADS hashing and writing threads; two per upload each
    would be 2,048 threads at the connection cap. Every byte still arrives."""
    uploads, most_seen = 24, 0
    data = pieces([16 << 20] * 2)  # ~10 ms of hashing a batch: long enough for the threads to meet
    # Every upload sends the same bytes: their digest, once (24 times was 0.7 s of the test's CPU).
    expected = hashlib.sha256(b"".join(data)).hexdigest()

    async def upload() -> None:
        async with open_spool(tmp_path, 1 << 30, batch_size=lambda: 16 << 20) as spool:
            for piece in data:
                await spool.write(piece)
            await spool.finish()
            assert spool.sha256 == expected

    async def watch(done: trio.Event) -> None:
        nonlocal most_seen
        while not done.is_set():
            most_seen = max(most_seen, len(spool_threads()))
            await trio.sleep(0.0005)

    with trio.fail_after(60):
        done = trio.Event()
        async with trio.open_nursery() as watching:
            watching.start_soon(watch, done)
            async with trio.open_nursery() as receiving:
                for _ in range(uploads):
                    receiving.start_soon(upload)
            done.set()
    assert 2 < most_seen <= STAGE_THREADS
    assert not os.listdir(tmp_path)


def test_a_stage_thread_waits_for_the_next_full_batch_and_ends_when_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a full batch the thread takes the next one itself (the loop starts no thread again: ~250 starts
    per GiB when the writing thread ended at every empty queue); close() ends the wait at once."""
    monkeypatch.setattr(spool_module, "LINGER_SECONDS", 60.0)  # a wait that ran out would fail the join
    worked: list[int] = []
    stage = _Stage("writing")
    full = ([bytes(BATCH_BYTES)], BATCH_BYTES)
    assert stage.put(full)  # no thread yet: the caller starts one
    thread = threading.Thread(
        target=stage.run, args=(lambda batch: worked.append(sum(map(len, batch))), lambda: None)
    )
    thread.start()
    deadline = time.monotonic() + 10
    while stage.done < BATCH_BYTES and time.monotonic() < deadline:
        time.sleep(0.001)
    assert not stage.put(full)  # the thread is waiting for it: none to start
    while stage.done < 2 * BATCH_BYTES and time.monotonic() < deadline:
        time.sleep(0.001)
    assert worked == [BATCH_BYTES, BATCH_BYTES]
    stage.close()
    thread.join(10)
    assert not thread.is_alive()  # woken by close(), not by the 60 s wait running out


def test_a_stage_thread_ends_at_once_after_a_small_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A small batch (a slow client, or one of many uploads) does not keep its thread or its slot."""
    monkeypatch.setattr(spool_module, "LINGER_SECONDS", 60.0)
    stage = _Stage("hashing")
    assert stage.put(([b"x" * 1000], 1000))
    thread = threading.Thread(target=stage.run, args=(lambda batch: None, lambda: None))
    thread.start()
    thread.join(10)
    assert not thread.is_alive() and stage.done == 1000
    assert stage.put(([b"y"], 1))  # the queue has no thread again: the caller starts one


async def test_the_file_is_closed_and_removed_on_exit_after_the_session_removed_it(tmp_path: Path) -> None:
    """The session removes the file before it answers; the close at the context's end (the inode's last
    reference, which frees the page cache: ~95 ms for 1 GiB) still happens, off the event loop, and no
    descriptor is left open."""
    with trio.fail_after(30):
        async with open_spool(tmp_path, 1 << 30, batch_size=lambda: 1 << 20) as spool:
            await spool.write(os.urandom(3 << 20))
            await spool.finish()
            await spool.remove_files()  # as UploadSession.finish does before the answer
            assert not os.listdir(tmp_path)
            fd = spool._fd
            os.fstat(fd)  # still open: the spool owns it until the context ends
    with pytest.raises(OSError) as closed:
        os.fstat(fd)
    assert closed.value.errno == errno.EBADF
