"""(method, path) → handler. Unknown paths and wrong methods are answered here, in one place."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from .errors import MethodNotAllowed, NotFound
from .handlers import tus
from .handlers.health import handle_health
from .handlers.upload import handle_upload
from .http.exchange import Exchange
from .state import ServerState

RouteHandler = Callable[[Exchange, ServerState], Awaitable[None]]

ROUTES: Mapping[str, Mapping[str, RouteHandler]] = {
    "/api/v1/upload": {"POST": handle_upload},
    "/api/v1/health": {"GET": handle_health, "HEAD": handle_health},
    "/api/v1/files": {"POST": tus.handle_create, "OPTIONS": tus.handle_options},
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


def _methods(path: str) -> Mapping[str, RouteHandler] | None:
    path = path.rstrip("/") or "/"
    if path in ROUTES:
        return ROUTES[path]
    prefix, _, rest = path.partition(tus.FILES_PATH + "/")
    if prefix or not rest:
        return None
    the_id, _, tail = rest.partition("/")
    return ID_ROUTES.get(tus.FILES_PATH + "/{id}" + (f"/{tail}" if tail else "")) if the_id else None


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
