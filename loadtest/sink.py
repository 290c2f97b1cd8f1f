"""A minimal raw-socket HTTP/1.1 sink: the yardstick for "how fast can Python receive an upload to disk here".

It is what a careful engineer would write to take a request body and put it in a file as fast as plain
Python allows, and nothing else: one thread per connection on blocking sockets, the body read with
``socket.recv_into`` into one preallocated buffer and written to a temporary file with ``os.write`` once
the buffer is full (1 MiB writes by default), no per-chunk ``bytes`` objects, no parsing of the content,
no hashing unless ``--sha256`` asks for it (to price the receipt's hash separately). ``Content-Length``
and chunked bodies, ``Expect: 100-continue``, keep-alive and ``Connection: close`` are honoured. Every
request, whatever its method or path, gets ``200`` with a tiny JSON document::

    {"size_bytes": 1073741824, "timing_ms": {"receive": 812.4}}

``timing_ms.receive`` runs from the end of the request head to the last byte written to the file, the same
phase ``upload-server`` reports under the same name; the file is closed and removed before the answer.

Run it on its own with ``uv run python loadtest/sink.py --port 0 --tmp-dir /tmp``; once the socket listens
it prints ``sink listening on http://127.0.0.1:PORT`` to stderr. It only ever binds a loopback address,
and stops by itself after ``--lifetime`` seconds (SIGTERM or Ctrl-C stop it sooner).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

BUFFER_BYTES = 1 << 20
MAX_HEAD_BYTES = 64 << 10
SOCKET_TIMEOUT = 60.0
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


class ProtocolError(Exception):
    """The peer sent something this sink does not take; the connection is closed without an answer."""


@dataclass(frozen=True)
class Head:
    """A parsed request head: request line and lower-cased header names."""

    method: str
    target: str
    version: str
    headers: dict[str, str]

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection


def parse_head(raw: bytes) -> Head:
    """Parse the bytes before the blank line that ends a request head."""
    try:
        text = raw.decode("latin-1")
        request_line, *lines = text.split("\r\n")
        method, target, version = request_line.split(" ")
    except ValueError as error:
        raise ProtocolError(f"malformed request line: {raw[:80]!r}") from error
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError(f"malformed header line: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return Head(method, target, version, headers)


class BodyWriter:
    """Where the body goes: a temporary file written with large ``os.write`` calls, optionally hashed."""

    def __init__(self, tmp_dir: str, *, sha256: bool) -> None:
        self.fd, self.path = tempfile.mkstemp(prefix="sink-", suffix=".part", dir=tmp_dir)
        self.size = 0
        self.hasher = hashlib.sha256() if sha256 else None

    def write(self, data: memoryview) -> None:
        if self.hasher is not None:
            self.hasher.update(data)
        self.size += len(data)
        while data:
            data = data[os.write(self.fd, data) :]

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def close_and_remove(self) -> None:
        with contextlib.suppress(OSError):
            self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class Connection:
    """One client connection: a socket and one buffer, reused for every request on it.

    ``self.start:self.end`` of the buffer holds bytes received but not yet consumed (the rest of a head,
    the first body bytes that arrived with it, or a pipelined next request).
    """

    def __init__(self, sock: socket.socket, tmp_dir: str, *, buffer_bytes: int, sha256: bool) -> None:
        self.sock = sock
        self.tmp_dir = tmp_dir
        self.sha256 = sha256
        self.buffer = bytearray(max(buffer_bytes, MAX_HEAD_BYTES))
        self.view = memoryview(self.buffer)
        self.start = 0
        self.end = 0

    # ------------------------------------------------------------------------------------ reading
    def _compact(self) -> None:
        """Move the unconsumed bytes to the front of the buffer."""
        if self.start:
            pending = self.end - self.start
            self.view[:pending] = self.view[self.start : self.end]
            self.start, self.end = 0, pending

    def _fill(self) -> int:
        """Receive more bytes after ``end``; return how many (0 at EOF)."""
        if self.end == len(self.buffer):
            self._compact()
            if self.end == len(self.buffer):
                raise ProtocolError("buffer full without progress")
        received = self.sock.recv_into(self.view[self.end :])
        self.end += received
        return received

    def read_head(self) -> Head | None:
        """The next request head; None when the client closed cleanly between requests."""
        searched = self.start
        while True:
            found = self.buffer.find(b"\r\n\r\n", max(self.start, searched - 3), self.end)
            if found >= 0:
                head = parse_head(bytes(self.view[self.start : found]))
                self.start = found + 4
                return head
            searched = self.end
            if self.end - self.start > MAX_HEAD_BYTES:
                raise ProtocolError("request head too large")
            if not self._fill():
                if self.end == self.start:
                    return None
                raise ProtocolError("connection closed inside a request head")

    def copy_exactly(self, count: int, writer: BodyWriter) -> None:
        """Move ``count`` body bytes to ``writer``: buffered bytes first, then ``recv_into`` + big writes."""
        buffered = min(count, self.end - self.start)
        if buffered:
            writer.write(self.view[self.start : self.start + buffered])
            self.start += buffered
            count -= buffered
        if not count:
            return
        # The buffer is empty now: fill it straight from the socket and write it out when full.
        self.start = self.end = 0
        view, size, filled = self.view, len(self.buffer), 0
        recv_into = self.sock.recv_into
        while count:
            received = recv_into(view[filled : filled + min(size - filled, count)])
            if not received:
                raise ProtocolError("connection closed inside a request body")
            filled += received
            count -= received
            if filled == size or not count:
                writer.write(view[:filled])
                filled = 0

    def read_line(self) -> bytes:
        """One CRLF-terminated line (without the CRLF), for chunk sizes and trailers."""
        while True:
            found = self.buffer.find(b"\r\n", self.start, self.end)
            if found >= 0:
                line = bytes(self.view[self.start : found])
                self.start = found + 2
                return line
            if self.end - self.start > MAX_HEAD_BYTES:
                raise ProtocolError("chunk-size line too long")
            if not self._fill():
                raise ProtocolError("connection closed inside a chunked body")

    def copy_chunked(self, writer: BodyWriter) -> None:
        while True:
            size_text = self.read_line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError as error:
                raise ProtocolError(f"bad chunk size {size_text[:20]!r}") from error
            if size == 0:
                while self.read_line():  # trailers, up to the blank line
                    pass
                return
            self.copy_exactly(size, writer)
            if self.read_line():
                raise ProtocolError("chunk data not followed by CRLF")

    # ---------------------------------------------------------------------------------- answering
    def answer(self, document: dict[str, object], *, keep_alive: bool) -> None:
        body = json.dumps(document, separators=(",", ":")).encode()
        connection = b"" if keep_alive else b"connection: close\r\n"
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % len(body)
        self.sock.sendall(head + connection + b"\r\n" + body)

    def serve_one(self) -> bool:
        """Answer one request; return whether the connection may carry another."""
        head = self.read_head()
        if head is None:
            return False
        if head.headers.get("expect", "").lower() == "100-continue":
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        started = time.perf_counter()
        writer = BodyWriter(self.tmp_dir, sha256=self.sha256)
        try:
            if "chunked" in head.headers.get("transfer-encoding", "").lower():
                self.copy_chunked(writer)
            else:
                self.copy_exactly(int(head.headers.get("content-length", "0")), writer)
            writer.close()
            receive_ms = (time.perf_counter() - started) * 1000
        finally:
            writer.close_and_remove()
        document: dict[str, object] = {
            "size_bytes": writer.size,
            "timing_ms": {"receive": round(receive_ms, 1)},
        }
        if writer.hasher is not None:
            document["sha256"] = writer.hasher.hexdigest()
        self.answer(document, keep_alive=head.keep_alive)
        return head.keep_alive

    def serve(self) -> None:
        try:
            while self.serve_one():
                pass
        except (ProtocolError, OSError, ValueError) as error:
            print(f"sink: connection ended: {error}", file=sys.stderr)
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()


def serve(host: str, port: int, tmp_dir: str, *, buffer_bytes: int, sha256: bool, lifetime: float) -> None:
    """Accept connections until ``lifetime`` seconds have passed; one thread per connection."""
    deadline = time.monotonic() + lifetime
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
        listener.settimeout(0.5)
        bound = listener.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        print(f"sink listening on http://{shown}:{bound}", file=sys.stderr, flush=True)
        while time.monotonic() < deadline:
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            sock.settimeout(SOCKET_TIMEOUT)
            connection = Connection(sock, tmp_dir, buffer_bytes=buffer_bytes, sha256=sha256)
            threading.Thread(target=connection.serve, daemon=True).start()
    print("sink: lifetime over, stopping", file=sys.stderr, flush=True)


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (0 picks a free one)")
    parser.add_argument("--tmp-dir", default=tempfile.gettempdir(), help="where body files go")
    parser.add_argument("--buffer", type=_size, default=BUFFER_BYTES, help="receive buffer = write size (1M)")
    parser.add_argument("--sha256", action="store_true", help="also hash the body (prices a sha256)")
    parser.add_argument("--lifetime", type=float, default=3600.0, help="stop after this many seconds (3600)")
    args = parser.parse_args(argv)
    if args.host not in LOOPBACK_HOSTS:
        parser.error("the sink binds loopback addresses only (127.0.0.1, ::1, localhost)")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        serve(
            args.host,
            args.port,
            args.tmp_dir,
            buffer_bytes=args.buffer,
            sha256=args.sha256,
            lifetime=args.lifetime,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
