"""The receive loop: body chunks from the connection, through the multipart adapter, sniffed, into the spool.

It reads the next chunk only after the previous one was handed to the spool, so the socket is read no
faster than the disk takes the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..http.connection import HttpConnection
from .multipart import MultipartFileReader
from .sniff import ContentKind, sniff
from .spool import Spool


@dataclass(frozen=True)
class Received:
    kind: ContentKind
    filename: str | None  # the multipart filename, shown as the file's name; never used as a path


async def receive_upload(conn: HttpConnection, spool: Spool, boundary: bytes | None) -> Received:
    """Stream the upload's file bytes into ``spool``; raise as soon as they cannot be an upload we take."""
    reader = MultipartFileReader(boundary) if boundary is not None else None
    prefix = bytearray()  # held only until the first bytes tell what the upload is
    kind: ContentKind | None = None
    while chunk := await conn.receive_body_chunk():
        for piece in reader.feed(chunk) if reader is not None else (chunk,):
            if kind is None:
                prefix += piece
                kind = sniff(bytes(prefix), complete=False)
                if kind is None:
                    continue
                piece, prefix = bytes(prefix), bytearray()
            await spool.write(piece)
    if reader is not None:
        reader.finish()
    if kind is None:
        kind = sniff(bytes(prefix), complete=True)  # raises for an empty or unrecognisable body
        await spool.write(bytes(prefix))
    await spool.finish()
    return Received(kind=kind, filename=reader.filename if reader is not None else None)
