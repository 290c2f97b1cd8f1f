"""Log lines are written by a thread of their own: a log output nobody reads never stalls the server, lines
that could not wait are dropped and counted, and what was queued is written at exit."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import subprocess
import threading
import time
import weakref
from pathlib import Path

import httpx

from server_process import clean_env, server_command
from upload_server.logs import STOP_SECONDS, LogWriter, ToWriter

#: More access lines (~110 bytes each) than a pipe holds (64 KiB): a loop that wrote them itself would block.
POLLS = 1000
DROPPED = "log lines were dropped: the log output was not read fast enough"


def test_a_log_output_nobody_reads_does_not_stall_the_server(tmp_path: Path) -> None:
    command = server_command(tmp_path, "--workers", "1")
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        assert process.stderr is not None
        port = 0
        for line in process.stderr:  # read up to the port, then not at all while polling
            if found := re.search(r"listening on http://127\.0\.0\.1:(\d+)", line):
                port = int(found.group(1))
                break
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10, verify=False) as client:
            for _ in range(POLLS):  # one keep-alive connection
                assert client.get("/api/v1/health").status_code == 200
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0
    # Every line was kept (the queue holds more than the pipe could not take) and written by the exit.
    assert rest.count("GET /api/v1/health HTTP/1.1 200") == POLLS
    assert "dropped" not in rest


def record(number: int) -> logging.LogRecord:
    line = {"name": "t", "levelno": logging.INFO, "msg": "line %05d " + "x" * 90, "args": (number,)}
    return logging.makeLogRecord(line)


def test_a_full_queue_drops_lines_counts_them_and_says_so() -> None:
    reading, writing = os.pipe()
    output = os.fdopen(writing, "w")
    writer = LogWriter(records=8)
    target = ToWriter(output, writer)
    sent = 3000  # ~300 KB: the pipe (64 KiB) fills, the thread blocks on it, the queue fills, the rest drop

    emitter = threading.Thread(target=lambda: [writer.put(target, record(n)) for n in range(sent)])
    emitter.start()
    emitter.join(10)
    assert not emitter.is_alive()  # put never waited for the blocked output
    assert writer.dropped > 0

    collected: list[bytes] = []
    reader = threading.Thread(target=lambda: collected.extend(iter(lambda: os.read(reading, 65536), b"")))
    reader.start()
    writer.stop()  # what is queued is written, and a last note for the drops since the last line
    output.close()
    reader.join(10)
    os.close(reading)
    lines = b"".join(collected).decode().splitlines()
    notes = [
        re.fullmatch(r"(\d+) log lines were dropped: the log output was not read fast enough", line)
        for line in lines
    ]
    counted = sum(int(note.group(1)) for note in notes if note)
    numbers = [int(line.split()[1]) for line in lines if line.startswith("line ")]
    assert len(numbers) + sum(1 for note in notes if note) == len(lines)  # nothing else, nothing garbled
    assert numbers == sorted(set(numbers))  # in order, none twice
    assert counted == writer.dropped  # every drop said, once
    assert len(numbers) + counted == sent  # each line either written or counted as dropped


class StuckOutput(io.StringIO):
    """An output that takes nothing until released; says when the writer is stuck in it."""

    def __init__(self) -> None:
        super().__init__()
        self.stuck = threading.Event()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.stuck.set()
        self.release.wait(30)
        return len(text)


def test_the_exit_does_not_hang_on_an_output_that_takes_nothing() -> None:
    """``stop`` (run at exit) gives up after ``STOP_SECONDS`` when the output stays blocked and the queue
    full, rather than hang the process or raise from its exit handler; and ``logging.shutdown`` (after
    it at exit) does not wait for the stuck thread either."""
    writer, output = LogWriter(records=4), StuckOutput()
    target = ToWriter(output, writer)
    writer.put(target, record(0))
    assert output.stuck.wait(10)  # the writer holds line 0 and takes no more
    for number in range(1, 10):
        writer.put(target, record(number))
    assert writer.dropped == 5  # four wait in the queue
    started = time.monotonic()
    writer.stop()
    logging.shutdown([weakref.ref(target)])
    waited = time.monotonic() - started
    output.release.set()
    assert STOP_SECONDS * 0.9 <= waited < 3 * STOP_SECONDS  # it waited for the output, then gave up
