"""(method, path) → handler. Unknown paths and wrong methods are answered here, in one place."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from .errors import MethodNotAllowed, NotFound
from .handlers.health import handle_health
from .handlers.upload import handle_upload
from .http.exchange import Exchange
from .state import ServerState

RouteHandler = Callable[[Exchange, ServerState], Awaitable[None]]

ROUTES: Mapping[str, Mapping[str, RouteHandler]] = {
    "/api/v1/upload": {"POST": handle_upload},
    "/api/v1/health": {"GET": handle_health, "HEAD": handle_health},
}


def resolve(method: str, path: str) -> RouteHandler:
    methods = ROUTES.get(path.rstrip("/") or "/")
    if methods is None:
        raise NotFound(f"There is nothing at {path}.", detail={"path": path, "paths": sorted(ROUTES)})
    handler = methods.get(method)
    if handler is None:
        allowed = ", ".join(sorted(methods))
        raise MethodNotAllowed(
            f"{path} does not answer {method}; it answers {allowed}.",
            detail={"method": method, "allow": sorted(methods)},
            headers=[(b"allow", allowed.encode())],
        )
    return handler


def router(state: ServerState) -> Callable[[Exchange], Awaitable[None]]:
    """The function a connection calls for each request."""

    async def route(exchange: Exchange) -> None:
        request = exchange.request
        await resolve(request.method, request.path)(exchange, state)

    return route
