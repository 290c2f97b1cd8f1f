"""GET|HEAD of the upload page and its few static files, from a fixed allow-list shipped in the package.

No path from the request ever reaches the filesystem: each route is bound to one named file at import
time, read once into memory (the whole page is a few tens of KiB). Every answer carries a strict
Content-Security-Policy (no inline script or style, nothing from another origin, no framing), an ETag for
cheap revalidation, and the headers a careful static server sends.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import resources

from ..http.exchange import Exchange
from ..http.messages import Headers, Response
from ..state import ServerState

#: The vendored tus client: its version is in its file names, and the same as in tests/js/package-lock.json.
TUS_JS_CLIENT = "tus-js-client-4.3.1"

#: Route path → (file name in ``upload_server/static``, Content-Type). The only files this handler serves.
STATIC_FILES: Mapping[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
    "/static/icon.svg": ("icon.svg", "image/svg+xml"),
    # tus-js-client's browser build, byte for byte the npm package's (tests/test_vendored.py), and its
    # licence (MIT asks that the notice go with every copy, and the minified file carries none).
    f"/static/vendor/{TUS_JS_CLIENT}.min.js": (
        f"vendor/{TUS_JS_CLIENT}.min.js",
        "text/javascript; charset=utf-8",
    ),
    f"/static/vendor/{TUS_JS_CLIENT}.LICENSE": (
        f"vendor/{TUS_JS_CLIENT}.LICENSE",
        "text/plain; charset=utf-8",
    ),
}

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS: Headers = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),  # frame-ancestors for browsers that predate it
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
]
# The files' names carry no version, so a browser may keep them but must ask whether they changed: with
# the ETag that question costs a 304 and no body.
CACHE_CONTROL = b"no-cache"


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str

    @classmethod
    def load(cls, name: str, content_type: str) -> StaticFile:
        body = resources.files("upload_server").joinpath("static", *name.split("/")).read_bytes()
        return cls(body=body, content_type=content_type, etag=f'"{hashlib.sha256(body).hexdigest()[:32]}"')

    def matches(self, if_none_match: str) -> bool:
        """Whether an ``If-None-Match`` header names this version (weak comparison, as RFC 9110 asks)."""
        tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
        return "*" in tags or self.etag in tags


StaticHandler = Callable[[Exchange, ServerState], Awaitable[None]]


def static_handler(file: StaticFile) -> StaticHandler:
    """The handler for one file: the same answer for GET and HEAD, 304 when the client has this version."""
    headers: Headers = [
        *SECURITY_HEADERS,
        (b"cache-control", CACHE_CONTROL),
        (b"etag", file.etag.encode()),
    ]

    async def handle_static(exchange: Exchange, state: ServerState) -> None:
        request = exchange.request
        # A 304 has no body; its Content-Length states the representation's, as RFC 9110 §8.6 allows.
        not_modified = file.matches(request.header("if-none-match"))
        response = Response(
            status=304 if not_modified else 200,
            body=file.body,
            content_type=file.content_type,
            headers=headers,
        )
        await exchange.send_response(response, head_only=not_modified or request.method == "HEAD")

    return handle_static


def static_routes() -> dict[str, dict[str, StaticHandler]]:
    """Route table entries for every allow-listed file (read now, once)."""
    routes: dict[str, dict[str, StaticHandler]] = {}
    for path, (name, content_type) in STATIC_FILES.items():
        handler = static_handler(StaticFile.load(name, content_type))
        routes[path] = {"GET": handler, "HEAD": handler}
    return routes
