"""What the benchmarks share, one module per concern; this package re-exports their public names.

Imported by ``bench_upload.py``, ``bench_ingest.py``, ``bench_compare.py`` and ``run_locust.py`` (they run
as scripts from ``loadtest/``, so ``import harness`` finds this package). Everything talks to 127.0.0.1 only
and every wait has a deadline.

* ``servers``: :func:`server_command` builds the command line of upload-server (``ours``), the FastAPI
  reference peer (``reference``) or the raw-socket sink (``sink``); :func:`start_server` starts it in its
  own process group, waits for its ``listening on http://127.0.0.1:PORT`` line and keeps draining its
  stderr; :func:`stop_server` sends SIGTERM (SIGKILL to the group after a grace period).
  :func:`running_server` does both around a ``with`` block.
* ``sampling``: :class:`Sampler` samples ``VmRSS`` of a process and of all its descendants (workers, a
  forkserver) from /proc in a background thread, and the CPU seconds of its threads and of its workers;
  :func:`py_spy` records a profile.
* ``datasets``: :func:`ensure_dataset` makes a named GitHub-Archive-like dataset with ``gen_dataset.py``
  once and caches it, with its ``<file>.expected.json``, under ``loadtest/data/`` (git-ignored). The
  ``gib`` dataset (1 GiB of NDJSON) is built by repeating one generated chunk with distinct event ids.
* ``client``: :func:`upload` POSTs a file over a raw socket (head with ``sendall``, file with zero-copy
  ``sendfile``), so the client spends almost no CPU; :func:`verify_answer` checks an answer against the
  dataset's expected counts; :class:`UploadRun` times uploads and reports them.
* ``probes``: client processes, run as ``python -m harness poll-health ...`` (one keep-alive connection
  polling ``/api/v1/health`` at an interval) and ``python -m harness swarm ...`` (many concurrent
  keep-alive connections polling health, asyncio), from ``loadtest/``: they print one JSON summary on
  stdout, so the measuring client never shares a process (or a GIL) with the uploads.
  ``python -m harness dataset NAME`` makes a dataset ahead.
* ``common``: paths, sizes, statistics, the machine's state, and the run guards (``--max-seconds``).
"""

from __future__ import annotations

from .client import (
    Exchange,
    UploadRun,
    WrongAnswer,
    body_framing,
    get,
    read_response,
    reproduction,
    timed_upload,
    upload,
    verify_answer,
)
from .common import (
    CLK_TCK,
    DATA_DIR,
    GIB,
    HEALTH_PATH,
    HERE,
    HOST,
    LISTENING,
    MB,
    MIB,
    PAGE_CACHE_CHUNK,
    ROOT,
    START_TIMEOUT,
    STOP_TIMEOUT,
    UPLOAD_PATH,
    BenchTimeout,
    human_bytes,
    install_run_guards,
    load_average,
    median,
    mem_available_bytes,
    parse_list,
    parse_size,
    percentile,
    warm_page_cache,
)
from .datasets import (
    CONTENT_TYPES,
    DATASETS,
    Dataset,
    DatasetSpec,
    build_repeated_ndjson,
    ensure_dataset,
)
from .probes import (
    HEALTH_REQUEST,
    client_process,
    describe_latency,
    finish_client_process,
    latency_summary,
    main,
    poll_health,
    raise_fd_limit,
    start_client_process,
    swarm,
)
from .sampling import (
    Sample,
    Sampler,
    descendants,
    machine_busy_seconds,
    minor_faults,
    print_profile,
    process_cpu_seconds,
    py_spy,
    py_spy_command,
    run_queue_wait_seconds,
    status_kib,
    thread_cpu_seconds,
    time_on_cpu_seconds,
    times_scheduled,
    top_frames,
)
from .servers import (
    Server,
    free_port,
    running_server,
    server_command,
    start_server,
    stop_server,
)

__all__ = [
    "CLK_TCK",
    "CONTENT_TYPES",
    "DATASETS",
    "DATA_DIR",
    "GIB",
    "HEALTH_PATH",
    "HEALTH_REQUEST",
    "HERE",
    "HOST",
    "LISTENING",
    "MB",
    "MIB",
    "PAGE_CACHE_CHUNK",
    "ROOT",
    "START_TIMEOUT",
    "STOP_TIMEOUT",
    "UPLOAD_PATH",
    "BenchTimeout",
    "Dataset",
    "DatasetSpec",
    "Exchange",
    "Sample",
    "Sampler",
    "Server",
    "UploadRun",
    "WrongAnswer",
    "body_framing",
    "build_repeated_ndjson",
    "client_process",
    "descendants",
    "describe_latency",
    "ensure_dataset",
    "finish_client_process",
    "free_port",
    "get",
    "human_bytes",
    "install_run_guards",
    "latency_summary",
    "load_average",
    "machine_busy_seconds",
    "main",
    "median",
    "mem_available_bytes",
    "minor_faults",
    "parse_list",
    "parse_size",
    "percentile",
    "poll_health",
    "print_profile",
    "process_cpu_seconds",
    "py_spy",
    "py_spy_command",
    "raise_fd_limit",
    "read_response",
    "reproduction",
    "run_queue_wait_seconds",
    "running_server",
    "server_command",
    "start_client_process",
    "start_server",
    "status_kib",
    "stop_server",
    "swarm",
    "thread_cpu_seconds",
    "time_on_cpu_seconds",
    "timed_upload",
    "times_scheduled",
    "top_frames",
    "upload",
    "verify_answer",
    "warm_page_cache",
]
