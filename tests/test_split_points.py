"""Properties of the receive path: where the bytes are cut never changes the upload.

A real HttpConnection over a memory stream, with a route that runs the real receive loop (h11's chunked
decoding, the body gathering, the multipart adapter, the sniffer) into a real spool file. The client cuts
the wire at arbitrary points and waits for the server to take each piece, so every cut is a separate read.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import tempfile

import orjson
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import examples
from upload_server.http.connection import HttpConnection
from upload_server.http.exchange import Exchange
from upload_server.http.limits import ConnectionLimits
from upload_server.http.messages import Response
from upload_server.receive.body import receive_upload
from upload_server.receive.multipart import multipart_boundary
from upload_server.receive.spool import open_spool

FILE = b"\xef\xbb\xbf" + orjson.dumps(
    [{"id": str(n), "type": "PushEvent", "actor": {"id": n, "login": f"u{n}"}} for n in range(40)]
)
BOUNDARY = "split-points-boundary"
MULTIPART = (
    (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="events.json"\r\n'
        "Content-Type: application/json\r\n\r\n"
    ).encode()
    + FILE
    + (
        f'\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name="after"\r\n\r\nbye\r\n--{BOUNDARY}--\r\n'
    ).encode()
)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` in pieces, cut at ``points`` (positions inside it; duplicates and order do not matter)."""
    edges = [0, *sorted({p for p in points if 0 < p < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


async def _receive(request_head: bytes, body: bytes, wire_cuts: list[int]) -> dict[str, object]:
    """Serve one request whose bytes arrive in the pieces ``wire_cuts`` makes; what the spool got."""
    server_end, client_end = trio.testing.memory_stream_pair()
    conn = HttpConnection(server_end, ConnectionLimits(body_idle_timeout=60))
    got: dict[str, object] = {}

    async def route(exchange: Exchange) -> None:
        content_type = exchange.request.header("content-type")
        boundary = multipart_boundary(content_type) if content_type.startswith("multipart/") else None
        with tempfile.TemporaryDirectory() as tmp:
            async with open_spool(tmp, 1 << 20) as spool:
                received = await receive_upload(exchange, spool, boundary)
                got.update(
                    kind=received.kind.value,
                    filename=received.filename,
                    sha256=spool.sha256,
                    data=await trio.Path(spool.path).read_bytes(),
                )
        await exchange.send_response(Response(status=200, body=b"{}"))

    async def client() -> None:
        for piece in cut(request_head + body, wire_cuts):
            await client_end.send_all(piece)
            await trio.testing.wait_all_tasks_blocked()  # the server has taken this piece on its own
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await client_end.send_eof()
        while await client_end.receive_some():
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.serve, route)
        await client()
    return got


def _head(content_type: str, framing: str) -> bytes:
    return f"POST /u HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n".encode()


positions = st.lists(st.integers(1, len(MULTIPART) + 200), max_size=30)


@settings(max_examples=examples(60))
@given(chunk_cuts=positions, wire_cuts=positions)
def test_chunk_boundaries_and_read_boundaries_do_not_change_the_upload(
    chunk_cuts: list[int], wire_cuts: list[int]
) -> None:
    """A raw upload in chunked encoding: wherever the chunks begin and the reads end, the spool holds the
    same bytes (the BOM and the first bytes the sniffer needs may be cut anywhere too)."""
    body = chunked(cut(FILE, chunk_cuts))
    got = trio.run(_receive, _head("application/json", "Transfer-Encoding: chunked"), body, wire_cuts)
    assert got["data"] == FILE
    assert got["sha256"] == hashlib.sha256(FILE).hexdigest()
    assert got["kind"] == "json"


@settings(max_examples=examples(60))
@given(chunk_cuts=positions, wire_cuts=positions, use_chunked=st.booleans())
def test_multipart_split_points_do_not_change_the_file(
    chunk_cuts: list[int], wire_cuts: list[int], use_chunked: bool
) -> None:
    """A multipart form cut anywhere (inside a boundary, a part's headers, the file), sent with a length or
    chunked: the file part comes out whole, named, and nothing of the other parts gets into it."""
    if use_chunked:
        body, framing = chunked(cut(MULTIPART, chunk_cuts)), "Transfer-Encoding: chunked"
    else:
        body, framing = MULTIPART, f"Content-Length: {len(MULTIPART)}"
    head = _head(f"multipart/form-data; boundary={BOUNDARY}", framing)
    got = trio.run(_receive, head, body, wire_cuts)
    assert got["data"] == FILE
    assert got["sha256"] == hashlib.sha256(FILE).hexdigest()
    assert got["filename"] == "events.json"
