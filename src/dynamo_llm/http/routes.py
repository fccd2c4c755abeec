"""The route table: which handler answers a method and a path, as data.

A :class:`Route` is methods, a path pattern and a handler. A pattern is a literal path, or a
literal prefix and suffix around one ``{name}`` placeholder, which matches anything between them
(slashes too: a request id or a model name may contain them). :class:`RouteTable` dispatches:
the first route whose pattern matches the path answers; if its methods do not include the
request's, the answer is 405 with an ``Allow`` header. A path no route matches is 404. Both
quote the path clipped to a bounded length. Both errors are written here and
nowhere else. A route may be switched off (``enabled``): it is then as if it were not in the
table.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from ..errors import AuthenticationFailed, MethodNotAllowed, NotFound, clip
from .auth import ApiKeys
from .connection import Connection, HttpRequest
from .responses import JSON_HEADERS, respond_error

__all__ = ["GET", "POST", "Handler", "Route", "RouteTable"]

Handler = Callable[[HttpRequest, Connection, dict[str, str]], Awaitable[None]]
"""A route's handler: the request, its connection, and the path's placeholder values."""

GET = frozenset({"GET", "HEAD"})
POST = frozenset({"POST"})


def _always() -> bool:
    return True


@dataclass(frozen=True, slots=True)
class Route:
    """``methods`` on ``pattern`` are answered by ``handler`` (while ``enabled()``).

    ``on_unauthorised`` is called for a request the route would have answered that is refused
    for its API key (the inference routes count it; the body is never read).
    """

    methods: frozenset[str]
    pattern: str
    handler: Handler
    enabled: Callable[[], bool] = _always
    on_unauthorised: Callable[[], None] | None = None

    def match(self, path: str) -> dict[str, str] | None:
        """The placeholder's value when ``path`` matches (``{}`` for a literal), else None."""
        head, brace, rest = self.pattern.partition("{")
        if not brace:
            return {} if path == self.pattern else None
        name, _, tail = rest.partition("}")
        if not (path.startswith(head) and path.endswith(tail)):
            return None
        return {name: path[len(head) : len(path) - len(tail)]}


PROTECTED_PREFIX = "/v1/"
"""With API keys configured, every path under this prefix needs one (as vLLM does); the
operational routes (``/health``, ``/live``, ``/metrics``, ``/openapi.json``, ``/docs``) stay
open so probes and scrapers need no credential (``/metrics`` too unless ``protect_metrics``)."""

METRICS_PATH = "/metrics"

_UNAUTHORIZED_HEADERS = [*JSON_HEADERS, ("www-authenticate", "Bearer")]


class RouteTable:
    """Dispatches a request to the first route matching its path (literal paths first).

    With ``api_keys``, a request under :data:`PROTECTED_PREFIX` (and to ``/metrics`` with
    ``protect_metrics``) must carry one of them (:mod:`.auth`), checked before the path is
    matched, so a stranger learns nothing about the routes. A refused request that a route
    would have answered is reported to its ``on_unauthorised``.
    """

    __slots__ = ("_exact", "_keys", "_patterns", "_protect_metrics")

    def __init__(
        self,
        routes: Iterable[Route],
        api_keys: ApiKeys | None = None,
        *,
        protect_metrics: bool = False,
    ) -> None:
        self._keys = api_keys
        self._protect_metrics = protect_metrics
        self._exact: dict[str, Route] = {}
        self._patterns: list[Route] = []
        for route in routes:
            if "{" in route.pattern:
                self._patterns.append(route)
            elif route.pattern in self._exact:
                raise ValueError(f"two routes for {route.pattern}")
            else:
                self._exact[route.pattern] = route

    def _find(self, path: str) -> tuple[Route, dict[str, str]] | None:
        route = self._exact.get(path)
        if route is not None and route.enabled():
            return route, {}
        for route in self._patterns:
            args = route.match(path)
            if args is not None and route.enabled():
                return route, args
        return None

    def _is_protected(self, path: str) -> bool:
        return path.startswith(PROTECTED_PREFIX) or (self._protect_metrics and path == METRICS_PATH)

    async def dispatch(self, request: HttpRequest, conn: Connection) -> None:
        path = request.path
        method = request.method
        keys = self._keys
        if keys is not None and self._is_protected(path) and not keys.accepts(request.headers):
            found = self._find(path)
            refused = found[0] if found is not None else None
            if refused is not None and method in refused.methods and refused.on_unauthorised:
                refused.on_unauthorised()
            await respond_error(
                conn,
                AuthenticationFailed(
                    "Invalid or missing API key (Authorization: Bearer <key>, or x-api-key: <key>)"
                ),
                _UNAUTHORIZED_HEADERS,
            )
            return
        found = self._find(path)
        if found is None:
            await respond_error(
                conn,
                NotFound(f"No route for {clip(method, 16)} {clip(path)}", code="route_not_found"),
            )
            return
        route, args = found
        if method not in route.methods:
            allow = ", ".join(sorted(route.methods))
            await respond_error(
                conn,
                MethodNotAllowed(f"Method {clip(method, 16)} not allowed on {clip(path)}"),
                [*JSON_HEADERS, ("allow", allow)],
            )
            return
        await route.handler(request, conn, args)
