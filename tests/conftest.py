"""Fixtures: the real server, in this process on an ephemeral port, with a temp dir of its own; and servers
started from the command line as subprocesses (``spawn``, see server_process.py)."""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import settings

from browser import CHROMIUM, BrowserThread
from server_process import Spawn, kill_all, spawner
from upload_server.config import Config
from upload_server.ingest import dispatch
from upload_server.ingest.inflate import Inflater, available
from upload_server.server import serve
from upload_server.state import ServerState

# Bytecode caches on, even where PYTHONDONTWRITEBYTECODE is set (as on this machine): this process's later
# imports, the xdist workers (started after this file is read) and every interpreter a test starts (servers,
# their workers, locust, the rolling-restart script) keep and reuse compiled modules, and pytest keeps its
# rewritten test and plugin modules. Without caches each of them compiled everything it imported again:
# collecting the suite took 8 s of CPU instead of 3 s in each xdist worker (loadtest/suite_cpu.py).
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

# Every new worker process re-runs the parent's main script, which here is pytest's: with pytest preloaded
# in the forkserver that costs nothing, otherwise each worker of each test server imports pytest again
# (~0.2 s of CPU per worker).
dispatch.FORKSERVER_PRELOAD.append("pytest")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Everything imported and collected so far (pytest, hypothesis, schemathesis, Playwright, every test
    module and item: ~170,000 objects) lives as long as the test process: out of the collector's sight.
    Every full collection walked all of it, ~0.1 s of CPU each, and the servers in this process collect
    after each killed worker (``WorkerPool.run``): test_ingest_server, test_uploads and test_tus spent 1.84 s
    of CPU in 20 full collections, 0.39 s in 23 with these objects frozen. What a test creates is collected
    as before."""
    gc.collect()
    gc.freeze()


#: Hypothesis: the suite (and CI) runs derandomized, so a run is reproducible and a failure shows up again on
#: the next run; ``HYPOTHESIS_PROFILE=thorough uv run pytest -m hypothesis`` runs every property with
#: THOROUGH_FACTOR times the examples, randomized (new examples each run; a failure prints its blob).
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
THOROUGH_FACTOR = 20
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("thorough", derandomize=False, deadline=None, print_blob=True)
settings.load_profile(HYPOTHESIS_PROFILE)


def examples(count: int) -> int:
    """A property's number of examples: ``count`` in the suite, THOROUGH_FACTOR times more when thorough."""
    return count * THOROUGH_FACTOR if HYPOTHESIS_PROFILE == "thorough" else count


#: What tests marked ``loadtest`` (the locust smoke runs, the reference peer) need from the loadtest group.
LOADTEST_MODULES = ("locust", "fastapi", "uvicorn", "psutil")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A loadtest test without its dependency group fails with the command that installs it: a skip would
    let a run that never exercised them look green."""
    if item.get_closest_marker("loadtest") is None:
        return
    missing = [name for name in LOADTEST_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not installed: this test needs the loadtest dependency group. "
            "Run `uv run --group loadtest pytest` (or leave these tests out with `-m 'not loadtest'`).",
            pytrace=False,
        )


@dataclasses.dataclass
class RunningServer:
    state: ServerState
    tmp_dir: Path

    @property
    def port(self) -> int:
        return self.state.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.state.port}"

    def leftover_files(self) -> list[str]:
        """Files the server left in its temp dir (there must be none once an upload is answered)."""
        return sorted(path.name for path in self.tmp_dir.iterdir())


StartServer = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
def thread_hops(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The functions run through ``trio.to_thread.run_sync`` from now on (they still run)."""
    hops: list[object] = []
    run_sync = trio.to_thread.run_sync

    async def counted(function: object, *args: object, **kwargs: object) -> object:
        hops.append(function)
        return await run_sync(function, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    return hops


@pytest.fixture(params=list(Inflater), ids=str)
def inflater(request: pytest.FixtureRequest) -> str:
    """Each deflate backend in turn, named as ``--inflater`` names it. zlib-ng is a locked dependency:
    without it the zlib-ng cases fail (``uv sync --locked``), they are never skipped."""
    name = Inflater(request.param)
    assert name in available(), f"{name} is not installed: run uv sync --locked"
    return str(name)


@pytest.fixture
def server_tmp(tmp_path: Path) -> Path:
    path = tmp_path / "spool"
    path.mkdir()
    return path


@pytest.fixture
async def start_server(nursery: trio.Nursery, server_tmp: Path) -> StartServer:
    """Start a server with settings overridden as keyword arguments; it stops when the test ends."""

    async def start(**overrides: Any) -> RunningServer:
        settings: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "tmp_dir": str(server_tmp), "workers": 2}
        settings.update(overrides)
        state = await nursery.start(serve, Config(**settings))
        return RunningServer(state=state, tmp_dir=Path(settings["tmp_dir"]))

    return start


@pytest.fixture
async def server(start_server: StartServer) -> RunningServer:
    return await start_server()


async def wait_until(condition: Callable[[], bool], within: float = 30.0) -> None:
    """Wait for a condition on server counters (they offer no event to wait on); fail after ``within``."""
    with trio.fail_after(within):
        while not condition():  # noqa: ASYNC110 (observing another component's counters from outside)
            await trio.sleep(0.01)


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start ``command`` and wait for its listening line; every process is killed at the end of the test."""
    started: list[subprocess.Popen[str]] = []
    yield spawner(started)
    kill_all(started)


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    path = tmp_path / "spool"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def chromium() -> Iterator[BrowserThread]:
    """The page tests' headless Chromium: one per test process, on a thread of its own (tests/browser.py)."""
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: apt-get install chromium-headless-shell (.ci/run does)"
    browser = BrowserThread()
    yield browser
    browser.close()
