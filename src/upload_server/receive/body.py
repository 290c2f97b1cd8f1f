"""The receive loop: body chunks from the connection, through the multipart adapter, sniffed, into the spool.

It reads the next chunk only after the previous one was handed to the spool, so the socket is read no
faster than the disk takes the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..errors import PayloadTooLarge
from .multipart import MultipartFileReader
from .sniff import ContentKind, Sniffer
from .spool import Spool


class BodySource(Protocol):
    """Where the body comes from: an ``Exchange``, or anything that hands over pieces until b""."""

    async def receive_body_chunk(self) -> bytes | bytearray: ...


@dataclass(frozen=True)
class Received:
    kind: ContentKind
    filename: str | None  # the multipart filename, shown as the file's name; never used as a path


async def receive_upload(body: BodySource, spool: Spool, boundary: bytes | None) -> Received:
    """Stream the upload's file bytes into ``spool``; raise as soon as they cannot be an upload we take."""
    reader = MultipartFileReader(boundary) if boundary is not None else None
    sniffer: Sniffer | None = Sniffer()  # holds the first bytes only until they tell what the upload is
    kind: ContentKind | None = None
    body_bytes = 0
    while chunk := await body.receive_body_chunk():
        # The whole body is capped, as a declared Content-Length is: the spool caps only the file
        # bytes, and a multipart epilogue (which the parser drops) would otherwise be read for ever.
        body_bytes += len(chunk)
        if body_bytes > spool.max_bytes:
            raise PayloadTooLarge(
                f"The upload is larger than this server accepts ({spool.max_bytes} bytes).",
                detail={"max_upload_bytes": spool.max_bytes},
            )
        for piece in reader.feed(chunk) if reader is not None else (chunk,):
            if sniffer is not None:
                kind = sniffer.feed(piece)
                if kind is None:
                    continue
                piece, sniffer = sniffer.prefix, None
            await spool.write(piece)
    if reader is not None:
        reader.finish()
    if sniffer is not None:
        kind = sniffer.finish()  # raises for an empty or unrecognisable body
        await spool.write(sniffer.prefix)
    assert kind is not None
    await spool.finish()
    return Received(kind=kind, filename=reader.filename if reader is not None else None)
