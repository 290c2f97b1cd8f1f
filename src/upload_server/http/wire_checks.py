"""Checks on the raw bytes h11 holds but has not parsed yet: two things h11 accepts or waits on that a
server facing anyone must refuse at once. Pure: bytes in, an error (or None) out.

* **obs-fold.** A header line that starts with a space or a tab continues the previous one (RFC 9112
  §5.2 lets a server refuse it; nginx answers 400). h11 unfolds it silently, even within
  ``Transfer-Encoding``; a proxy in front may read the same head differently, which is how requests are
  smuggled. h11 never shows the raw head, so it is looked at in h11's buffer (``trailing_data``)
  before h11 parses it.
* **An endless chunk-size line.** h11 takes at most 20 hex digits, but only judges a size line once its
  CRLF has come; a client that keeps sending digits held the connection until the 30 s body timeout.
  While h11 waits in the middle of a chunked body, what it holds unparsed is the start of a size line
  (chunk data is handed out as it arrives, so none is left waiting), or of the trailer section.
"""

from __future__ import annotations

import re

from ..errors import BadRequest, PayloadTooLarge, UploadServerError

__all__ = ["MAX_CHUNK_SIZE_DIGITS", "chunk_line_error", "folded_head_error"]

#: h11's own limit for the digits of a chunk size (``chunk_size`` in h11/_abnf.py): a longer line is
#: refused by h11 once it ends, so it can be refused as soon as the 21st digit arrives.
MAX_CHUNK_SIZE_DIGITS = 20
#: Significant digits of a size no upload can reach: 16 hex digits are 2**64 bytes.
MAX_SIGNIFICANT_DIGITS = 16
_HEX_RUN = re.compile(rb"[0-9A-Fa-f]*")
_FOLD = re.compile(rb"\n[ \t]")
_HEAD_END = re.compile(rb"\r?\n\r?\n")


def folded_head_error(pending: bytes) -> BadRequest | None:
    """A 400 when the request head at the start of ``pending`` (h11's unparsed bytes between requests)
    has a line that starts with a space or a tab, whether or not the rest of the head has arrived."""
    end = _HEAD_END.search(pending)
    head = pending if end is None else pending[: end.start() + 1]
    fold = _FOLD.search(head)
    if fold is None:
        return None
    line = head.count(b"\n", 0, fold.start()) + 2  # the folded line's number, the request line being 1
    return BadRequest(
        "A header line starts with a space or a tab (obs-fold, a continuation of the line before): "
        "it is refused, as nginx does, because servers in a chain may read such a head differently.",
        detail={"reason": "obs_fold", "line": line},
    )


def chunk_line_error(pending: bytes) -> UploadServerError | None:
    """An answer for a chunk-size line that can never be valid, judged before its end has arrived:
    400 past h11's 20 digits, 413 for a size of 2**64 bytes or more. ``pending`` is what h11 holds
    unparsed while it waits for more of a chunked body."""
    if b"\n" in pending:  # complete lines waiting: the trailer section, which h11 bounds itself
        return None
    digits = _HEX_RUN.match(pending).end()  # type: ignore[union-attr]
    if pending[digits : digits + 1] == b":":  # a trailer field whose name happens to be hex digits
        return None
    significant = len(pending[:digits].lstrip(b"0"))
    if significant > MAX_SIGNIFICANT_DIGITS:
        return PayloadTooLarge(
            f"A chunk size has {significant} hex digits: a chunk of 2**64 bytes or more.",
            detail={"reason": "chunk_size", "hex_digits": significant},
        )
    if digits > MAX_CHUNK_SIZE_DIGITS:
        return BadRequest(
            f"A chunk-size line has more than {MAX_CHUNK_SIZE_DIGITS} hex digits.",
            detail={"reason": "chunk_size", "hex_digits": digits},
        )
    return None
