"""The C allocator (glibc's malloc) of the serving process and of the workers: how much freed memory it
keeps, and when it gives that back. A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("upload_server.lifecycle")

# glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
#: malloc arenas the serving process's threads share (glibc's default: 8 per core).
MALLOC_ARENAS = 2
#: Blocks at least this large are mapped on their own (glibc's default: 128 KiB, then adjusted).
MMAP_THRESHOLD_BYTES = 16 << 20
#: Freed memory an arena keeps before it trims (glibc's default: 128 KiB).
TRIM_THRESHOLD_BYTES = 64 << 20


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


def tune_allocator() -> None:
    """Keep freed body buffers in the heap instead of returning them to the OS after every piece.

    Each received piece allocates fresh buffers of a few hundred KiB (the socket read, h11's buffer and
    slices); with glibc's defaults they come from and go back to the kernel each time, and the page faults
    cost about a third of the receive path's CPU (loadtest/bench_upload.py with py-spy, BENCH_NOTES.md).
    Peak RSS stays the same; ``return_free_memory`` gives the kept memory back (the server calls it when
    the last upload in flight ends).

    And at most ``MALLOC_ARENAS`` arenas: glibc gives threads arenas of their own (up to 16 on 2 cores),
    and every arena keeps its freed memory up to that trim threshold. Trio's threads (answer-file reads,
    spool closes) had 15 arenas holding ~26 MiB between them, and 64 uploads of 20 MB at once took the
    serving VmHWM from 62.8 MiB in a first round to 75.6, 77.5 and 78.3 MiB in the next three; with two
    arenas, 58.7, 58.9, 60.3 and 64.6 (``loadtest/bench_many_uploads.py --rounds 4``, BENCH_NOTES.md).
    Called before any thread is started: glibc fixes the arena limit when a thread first needs one.
    """
    if _LIBC is None:
        log.debug("not glibc: allocator left as it is")
        return
    _LIBC.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    _LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)


def return_free_memory() -> None:
    """Give the memory the allocator keeps (``tune_allocator``'s threshold) back to the OS.

    Blocking (glibc walks every arena's free chunks, holding each arena's lock): for a thread, at a time
    when the loop allocates little."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
