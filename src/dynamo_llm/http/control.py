"""The control route: ``POST /v1/requests/{id}/stop``, a graceful stop across the wire.

A frontend uses it to stop a request it sent to a ``dynamo-llm worker``: every request in flight
with that id stops generating (``StopReason.EXPLICIT``) and ends its stream normally. Only
workers enable it (``AppState.control_routes``), since it trusts the caller with every request
id; while it is off the path is answered like any unknown path.
"""

from __future__ import annotations

from ..errors import NotFound
from ..runtime.context import StopReason
from .connection import Connection, HttpRequest
from .responses import respond_error, respond_json
from .routes import POST, Route
from .state import AppState

__all__ = ["routes"]


def routes(state: AppState) -> list[Route]:
    """The control route over ``state``, on while ``state.control_routes`` is."""

    async def stop_request(request: HttpRequest, conn: Connection, args: dict[str, str]) -> None:
        request_id = args["id"]
        stopped = 0
        for ctx in state.live_requests():
            if ctx.id == request_id and not ctx.is_stopped:
                ctx.stop_generating(StopReason.EXPLICIT)
                stopped += 1
        if stopped == 0:
            await respond_error(
                conn,
                NotFound(f"No request `{request_id[:128]}` in flight", code="request_not_found"),
            )
            return
        await respond_json(conn, 200, {"id": request_id, "stopped": stopped})

    return [
        Route(POST, "/v1/requests/{id}/stop", stop_request, enabled=lambda: state.control_routes)
    ]
