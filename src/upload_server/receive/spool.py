"""The temporary file an upload streams into: batched writes off the event loop, a size cap, a sha256,
and removal in every outcome.

Body chunks are gathered into batches of about ``BATCH_BYTES`` and handed to a writer task that writes
them (``os.writev``, no joining copy) and hashes them in a worker thread while the connection keeps
reading; chunks under ``SMALL_PIECE_BYTES`` are copied together, so a batch holds few objects. The
hand-over channel holds one batch: when the disk falls behind, ``write`` blocks, the connection stops
reading and TCP slows the client. That bounds memory per upload to about three batches.

Every file this module creates is named ``upload-server-<pid>-<token>...`` so that files left behind by a
killed process can be recognised and removed at the next start.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import trio

from ..errors import InsufficientStorage, PayloadTooLarge

log = logging.getLogger("upload_server.spool")

#: A piece of body as the connection hands it over (h11 gives bytearrays; no copy is made).
Chunk = bytes | bytearray
Reserve = Callable[[int], int]

BATCH_BYTES = 1 << 20
#: Pieces smaller than this are gathered into one buffer per run (so a batch holds few objects).
SMALL_PIECE_BYTES = 16 << 10
FILE_PREFIX = "upload-server-"
#: The supervisor's per-run directory (``--processes``), shared by its serving processes.
RUN_DIR_SUFFIX = ".run"
_OWNED_NAME = re.compile(rf"^{re.escape(FILE_PREFIX)}(\d+)-[0-9a-f]+")


class Spool:
    """A temporary upload file, open for writing until ``finish``; its siblings are removed with it."""

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        fd: int,
        to_writer: trio.MemorySendChannel[list[Chunk]],
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
        self._to_writer = to_writer
        self._drained = trio.Event()
        self._siblings: list[Path] = []
        self._keep_file = False
        #: Bytes gathered before a batch goes to the writer (``admission.piece_size`` in the server).
        self._batch_size = batch_size or _full_batch

    @classmethod
    def written(cls, path: Path, size: int, sha256: str) -> Spool:
        """A spool over a file written already (a whole resumable upload): nothing more is written to it,
        and ``remove_files`` removes only its siblings; the file's owner removes the file."""
        spool = cls(path, size, -1, trio.open_memory_channel[list[Chunk]](0)[0])
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
        await self._hand_over()
        await self._to_writer.aclose()
        await self._drained.wait()
        self.digest = self._hasher.digest()
        self.sha256 = self.digest.hex() if self._hasher.name == "sha256" else ""

    async def sync(self) -> None:
        """Make what was written durable (fsync), off the event loop."""
        await trio.to_thread.run_sync(os.fsync, self._fd)

    async def _hand_over(self) -> None:
        batch, self._batch, self._batch_bytes, self._small = self._batch, [], 0, None
        if batch:
            await self._to_writer.send(batch)

    async def run_writer(self, batches: trio.MemoryReceiveChannel[list[Chunk]]) -> None:
        async with batches:
            async for batch in batches:
                # Hashing and writing a batch are independent and both release the GIL: run them side by
                # side in two threads (sha256 alone is ~0.6 CPU s/GiB, as much as the whole receive loop).
                async with trio.open_nursery() as both:
                    both.start_soon(trio.to_thread.run_sync, self._hash_blocking, batch)
                    both.start_soon(self._write, batch)
        self._drained.set()

    async def _write(self, batch: list[Chunk]) -> None:
        try:
            await trio.to_thread.run_sync(self._write_blocking, batch)
        except OSError as error:
            # EFBIG: the file system's (or the process's RLIMIT_FSIZE) largest file: storage, not the client.
            if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise InsufficientStorage(
                    "The server ran out of temporary disk space while receiving the upload.",
                    detail={"tmp_dir": str(self.path.parent)},
                ) from error
            raise

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
        """Remove the upload's files, off the event loop (unlinking a file of gigabytes takes a while).

        Shielded: this is cleanup, and it runs on the way out of cancellations too.
        """
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._remove_files_blocking)

    def _remove_files_blocking(self) -> None:
        for leftover in (*([] if self._keep_file else [self.path]), *self._siblings):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


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
    send, receive = trio.open_memory_channel[list[Chunk]](1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    spool = Spool(
        path, max_bytes, fd, send, reserve, batch_size=batch_size
    )  # nothing can fail before the try
    try:
        async with _writing(spool, send, receive):
            yield spool
    finally:
        os.close(fd)
        await spool.remove_files()


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
    send, receive = trio.open_memory_channel[list[Chunk]](1)
    fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.ftruncate(fd, offset)
        os.lseek(fd, offset, os.SEEK_SET)
        spool = Spool(path, max_bytes, fd, send, reserve, hash_name, batch_size)
        async with _writing(spool, send, receive):
            yield spool
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def _writing(
    spool: Spool,
    send: trio.MemorySendChannel[list[Chunk]],
    receive: trio.MemoryReceiveChannel[list[Chunk]],
) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(spool.run_writer, receive)
        async with send:
            yield


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
