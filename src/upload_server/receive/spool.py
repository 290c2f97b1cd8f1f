"""The temporary file an upload streams into: batched writes off the event loop, a size cap, a sha256,
and removal in every outcome.

Body chunks are gathered into batches of about ``BATCH_BYTES`` and queued for the upload's two threads,
one hashing each batch and one writing it (``os.writev``, no joining copy), while the connection keeps
reading; chunks under ``SMALL_PIECE_BYTES`` are copied together, so a batch holds few objects. At most
``QUEUED_BATCHES`` batches may be queued and not yet hashed and written: past that, ``write`` waits, the
connection stops reading and TCP slows the client. That bounds memory per upload to the queued batches,
the one being gathered and the piece being read (``admission.BUFFERS_PER_UPLOAD``). A body that ends
within its first batch and ``INLINE_BYTES`` is hashed and written on the loop instead, and an upload's
small files are unlinked there: for a small upload the thread hops cost more than the work.

Every file this module creates is named ``upload-server-<pid>-<token>...`` so that files left behind by a
killed process can be recognised and removed at the next start.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import hashlib
import logging
import os
import re
import secrets
import shutil
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import trio
from trio.lowlevel import RunVar

from ..admission import QUEUED_BATCHES
from ..errors import InsufficientStorage, PayloadTooLarge

log = logging.getLogger("upload_server.spool")

#: A piece of body as the connection hands it over (h11 gives bytearrays; no copy is made).
Chunk = bytes | bytearray
Reserve = Callable[[int], int]
#: A batch as queued for a thread: its pieces and their total size.
Batch = tuple[list[Chunk], int]

BATCH_BYTES = 1 << 20
#: How long a stage thread waits for the next batch after a full one. A fast client's next batch comes
#: within ~1-3 ms (2 MiB read and handed over); this covers the loop waiting for a core on a busy machine.
LINGER_SECONDS = 0.02
#: A body that ends before its first batch was handed over, and is at most this large, is hashed and
#: written on the event loop when it ends: ~0.25 ms for 320 KB here (sha256 0.17 ms, the write 0.09 ms),
#: where handing it to the stage threads and waiting for them took 1.2-1.9 ms (a small upload's
#: time, BENCH_NOTES.md). 512 KiB is ~0.45 ms: a short step of the loop, not a stall. Only while no other
#: upload's threads are writing (``Spool._others_writing``).
INLINE_BYTES = 512 << 10
#: Pieces smaller than this are gathered into one buffer per run (so a batch holds few objects).
SMALL_PIECE_BYTES = 16 << 10
FILE_PREFIX = "upload-server-"
#: The names of the threads hashing and writing a spool start with this.
THREAD_NAME_PREFIX = "spool "
#: The supervisor's per-run directory (``--processes``), shared by its serving processes.
RUN_DIR_SUFFIX = ".run"
_OWNED_NAME = re.compile(rf"^{re.escape(FILE_PREFIX)}(\d+)-[0-9a-f]+")
#: The nice value of a thread once it has hashed or written a spool: the lowest. The event loop shares its
#: process's CPU share (its autogroup) with these threads, and at the same nice a writing thread kept a core
#: for 6 ms while the loop, runnable, waited (``perf sched timehist``). Health polled every 10 ms beside 2
#: uploaders of large.zip (quiet machine, 3 runs each, alternating): polls over 5 ms 8-10 against 14-18 of
#: ~1,280, p99 4.2-4.4 against 5.2-5.8 ms, the same 14 uploads done.
STAGE_THREAD_NICENESS = 19


def _lower_this_threads_priority() -> None:
    """Give the calling thread ``STAGE_THREAD_NICENESS`` (Linux: a thread's own nice, by its thread id).

    An unprivileged process cannot raise it back, so a thread of trio's cache that once ran a stage keeps
    it for whatever ``to_thread`` work it runs later (spool closes and unlinks, tus records and hashing,
    metrics): blocking work handed off the loop so that the loop comes first, which this keeps true."""
    with contextlib.suppress(OSError):  # a platform or sandbox that refuses: the thread keeps its nice
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), STAGE_THREAD_NICENESS)


class _Stage:
    """One step of an upload (hashing, or writing) and the batches queued for it, worked through by one
    thread that goes on from batch to batch while there are any.

    The event loop queues a batch without waiting, and a thread busy with the previous one takes it without
    a round trip through the loop. A ``to_thread.run_sync`` per batch cost ~3 ms of thread and loop
    wake-ups per 1 MiB batch on this loaded machine, four times the hashing itself, and the loop sat
    blocked behind it for 70% of the upload (measured, BENCH_NOTES.md issue 2).

    After a full batch (``BATCH_BYTES`` or more) the thread waits up to ``LINGER_SECONDS`` for the next
    one before it ends: the writing thread (0.3 s/GiB against hashing's 0.6) ran dry after nearly every
    batch and was started again through the loop, ~250 starts per GiB (BENCH_NOTES.md, issue 14, branch
    ``recv``). After a smaller batch it ends at once, so a slow client's upload holds no thread between its
    batches, and many uploads (whose batches are smaller, ``admission.piece_size``) hold no slot idle.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: collections.deque[Batch] = collections.deque()
        # The queue, ``_running`` and ``_closed`` change together under it.
        self._ready = threading.Condition(threading.Lock())
        self._running = False
        self._closed = False  # no batch is coming soon: the thread ends when the queue is empty
        #: Bytes finished; written by the thread only, read by the loop.
        self.done = 0
        #: The upload failed: what is still queued is dropped, not worked on.
        self.skip = False

    def put(self, batch: Batch) -> bool:
        """Queue a batch; True when no thread is going through the queue: the caller starts one."""
        with self._ready:
            self._queue.append(batch)
            idle, self._running, self._closed = not self._running, True, False
            self._ready.notify()
        return idle

    def close(self) -> None:
        """No more batches for now: a waiting thread ends at once."""
        with self._ready:
            self._closed = True
            self._ready.notify()

    def run(self, work: Callable[[list[Chunk]], None], progress: Callable[[], None]) -> None:
        """A thread's body: ``work`` on the queued batches in order, until there are none (for a while),
        ``progress`` after each.

        Given here, not held: the spool's own methods held by its stages were a reference cycle, and every
        upload's spool, session and budget waited for the cyclic collector (~50 objects an upload; the
        serving loop's collections took up to 9 ms in the mixed benchmark)."""
        _lower_this_threads_priority()
        linger = False
        while True:
            with self._ready:
                if not self._queue and linger and not self._closed:
                    self._ready.wait(LINGER_SECONDS)
                if not self._queue:
                    self._running = False
                    return
                batch, size = self._queue.popleft()
            if not self.skip:
                work(batch)
            del batch  # not held while the thread waits for the next one: it counts as freed
            self.done += size
            linger = size >= BATCH_BYTES
            progress()


class Spool:
    """A temporary upload file, open for writing until ``finish``; its siblings are removed with it."""

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        fd: int,
        reserve: Reserve | None = None,
        hash_name: str = "sha256",
        batch_size: Callable[[], int] | None = None,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        #: Bytes the spool may hold before it must ask ``reserve`` for more (the server's spool budget).
        self.allowance = max_bytes if reserve is None else 0
        self._reserve = reserve
        self.size = 0
        self.sha256 = ""
        #: The digest of the bytes written, by ``hash_name`` (sha256 by default), once finished.
        self.digest = b""
        self._fd = fd
        self._hasher = hashlib.new(hash_name)
        self._batch: list[Chunk] = []
        self._batch_bytes = 0
        self._small: bytearray | None = None  # the batch's buffer that small pieces are gathered into
        self._stages = (_Stage("hashing"), _Stage("writing"))
        self._queued = 0  # bytes handed to the threads
        self._nursery: trio.Nursery | None = None
        self._limiter: trio.CapacityLimiter | None = None
        # Set while the loop waits for the threads: (bytes both must have finished, what to set then).
        self._waiter: tuple[int, trio.Event] | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._siblings: list[Path] = []
        self._keep_file = False
        self._file_removed = False
        #: Bytes gathered before a batch goes to the writer (``admission.piece_size`` in the server).
        self._batch_size = batch_size or _full_batch

    @classmethod
    def written(cls, path: Path, size: int, sha256: str) -> Spool:
        """A spool over a file written already (a whole resumable upload): nothing more is written to it,
        and ``remove_files`` removes only its siblings; the file's owner removes the file."""
        spool = cls(path, size, -1)
        spool.size, spool.sha256, spool._keep_file = size, sha256, True
        return spool

    def sibling(self, suffix: str) -> Path:
        """A further temporary path tied to this upload (e.g. a worker's output), removed with it."""
        path = self.path.with_name(f"{self.path.stem}-{suffix}")
        self._siblings.append(path)
        return path

    async def write(self, data: Chunk) -> None:
        if self.size + len(data) > self.max_bytes:
            raise PayloadTooLarge(
                f"The upload is larger than this server accepts ({self.max_bytes} bytes).",
                detail={"max_upload_bytes": self.max_bytes},
            )
        if self.size + len(data) > self.allowance and self._reserve is not None:
            self.allowance = self._reserve(self.size + len(data))
        self.size += len(data)
        if len(data) < SMALL_PIECE_BYTES:
            # Small pieces (a body sent in tiny chunks, a dribbling client) are copied into one buffer,
            # not kept as objects of their own: a batch of 1-byte pieces would be a million objects.
            if self._small is None:
                self._small = bytearray()
                self._batch.append(self._small)
            self._small += data
        else:
            self._small = None
            self._batch.append(data)
        self._batch_bytes += len(data)
        if self._batch_bytes >= self._batch_size():
            await self._hand_over()

    async def finish(self) -> None:
        """Flush the last batch and wait until every byte is written; then ``sha256`` is set."""
        if self._queued == 0 and self._batch_bytes <= INLINE_BYTES and not self._others_writing():
            self._write_inline()
        else:
            await self._hand_over()
            await self._until_done(self._queued)
        for stage in self._stages:
            stage.close()
        self.digest = self._hasher.digest()
        self.sha256 = self.digest.hex() if self._hasher.name == "sha256" else ""

    async def sync(self) -> None:
        """Make what was written durable (fsync), off the event loop."""
        await trio.to_thread.run_sync(os.fsync, self._fd)

    async def _hand_over(self) -> None:
        batch, size = self._batch, self._batch_bytes
        self._batch, self._batch_bytes, self._small = [], 0, None
        if not batch:
            return
        bound = QUEUED_BATCHES * self._batch_size()
        if self._queued + size - self._done() > bound:
            # Wait only until this batch fits (or nothing is queued, for a batch larger than the bound):
            # the thread still has a batch to work on while the loop reads the next one. Waiting until half
            # the bound was free drained the queue at every wait (a batch is half the bound), and the
            # thread ended and was started again each time.
            await self._until_done(min(self._queued, self._queued + size - bound))
        self._queued += size
        assert self._nursery is not None and self._limiter is not None, "written outside open_spool"
        for stage in self._stages:
            if stage.put((batch, size)):
                self._nursery.start_soon(self._run_stage, stage, self._limiter)

    def _thread_name(self, step: str) -> str:
        """Named for profiles (py-spy --threads) and for telling a spool's busy threads apart."""
        return f"{THREAD_NAME_PREFIX}{step} {self.path.name}"

    def _done(self) -> int:
        """Bytes both hashed and written."""
        return min(stage.done for stage in self._stages)

    async def _until_done(self, target: int) -> None:
        """Wait until the first ``target`` bytes handed over are hashed and written."""
        try:
            while self._done() < target:
                event = trio.Event()
                self._waiter = (target, event)
                if self._done() < target:  # checked again once the threads can see the waiter
                    await event.wait()
        finally:
            self._waiter = None

    def _progress(self) -> None:
        """In a thread, after each batch: wake the waiting loop once its target is reached."""
        waiter, token = self._waiter, self._token
        if waiter is not None and token is not None and self._done() >= waiter[0] and not waiter[1].is_set():
            token.run_sync_soon(waiter[1].set)  # a second call for the same waiter sets it again: harmless

    def run_threads_in(self, nursery: trio.Nursery) -> None:
        """Where the hashing and writing thread runs (started as batches come); it waits for it."""
        self._token = trio.lowlevel.current_trio_token()
        self._nursery = nursery
        self._limiter = _stage_threads()

    def abandon(self) -> None:
        """The upload failed: what is still queued is dropped; the thread ends after its batch."""
        for stage in self._stages:
            stage.skip = True
            stage.close()

    def _others_writing(self) -> bool:
        """Whether any upload's hashing or writing thread is at work: then a write can wait in the kernel's
        dirty-page throttling, which must not happen on the loop, so a small body takes the threads too."""
        return self._limiter is not None and self._limiter.borrowed_tokens > 0

    def _write_inline(self) -> None:
        """The whole body, one small batch, hashed and written here on the loop (``INLINE_BYTES``)."""
        batch = self._batch
        self._batch, self._batch_bytes, self._small = [], 0, None
        self._hash_blocking(batch)
        try:
            self._write_blocking(batch)
        except OSError as error:
            self._raise_storage_error(error)
            raise

    async def _run_stage(self, stage: _Stage, limiter: trio.CapacityLimiter) -> None:
        try:
            work = self._hash_blocking if stage.name == "hashing" else self._write_blocking
            await trio.to_thread.run_sync(
                stage.run, work, self._progress, limiter=limiter, thread_name=self._thread_name(stage.name)
            )
        except OSError as error:
            self._raise_storage_error(error)
            raise

    def _raise_storage_error(self, error: OSError) -> None:
        """A write that failed for want of storage is the server's 507, not the client's fault."""
        # EFBIG: the file system's (or the process's RLIMIT_FSIZE) largest file: storage, not the client.
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise InsufficientStorage(
                "The server ran out of temporary disk space while receiving the upload.",
                detail={"tmp_dir": str(self.path.parent)},
            ) from error

    def _hash_blocking(self, batch: list[Chunk]) -> None:
        for piece in batch:
            self._hasher.update(piece)

    def _write_blocking(self, batch: list[Chunk]) -> None:
        view = memoryview(b"".join(batch)) if len(batch) > 1000 else None  # writev's IOV_MAX is 1024
        if view is not None:
            while view:
                view = view[os.write(self._fd, view) :]
            return
        pending = sum(len(piece) for piece in batch)
        written = os.writev(self._fd, batch)
        if written < pending:  # a short write: finish it the plain way
            rest = memoryview(b"".join(batch))[written:]
            while rest:
                rest = rest[os.write(self._fd, rest) :]

    async def remove_files(self) -> None:
        """Remove the upload's files (each once: a second call removes only siblings named since), off the
        event loop unless they are small (``INLINE_REMOVE_BYTES``).

        Shielded: this is cleanup, and it runs on the way out of cancellations too.
        """
        paths = self._leftovers()
        if not paths:
            return
        await release_files(functools.partial(_unlink_all, paths), _total_size(paths))
        self._file_removed = True
        self._siblings = [path for path in self._siblings if path not in paths]

    def _leftovers(self) -> list[Path]:
        """The upload's files not removed yet: its own (unless kept), and its siblings."""
        return [*([] if self._keep_file or self._file_removed else [self.path]), *self._siblings]

    async def close(self) -> None:
        """Close the file and remove the upload's files, in one call off the event loop unless they are
        small (``INLINE_REMOVE_BYTES``, as for ``remove_files``). Shielded.

        The session removes the file before it answers, so this close is often the inode's last reference,
        and the kernel frees the file's page cache in it: ~95 ms for 1 GiB, which held the event loop
        (every connection, health too) when the close ran on it (measured, BENCH_NOTES.md, issue 14). For
        a small upload the thread hop cost more than the close: ~0.3 ms of the loop's GIL time, of ~2.9 ms
        for an upload of files400.zip (py-spy ``--gil``, BENCH_NOTES.md).
        """
        await release_files(self._close_blocking, self.size + _total_size(self._siblings))

    def _close_blocking(self) -> None:
        try:
            os.close(self._fd)
        finally:
            self._remove_files_blocking()

    def _remove_files_blocking(self) -> None:
        _unlink_all(self._leftovers())


#: An upload's files totalling at most this many bytes are unlinked on the event loop (~25 us a small file
#: here, where a thread hop cost a small upload 0.1-0.4 ms, twice); larger ones in a thread (a 64 MiB file
#: took 3.5 ms to unlink, 14 ms once written back to disk).
INLINE_REMOVE_BYTES = 4 << 20


async def release_files(work: Callable[[], object], size: int) -> None:
    """Run ``work``, which closes or unlinks files of ``size`` bytes in all: on the event loop when they are
    small (``INLINE_REMOVE_BYTES``), else in a thread, shielded (this is cleanup, and it runs on the way out
    of cancellations too)."""
    if size <= INLINE_REMOVE_BYTES:
        work()
        return
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(work)


def _total_size(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            total += os.lstat(path).st_size
    return total


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


#: The hashing and writing threads of all spools together, at most. Their own limiter: threads busy for a
#: whole fast upload must not hold trio's default one, which the server's other blocking calls (fsync,
#: unlink) wait on. And one for the process, not per upload: each receiving upload runs two, so 1,024 fast
#: uploads would otherwise start 2,048 threads taking turns on the GIL and 2 cores. A thread never waits on
#: another, and ends when its queue is empty (after ``LINGER_SECONDS`` for a next batch following a full
#: one), so a slot is held only while a batch is being worked on or is about to come.
STAGE_THREADS = 16
_stage_limiter: RunVar[trio.CapacityLimiter] = RunVar("spool_stage_threads")


def _stage_threads() -> trio.CapacityLimiter:
    """This run's limiter for spool stage threads (one per Trio run, as trio's own default limiter)."""
    try:
        return _stage_limiter.get()
    except LookupError:
        limiter = trio.CapacityLimiter(STAGE_THREADS)
        _stage_limiter.set(limiter)
        return limiter


def _full_batch() -> int:
    return BATCH_BYTES


@contextlib.asynccontextmanager
async def open_spool(
    tmp_dir: str | os.PathLike[str],
    max_bytes: int,
    reserve: Reserve | None = None,
    batch_size: Callable[[], int] | None = None,
) -> AsyncIterator[Spool]:
    """Create the temporary file; on exit (any exit: success, error, cancellation) remove it.

    ``reserve(size)`` is asked before the file grows past what it was last granted; it returns the new
    allowance (at least ``size``) or raises.
    """
    path = Path(tmp_dir) / owned_name(".part")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    # Nothing can fail between here and the try.
    spool = Spool(path, max_bytes, fd, reserve, "sha256", batch_size)
    try:
        async with _writing(spool):
            yield spool
    finally:
        await spool.close()


@contextlib.asynccontextmanager
async def open_append(
    path: Path,
    offset: int,
    max_bytes: int,
    reserve: Reserve | None = None,
    hash_name: str = "sha256",
    batch_size: Callable[[], int] | None = None,
) -> AsyncIterator[Spool]:
    """Append to an existing file from ``offset`` (bytes past it are cut first); the file is kept.

    ``max_bytes``, ``reserve`` and the digest apply to the appended bytes only (resumable uploads).
    """
    fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.ftruncate(fd, offset)
        os.lseek(fd, offset, os.SEEK_SET)
        spool = Spool(path, max_bytes, fd, reserve, hash_name, batch_size)
        async with _writing(spool):
            yield spool
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def _writing(spool: Spool) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        spool.run_threads_in(nursery)
        try:
            yield
        except BaseException:
            spool.abandon()
            raise


def owned_name(suffix: str) -> str:
    """A fresh name for a temp-dir entry of this process, which :func:`remove_stale_files` removes once the
    process no longer runs; a directory is removed only when ``suffix`` is ``RUN_DIR_SUFFIX``."""
    return f"{FILE_PREFIX}{os.getpid()}-{secrets.token_hex(8)}{suffix}"


def remove_stale_files(tmp_dir: str | os.PathLike[str]) -> int:
    """Remove temporary files (and run directories) left by server processes that no longer run; return
    how many. Other directories are never touched, whatever their name."""
    removed = 0
    for entry in os.scandir(tmp_dir):
        match = _OWNED_NAME.match(entry.name)
        if not match or entry.is_symlink() or _process_alive(int(match.group(1))):
            continue
        run_dir = entry.is_dir() and entry.name.endswith(RUN_DIR_SUFFIX)
        if not (run_dir or entry.is_file()):
            continue
        with contextlib.suppress(FileNotFoundError):
            if run_dir:
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed += 1
    if removed:
        log.info("removed %d stale temporary file(s) from %s", removed, tmp_dir)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
