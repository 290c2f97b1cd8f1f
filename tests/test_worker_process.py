"""Worker processes hold only the extraction code: the serving code stays in the serving process.

A contract about memory (``launch``'s docstring has the figures): every module the serving process imports
and a worker does not is memory the worker need not hold. Checked in real worker processes of the real pool.
"""

from __future__ import annotations

from upload_server.config import Config
from upload_server.ingest.dispatch import open_worker_pool

SERVING_ONLY = ("trio", "h11", "upload_server.server", "upload_server.http.connection", "prometheus_client")


async def test_a_worker_imports_none_of_the_serving_code(tmp_path) -> None:
    async with open_worker_pool(Config(tmp_dir=str(tmp_path), workers=1)) as pool:
        # eval is pickled by reference, so the worker imports nothing of this test module to run it.
        loaded = await pool.run(eval, f"[m for m in {SERVING_ONLY!r} if m in __import__('sys').modules]")
        extraction = await pool.run(eval, "'upload_server.ingest.extract' in __import__('sys').modules")
    assert loaded == []
    assert extraction  # preloaded in the forkserver, so a new worker is ready at once
