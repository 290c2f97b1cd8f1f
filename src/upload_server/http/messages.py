"""Request and response value types, independent of h11 and of the socket."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import h11

from ..errors import UploadServerError

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", " as RFC 9110 allows
    http_version: str

    @classmethod
    def from_h11(cls, event: h11.Request) -> Request:
        target = event.target.decode("ascii", "replace")
        split = urlsplit(target)
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("ascii").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        return cls(
            method=event.method.decode("ascii"),
            target=target,
            path=split.path or "/",
            query=dict(parse_qsl(split.query, keep_blank_values=True)),
            headers=headers,
            http_version=event.http_version.decode("ascii"),
        )

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default)

    @property
    def content_length(self) -> int | None:
        """The declared body size; h11 has already rejected a malformed value."""
        value = self.headers.get("content-length")
        return int(value) if value is not None else None

    def query_flag(self, name: str, default: bool) -> bool:
        """A boolean query parameter (``?strict=true``); anything but true/1/yes is false."""
        value = self.query.get(name)
        if value is None:
            return default
        return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass
class Response:
    """A fixed (not streamed) response."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: Headers = field(default_factory=list)


@dataclass(frozen=True)
class Finished:
    """One request as it ended: what the access log writes and the metrics count."""

    request: Request | None  # None when no head was parsed (a head that timed out or was too large)
    status: int  # 0 when nothing was answered (the client left first)
    seconds: float
    bytes_in: int
    bytes_out: int
    request_id: str
    error: UploadServerError | None = None
    note: str = ""

    def log_fields(self) -> dict[str, Any]:
        """The access log's fields (the JSON line's keys). Names the request, never its body."""
        request = self.request
        fields: dict[str, Any] = {
            "request_id": self.request_id,
            "method": request.method if request else None,
            "target": request.target if request else None,
            "http_version": request.http_version if request else None,
            "status": self.status,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "duration_ms": round(self.seconds * 1000, 1),
        }
        if self.error is not None:
            fields["error"] = self.error.code
        if self.note:
            fields["note"] = self.note
        return fields
