"""GET|HEAD /api/v1/openapi.json: the OpenAPI 3.1 document shipped in the package (openapi.json)."""

from __future__ import annotations

from importlib import resources

from ..http.exchange import Exchange
from ..http.messages import Response
from ..state import ServerState

#: Read once: the document is part of the installed package and never changes while serving.
DOCUMENT = resources.files("upload_server").joinpath("openapi.json").read_bytes()


async def handle_openapi(exchange: Exchange, state: ServerState) -> None:
    response = Response(status=200, body=DOCUMENT, headers=[(b"cache-control", b"no-cache")])
    await exchange.send_response(response, head_only=exchange.request.method == "HEAD")
