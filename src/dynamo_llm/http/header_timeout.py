"""A header read timeout for uvicorn (``--http-interface asgi``), which has none of its own.

granian closes a connection whose request headers have not arrived within its HTTP/1 header
read timeout; uvicorn keeps it open for as long as the client trickles bytes (its keep-alive
timer is disarmed by every byte received), so 2 000 slow-loris clients could hold 2 000
connections for ever. :func:`protocol_with_header_timeout` gives uvicorn's h11 protocol the same
rule: from the moment a connection opens, and again from the end of each response on a
kept-alive connection, the client has ``timeout`` seconds to complete its next request's
headers, or the connection is closed. A request whose headers arrived is bounded from then on
by the inference routes' body read timeout (408) and the request's own timers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["protocol_with_header_timeout"]


def protocol_with_header_timeout(timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol class, closing connections whose headers take over ``timeout``."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self._header_timer is not None and self.conn.their_state is not h11.IDLE:
                self._disarm_header_timer()  # the request line and headers are in

        def on_response_complete(self) -> None:
            # Armed before uvicorn starts the next cycle, which may parse a pipelined request
            # at once (and disarm it through handle_events).
            if not self.transport.is_closing():
                self._arm_header_timer()
            super().on_response_complete()

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self._header_timer = self.loop.call_later(timeout, self._headers_too_slow)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol
