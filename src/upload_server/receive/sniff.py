"""What an upload is, told from its first bytes alone (names and declared types are never trusted)."""

from __future__ import annotations

import re
from enum import StrEnum

from ..errors import BadRequest, UnsupportedMediaType

ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")  # local file header, empty archive, spanned
# A ZIP behind a self-extractor stub (zipfile and unzip read one) is refused: its first bytes are a
# program's, and reading it would mean spooling every unrecognised body whole before deciding, and taking
# polyglot files. The README says so, and how to strip a stub (zip -J).
GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"
JSON_WHITESPACE = b" \t\r\n"
#: JSON text must show its first ``{`` or ``[`` within this many bytes; a body of nothing but
#: whitespace is refused here instead of being spooled to its end.
SNIFF_WINDOW = 64 * 1024
_NOT_WHITESPACE = re.compile(rb"[^ \t\r\n]")


class ContentKind(StrEnum):
    ZIP = "zip"
    GZIP = "gzip"
    JSON = "json"


class Sniffer:
    """Classify an upload from pieces of its start, looking at each byte once.

    ``feed`` returns the kind as soon as the bytes tell it, None while more are needed; it raises
    UnsupportedMediaType as soon as the bytes rule out every kind. ``prefix`` holds what was fed until then
    (bounded by ``SNIFF_WINDOW`` and one piece). However small the pieces, the work is linear in the bytes:
    the magic numbers and the BOM are judged once, and whitespace is skipped from where the last piece left
    off rather than from the start.
    """

    def __init__(self) -> None:
        self.prefix = bytearray()
        self._text_from: int | None = None  # where JSON text starts (after a BOM), once magics are ruled out
        self._skipped = 0  # the prefix is whitespace up to here

    def feed(self, piece: bytes | bytearray) -> ContentKind | None:
        self.prefix += piece
        return self._decide(complete=False)

    def finish(self) -> ContentKind:
        """The body ended: decide now (raises for an empty or unrecognisable body)."""
        kind = self._decide(complete=True)
        assert kind is not None  # _decide(complete=True) decides or raises
        return kind

    def _decide(self, *, complete: bool) -> ContentKind | None:
        prefix = self.prefix
        if not prefix and complete:
            raise BadRequest("The upload is empty.", code="EMPTY_UPLOAD")
        if self._text_from is None:
            for magic in (*ZIP_MAGICS, GZIP_MAGIC):
                if prefix.startswith(magic):
                    return ContentKind.GZIP if magic == GZIP_MAGIC else ContentKind.ZIP
                if magic.startswith(prefix) and not complete:
                    return None  # a short prefix of a magic number: wait for more
            if len(prefix) < len(UTF8_BOM) and UTF8_BOM.startswith(prefix) and not complete:
                return None  # a BOM split across pieces
            self._text_from = self._skipped = len(UTF8_BOM) if prefix.startswith(UTF8_BOM) else 0
        found = _NOT_WHITESPACE.search(prefix, self._skipped)
        if found is not None:
            if prefix[found.start()] in b"{[":
                return ContentKind.JSON
            raise _unsupported(prefix)
        self._skipped = len(prefix)
        if complete or len(prefix) >= SNIFF_WINDOW:
            raise _unsupported(prefix)
        return None


def sniff(prefix: bytes | bytearray, *, complete: bool) -> ContentKind | None:
    """Classify the start of an upload.

    ``prefix`` is everything received so far; ``complete`` says the body ended there. Returns None when
    more bytes are needed to decide. Raises UnsupportedMediaType as soon as the bytes rule out every kind.
    """
    sniffer = Sniffer()
    sniffer.prefix += prefix
    return sniffer._decide(complete=complete)


def _unsupported(prefix: bytes | bytearray) -> UnsupportedMediaType:
    return UnsupportedMediaType(
        "The upload is not a ZIP archive, a gzip file or JSON text.",
        detail={
            "first_bytes_hex": bytes(prefix[:16]).hex(),
            "accepted": [kind.value for kind in ContentKind],
        },
    )
