"""Writing a whole (non-streamed) response: JSON bodies and error bodies."""

from __future__ import annotations

import msgspec

from ..errors import DynamoError, render_error
from .connection import Connection, Headers

__all__ = ["JSON_HEADERS", "respond_error", "respond_json", "with_request_id"]

JSON_HEADERS: Headers = [("content-type", "application/json")]

_encode = msgspec.json.encode


def with_request_id(headers: Headers, request_id: str) -> Headers:
    """``headers`` plus ``X-Request-Id``, which every answer to an inference request carries."""
    return [*headers, ("x-request-id", request_id)]


async def respond_json(conn: Connection, status: int, payload: object) -> None:
    await conn.respond(status, JSON_HEADERS, _encode(payload))


async def respond_error(
    conn: Connection, exc: DynamoError, headers: Headers = JSON_HEADERS
) -> None:
    """The OpenAI error body for ``exc`` with its status; nothing once the client is gone."""
    if not conn.is_disconnected:
        await conn.respond(exc.status, headers, render_error(exc))
