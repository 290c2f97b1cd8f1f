"""Logging set-up: text lines for people, or JSON lines (``--access-log-format json``) for log shippers.

Only the access log changes format; the other lines (start, stop, warnings) stay text. An access-log record
carries the request's ``Finished`` in ``record.access`` (see ``http.connection``), so the text line and the
JSON line are made from the same values. No log line carries upload content: the access log names the
request (method, target, version), its sizes and its outcome, never a body byte.

Lines are formatted and written by a thread of their own (``LogWriter``), never on the event loop: a write
to stderr blocks once the pipe is full, and whoever reads it (a terminal, journald, a benchmark's harness)
may fall behind. Profiled in the mixed 16-user benchmark on a busy machine: 86 of the loop's ~430 busy
samples were in the access log's ``stream.write``. Records wait in a bounded queue; when it is full they
are dropped and counted, and the next line written says how many, as HAProxy counts its dropped logs.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

from .config import Config
from .http.messages import Finished

ACCESS_LOGGER = "upload_server.access"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonAccessFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, then the request's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        access = getattr(record, "access", None)
        if isinstance(access, Finished):
            line.update(access.log_fields())
        else:
            line["message"] = record.getMessage()
        return orjson.dumps(line, default=str).decode()


#: Records waiting for the writing thread, at most (~1 KiB each): a log output that nobody reads costs a
#: few MiB before lines are dropped, never a blocked event loop.
QUEUE_RECORDS = 4096
#: How long the exit waits for the writing thread to write what is queued.
STOP_SECONDS = 2.0
#: How long the writing thread rests after writing what was queued; lines that come meanwhile wait for its
#: next round. Woken for each line (every request's access line, each health poll's too), it took the GIL
#: from the event loop once a request: in a py-spy ``--gil`` profile of back-to-back files400.zip uploads,
#: the thread held the GIL 0.44 ms an upload (waking it, ``Condition.notify``, 0.1 ms more on the loop),
#: where formatting and writing a line takes ~3 us. Health, ``bench_ab.py --health-polls 5000``, twice:
#: 748 and 646 against 838 and 708 us of CPU a poll, p99 1.38 and 1.09 against 1.45 and 1.14 ms. Like
#: nginx's buffered access log, at a delay no reader of a log notices.
REST_SECONDS = 0.02


class ToWriter(logging.Handler):
    """A handler that hands each record, unformatted, to ``writer``'s thread, which formats it with this
    handler's formatter and writes it to ``stream``.

    The thread writes outside the handler's lock: ``logging.shutdown`` (at exit) takes every handler's
    lock, and would wait forever for a thread stuck in a write to an output that takes nothing."""

    def __init__(self, stream: TextIO, writer: LogWriter) -> None:
        super().__init__()
        self.stream, self.writer = stream, writer

    def emit(self, record: logging.LogRecord) -> None:
        self.writer.put(self, record)

    def write_out(self, record: logging.LogRecord) -> None:
        """In the writing thread (or at exit, once it stopped)."""
        try:
            self.stream.write(self.format(record) + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(record)


_Item = tuple[ToWriter, logging.LogRecord] | None


class LogWriter:
    """One thread that formats and writes every record handed to it, in order."""

    def __init__(self, records: int = QUEUE_RECORDS) -> None:
        self._queue: queue.Queue[_Item] = queue.Queue(records)
        self.dropped = 0  # counted by the emitting threads, reported by the writer
        self._reported = 0
        self._counting = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="log writer", daemon=True)
        self._thread.start()

    def put(self, target: ToWriter, record: logging.LogRecord) -> None:
        if not self._thread.is_alive():  # stopped (the interpreter is exiting): write it here
            target.write_out(record)
            return
        try:
            self._queue.put_nowait((target, record))
        except queue.Full:
            with self._counting:
                self.dropped += 1

    def stop(self) -> None:
        """Write what is queued (waiting at most ``STOP_SECONDS``), then end the thread. An output that
        still takes nothing keeps its lines: the process exits without them rather than hang."""
        if self._thread.is_alive():
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=STOP_SECONDS)
                self._thread.join(STOP_SECONDS)

    def _run(self) -> None:
        """Each record in turn, after a note of the lines dropped since the last one (and at the end);
        after each round of what was queued, a rest of ``REST_SECONDS``."""
        target: ToWriter | None = None
        while (item := self._queue.get()) is not None:
            target, record = item
            self._report_dropped(target)
            target.write_out(record)
            if self._queue.empty():
                time.sleep(REST_SECONDS)
        if target is not None:
            self._report_dropped(target)

    def _report_dropped(self, target: ToWriter) -> None:
        if self.dropped == self._reported:
            return
        dropped, self._reported = self.dropped - self._reported, self.dropped
        note = logging.makeLogRecord(
            {
                "name": __name__,
                "levelno": logging.WARNING,
                "levelname": "WARNING",
                "msg": "%d log lines were dropped: the log output was not read fast enough",
                "args": (dropped,),
            }
        )
        target.write_out(note)


_writer: LogWriter | None = None


def log_writer() -> LogWriter:
    """This process's writing thread, started on first use and stopped (queue written) at exit."""
    global _writer
    if _writer is None:
        _writer = LogWriter()
        atexit.register(_writer.stop)
    return _writer


def configure_logging(config: Config) -> None:
    # With several serving processes, each text line says which one wrote it.
    pid = "[%(process)d]" if config.processes > 1 else ""
    root = logging.getLogger()
    if not root.handlers:  # as logging.basicConfig: a process that has its own handlers keeps them
        text = ToWriter(sys.stderr, log_writer())
        text.setFormatter(logging.Formatter(TEXT_FORMAT.replace("%(name)s:", f"%(name)s{pid}:")))
        root.addHandler(text)
    root.setLevel(getattr(logging, config.log_level.upper()))
    logging.getLogger("upload_server.lifecycle").setLevel(logging.INFO)
    access = logging.getLogger(ACCESS_LOGGER)
    if config.access_log_format == "json":
        handler = ToWriter(sys.stderr, log_writer())
        handler.setFormatter(JsonAccessFormatter())
        access.addHandler(handler)
        access.propagate = False  # not a second, text copy through the root logger
