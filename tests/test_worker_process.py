"""Worker processes hold only the extraction code (the serving code stays in the serving process), and they
run at the lowest priority.

A contract about memory (``launch``'s docstring has the figures): every module the serving process imports
and a worker does not is memory the worker need not hold. Checked in real worker processes of the real pool.
"""

from __future__ import annotations

import os

from upload_server.config import Config
from upload_server.ingest.dispatch import open_worker_pool
from upload_server.ingest.worker_process import WORKER_NICENESS

SERVING_ONLY = ("trio", "h11", "upload_server.server", "upload_server.http.connection", "prometheus_client")


async def test_a_worker_imports_none_of_the_serving_code(tmp_path) -> None:
    async with open_worker_pool(Config(tmp_dir=str(tmp_path), workers=1)) as pool:
        # eval is pickled by reference, so the worker imports nothing of this test module to run it.
        loaded = await pool.run(eval, f"[m for m in {SERVING_ONLY!r} if m in __import__('sys').modules]")
        extraction = await pool.run(eval, "'upload_server.ingest.extract' in __import__('sys').modules")
    assert loaded == []
    assert extraction  # preloaded in the forkserver, so a new worker is ready at once


async def test_a_worker_yields_the_cpu_to_the_serving_process(tmp_path) -> None:
    """Workers run at the lowest priority there is (nice 19, SCHED_IDLE), so the event loop, and every
    health answer with it, never waits behind a worker's time slice (``worker_process.init_worker``)."""
    async with open_worker_pool(Config(tmp_dir=str(tmp_path), workers=1)) as pool:
        policy = await pool.run(eval, "__import__('os').sched_getscheduler(0)")
        niceness = await pool.run(eval, "__import__('os').nice(0)")
    assert policy == os.SCHED_IDLE
    assert niceness == WORKER_NICENESS


#: In a worker: the bytes malloc holds in blocks mapped on their own (glibc's ``mallinfo2().hblkhd``) while
#: an 8 MiB buffer is alive. Below ``allocator.MMAP_THRESHOLD_BYTES`` it comes from the heap; under glibc's
#: defaults (128 KiB at first) it is mapped on its own, and given back to the kernel when freed.
MAPPED_WHILE_AN_8_MIB_BUFFER_LIVES = (
    "(lambda ctypes, buffer: (lambda info, mallinfo2: "
    "(setattr(mallinfo2, 'restype', info), mallinfo2().hblkhd)[1])("
    "type('Info', (ctypes.Structure,), {'_fields_': [(name, ctypes.c_size_t) for name in "
    "'arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost'.split()]}), "
    "ctypes.CDLL('libc.so.6').mallinfo2))(__import__('ctypes'), bytearray(8 << 20))"
)


async def test_a_worker_keeps_its_freed_buffers_in_the_heap(tmp_path) -> None:
    """Workers tune their allocator as the serving process does (``worker_process.init_worker``): a job's
    1 MiB buffers then come from the heap, not from fresh pages of the kernel each time."""
    async with open_worker_pool(Config(tmp_dir=str(tmp_path), workers=1)) as pool:
        mapped = await pool.run(eval, MAPPED_WHILE_AN_8_MIB_BUFFER_LIVES)
    assert mapped < 8 << 20
