"""The serving process's threads share at most ``allocator.MALLOC_ARENAS`` malloc arenas (glibc).

Each arena keeps the memory freed into it up to the trim threshold the server raises, so a thread per arena
(glibc's default allows 16 on 2 cores) multiplied what the serving process held (BENCH_NOTES.md, the fourth
2026-12-02 session). Checked in a fresh interpreter, as the server's start runs it: ``tune_allocator`` first,
then threads that each allocate from their arena at the same moment; ``malloc_info`` counts the arenas. The
same threads without the limit make more arenas than that, so the count can tell the two apart.
"""

from __future__ import annotations

import subprocess
import sys

from upload_server.allocator import MALLOC_ARENAS

SCRIPT = """
import ctypes, sys, tempfile, threading
from upload_server import allocator
libc = ctypes.CDLL("libc.so.6")
if sys.argv[1] == "limited":
    allocator.tune_allocator()
else:  # the same thresholds, glibc's arena limit
    libc.mallopt(allocator.M_MMAP_THRESHOLD, allocator.MMAP_THRESHOLD_BYTES)
    libc.mallopt(allocator.M_TRIM_THRESHOLD, allocator.TRIM_THRESHOLD_BYTES)
together = threading.Barrier(8)
def allocate():
    together.wait()
    for _ in range(50):
        block = bytes(300_000) + b"x"  # above pymalloc's sizes: from this thread's malloc arena
        del block
threads = [threading.Thread(target=allocate) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile() as out:
    stream = ctypes.c_void_p(libc.fopen(out.name.encode(), b"w"))
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    print(open(out.name).read().count("<heap nr="))
"""


def arenas(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_threads_share_at_most_the_arenas_the_server_allows() -> None:
    assert arenas("limited") <= MALLOC_ARENAS
    assert arenas("glibc_default") > MALLOC_ARENAS  # the check sees arenas: without the limit, more
