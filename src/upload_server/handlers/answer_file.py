"""An answer file read for sending: from the page cache on the event loop where the bytes are there, from a
thread where they are not.

The answers and event lines the workers have just written are in the page cache. ``trio.open_file`` reads
every piece in a thread, and on this VM a thread's round trip cost far more than the copy: reading a 10 MB
file 256 KiB at a time took 11.5-14.0 ms of CPU through ``trio.open_file`` and 1.1-1.9 ms by ``preadv2``
with ``RWF_NOWAIT`` on the loop (BENCH_NOTES.md, seventh session). ``RWF_NOWAIT`` (Linux 4.14) makes the
read return only what is cached, at once, and fail with ``EAGAIN`` when nothing is; what it could not read
is then read in a thread as before, so a file the kernel has dropped from its cache never stalls the loop.
Where the flag is missing or refused (another OS, a file system without it), every read goes to a thread.
"""

from __future__ import annotations

import errno
import functools
import os
from pathlib import Path
from types import TracebackType

import trio

from ..receive.spool import release_files

_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)


class AnswerFile:
    """A file opened for reading from the start, one piece per ``read``; an async context manager."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._offset = 0
        #: The size when opened (what the answer's Content-Length says); a short read that ends there is the
        #: end of the file, not a cache miss.
        self.size = os.fstat(fd).st_size
        self._nowait = _NOWAIT

    @classmethod
    async def open(cls, path: str | Path) -> AnswerFile:
        """Open ``path`` (in a thread: opening may wait for the disk, as a read may)."""
        fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            return cls(fd)
        except BaseException:
            os.close(fd)
            raise

    async def read(self, size: int, /) -> bytearray:
        """The next ``size`` bytes at most; empty at the end of the file."""
        await trio.lowlevel.checkpoint()
        piece = bytearray(size)
        got = self._read_cached(piece)
        if got is None or (got < size and self._offset + got < self.size):
            got = got or 0
            rest = memoryview(piece)[got:]
            try:
                got += await trio.to_thread.run_sync(self._read_blocking, rest, got)
            finally:
                rest.release()  # so that the piece can be cut to what was read
        del piece[got:]
        self._offset += got
        return piece

    def _read_cached(self, piece: bytearray) -> int | None:
        """What the page cache holds of the next piece, read on the loop; None when it held none of it."""
        if self._nowait is None:
            return None
        try:
            return os.preadv(self._fd, [piece], self._offset, self._nowait)
        except BlockingIOError:
            return None
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            self._nowait = None  # this file system or kernel refuses the flag: threads from now on
            return None

    def _read_blocking(self, view: memoryview, skip: int) -> int:
        return os.preadv(self._fd, [view], self._offset + skip)

    async def aclose(self) -> None:
        """Close the file by the spool's rule (``release_files``): the last close of a removed file frees its
        page cache, ~95 ms per GiB."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        await release_files(functools.partial(os.close, fd), self.size)
        await trio.lowlevel.checkpoint_if_cancelled()

    async def __aenter__(self) -> AnswerFile:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.aclose()
