"""The OpenAI-compatible HTTP application, independent of the server interface.

:func:`create_app` assembles an :class:`App` from the configuration, the served models, the
metrics and the clock: the shared state (:mod:`.state`) and the route table (:mod:`.routes`)
holding the inference routes (:mod:`.inference`), the info routes (:mod:`.info`) and the
worker's control route (:mod:`.control`). Server adapters (``rsgi``, ``asgi``) hand the app each
request as an :class:`~dynamo_llm.http.connection.HttpRequest` and a
:class:`~dynamo_llm.http.connection.Connection`; :meth:`App.handle` dispatches it.

The app also owns the lifecycle: background work and hooks started and stopped with it, and the
graceful shutdown that lets requests in flight finish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from ..config import Config
from ..metrics import Metrics
from ..runtime.clock import Clock, SystemClock
from ..runtime.context import StopReason
from . import control, inference, info
from .auth import ApiKeys
from .connection import Connection, HttpRequest
from .routes import RouteTable
from .state import AppState, ServedModel

__all__ = ["App", "ServedModel", "create_app"]

log = logging.getLogger("dynamo_llm.http")

Hook = Callable[[], Awaitable[None]]


@dataclass(eq=False, repr=False)
class App(AppState):
    """The app state plus what serving it needs: the route table, the lifecycle, shutdown."""

    routes: RouteTable = field(default_factory=lambda: RouteTable(()), init=False)
    """Every route the app answers (filled in by :func:`create_app`)."""
    _background: list[asyncio.Task[None]] = field(default_factory=list, init=False)
    _lifecycle: list[tuple[Hook, Hook]] = field(default_factory=list, init=False)

    async def handle(self, request: HttpRequest, conn: Connection) -> None:
        await self.routes.dispatch(request, conn)

    # --- lifecycle ----------------------------------------------------------------------------

    def add_lifecycle(self, start: Hook, close: Hook) -> None:
        """Run ``start`` when the app starts and ``close`` when it closes (before the engines)."""
        self._lifecycle.append((start, close))

    async def astart(self) -> None:
        """Start background work (the event-loop canary, the writer of this process's metrics
        when several share ``/metrics``) and the lifecycle hooks."""
        if not self._background:
            self._background.append(
                asyncio.create_task(self.metrics.run_event_loop_canary(self.clock))
            )
            if self.metrics.shared is not None:
                self._background.append(asyncio.create_task(self.metrics.run_sharing(self.clock)))
            for start, _ in self._lifecycle:
                await start()

    async def aclose(self) -> None:
        """Stop background work, run the close hooks (last added first), close the engines."""
        for task in self._background:
            task.cancel()
        if self._background:
            await asyncio.wait(self._background)
            for _, close in reversed(self._lifecycle):
                await close()
        self._background.clear()
        self.metrics.close()  # shared: the last requests of a process that is going away
        engines = {id(m.engine): m.engine for m in self.models.values()}
        for engine in engines.values():
            await engine.aclose()

    async def shutdown(self, grace: float | None = None, kill_wait: float = 5.0) -> None:
        """Graceful shutdown: ``/live`` turns 503; requests in flight get ``grace`` seconds to
        finish; the rest are killed with reason ``shutdown`` and awaited."""
        self.shutting_down = True
        grace = self.config.graceful_shutdown_timeout_secs if grace is None else grace
        if self.inflight:
            log.info(
                "shutting down: %d request(s) in flight, waiting up to %gs", self.inflight, grace
            )
            await self.wait_idle(grace)
        if self.inflight:
            log.warning("shutting down: stopping %d request(s) still in flight", self.inflight)
            for ctx in self.live_requests():
                ctx.kill(StopReason.SHUTDOWN)
            await self.wait_idle(kill_wait)


def create_app(
    config: Config,
    models: Sequence[ServedModel],
    metrics: Metrics | None = None,
    clock: Clock | None = None,
    *,
    control_routes: bool = False,
) -> App:
    """Build the app; a fresh metrics registry and the system clock unless given.

    ``control_routes`` enables ``POST /v1/requests/{id}/stop`` (for ``dynamo-llm worker``).
    Raises ValueError when ``--api-key-file`` cannot be read or holds no key.
    """
    app = App(
        config,
        models,
        metrics if metrics is not None else Metrics(prefix=config.metrics_prefix),
        clock if clock is not None else SystemClock(),
        control_routes=control_routes,
    )
    app.routes = RouteTable(
        [*inference.routes(app), *info.routes(app), *control.routes(app)],
        ApiKeys.configured(config.api_keys, config.api_key_file, app.clock),
        protect_metrics=config.protect_metrics,
    )
    return app
