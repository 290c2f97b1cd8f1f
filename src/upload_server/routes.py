"""(method, path) → handler. Unknown paths and wrong methods are answered here, in one place."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from .errors import MethodNotAllowed, NotFound
from .handlers import tus
from .handlers.health import handle_health
from .handlers.metrics import handle_metrics
from .handlers.openapi import handle_openapi
from .handlers.static import static_routes
from .handlers.upload import handle_upload
from .http.exchange import Exchange
from .http.messages import Request
from .state import ServerState

RouteHandler = Callable[[Exchange, ServerState], Awaitable[None]]

ROUTES: Mapping[str, Mapping[str, RouteHandler]] = {
    "/api/v1/upload": {"POST": handle_upload},
    "/api/v1/health": {"GET": handle_health, "HEAD": handle_health},
    "/api/v1/files": {"POST": tus.handle_create, "OPTIONS": tus.handle_options},
    "/api/v1/openapi.json": {"GET": handle_openapi, "HEAD": handle_openapi},
    "/metrics": {"GET": handle_metrics, "HEAD": handle_metrics},
    **static_routes(),  # "/" (the upload page) and its script, style and icon
}
#: Paths with an upload id in them: (the path with the id as ``{id}``, its handlers).
ID_ROUTES: Mapping[str, Mapping[str, RouteHandler]] = {
    "/api/v1/files/{id}": {
        "HEAD": tus.handle_head,
        "PATCH": tus.handle_patch,
        "DELETE": tus.handle_delete,
        "OPTIONS": tus.handle_options,
    },
    "/api/v1/files/{id}/result": {"GET": tus.handle_result, "HEAD": tus.handle_result},
}


#: The metrics' route label for requests to no route (404), and for heads that were never parsed.
UNMATCHED, NO_REQUEST = "unmatched", "none"


def _route(path: str) -> str | None:
    """The ROUTES or ID_ROUTES key ``path`` falls under (an id as ``{id}``), or None."""
    path = path.rstrip("/") or "/"
    if path in ROUTES:
        return path
    prefix, _, rest = path.partition(tus.FILES_PATH + "/")
    if prefix or not rest:
        return None
    the_id, _, tail = rest.partition("/")
    key = tus.FILES_PATH + "/{id}" + (f"/{tail}" if tail else "")
    return key if the_id and key in ID_ROUTES else None


def _methods(path: str) -> Mapping[str, RouteHandler] | None:
    key = _route(path)
    if key is None:
        return None
    return ROUTES.get(key) or ID_ROUTES[key]


def route_label(request: Request | None) -> str:
    """The route a request was meant for, ids as ``{id}``, so that the label's values stay few."""
    if request is None:
        return NO_REQUEST
    return _route(request.path) or UNMATCHED


def resolve(method: str, path: str) -> RouteHandler:
    methods = _methods(path)
    if methods is None:
        raise NotFound(
            f"There is nothing at {path}.", detail={"path": path, "paths": sorted([*ROUTES, *ID_ROUTES])}
        )
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
