"""The request id: the client's ``X-Request-ID`` when it is a sane token, else a fresh one.

A client's id ends up in our answer's headers and in log lines, so only a short token of safe characters is
taken as it is: no spaces, quotes, control characters or separators that could forge a log field or a
header. Anything else is replaced, not cleaned, so an id never half-matches the client's.
"""

from __future__ import annotations

import re
import secrets

MAX_LENGTH = 128
_SANE = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_LENGTH}}}")


def new_request_id() -> str:
    return secrets.token_hex(16)


def request_id(offered: str | None) -> str:
    """``offered`` (the request's X-Request-ID, or None) when sane, else a new id."""
    if offered is not None and _SANE.fullmatch(offered):
        return offered
    return new_request_id()
