"""What every handler shares: one typed object, :class:`AppState`.

The configuration, the metrics and the clock; the served models (a registry discovery may change
while requests are in flight); and the requests in flight, each by its engine context, which is
what a graceful shutdown waits for and a stop route looks up. The handlers (``inference``,
``info``, ``control``) take the state; the :class:`~dynamo_llm.http.app.App` is the state plus
the route table and the lifecycle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import InitVar, dataclass, field
from typing import Any

from ..config import Config
from ..engines.base import Engine, forwards_unknown_fields
from ..metrics import Metrics
from ..runtime.clock import Clock
from ..runtime.context import EngineContext

__all__ = ["AppState", "ServedModel"]


@dataclass
class ServedModel:
    """A model the frontend serves, and the engine that serves it."""

    name: str
    engine: Engine
    context_length: int | None = None
    owned_by: str = "dynamo-llm"
    created: int = field(default_factory=lambda: int(time.time()))
    is_ready: Callable[[], bool] = lambda: True
    describe: Callable[[], dict[str, Any]] = lambda: {}
    # The engine enforces the first-token limit itself, per attempt (the router does): the HTTP
    # layer's limit is then a safety net at twice the value, like the inactivity window, so the
    # engine's fires first.
    engine_enforces_first_token: bool = False

    @property
    def forwards_unknown_fields(self) -> bool:
        """Its engine passes requests on: fields we do not know are forwarded, not refused."""
        return forwards_unknown_fields(self.engine)


def _nothing() -> Sequence[str]:
    return ()


def _no_discovery() -> Mapping[str, object] | None:
    return None


@dataclass(eq=False, repr=False)
class AppState:
    """The configuration, metrics, clock, served models and requests in flight."""

    config: Config
    served: InitVar[Sequence[ServedModel]]
    """The models served from the start (discovery may add and remove some later)."""
    metrics: Metrics
    clock: Clock
    control_routes: bool = field(default=False, kw_only=True)
    """Whether the worker's control route (``POST /v1/requests/{id}/stop``) is on."""
    models: dict[str, ServedModel] = field(init=False)
    """The models served now, by name."""
    shutting_down: bool = field(default=False, init=False)
    """A graceful shutdown has begun: ``/live`` answers 503."""
    waiting_for: Callable[[], Sequence[str]] = field(default_factory=lambda: _nothing, init=False)
    """What the app still waits for before it can serve everything it was configured with
    (e.g. workers that have not answered yet, set by whoever owns them): ``/health`` reports
    it, and says ``loading`` while nothing is ready."""
    discovery: Callable[[], Mapping[str, object] | None] = field(
        default_factory=lambda: _no_discovery, init=False
    )
    """The discovery backend's state (e.g. etcd unreachable), for ``/health``; None: none."""
    _live: dict[EngineContext, None] = field(default_factory=dict, init=False)
    _idle: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    def __post_init__(self, served: Sequence[ServedModel]) -> None:
        self.models = {m.name: m for m in served}
        self._idle.set()
        for model in served:
            self.metrics.declare_model(model.name)
            self.metrics.model_ready.labels(model.name).set(1 if model.is_ready() else 0)

    # --- models -------------------------------------------------------------------------------

    def add_model(self, model: ServedModel) -> None:
        """Serve another model (or replace one with the same name), e.g. found by discovery."""
        self.models[model.name] = model
        self.metrics.declare_model(model.name)
        self.metrics.model_ready.labels(model.name).set(1 if model.is_ready() else 0)

    def accepts_unknown_fields(self, name: str) -> bool:
        """Whether a request for model ``name`` may hold fields we do not know (its engine
        forwards them). For a model we do not serve, whether the app forwards them at all, so
        that such a request gets the 404 for its model, whatever else it holds."""
        model = self.models.get(name)
        if model is None:
            return self.forwards_unknown_fields
        return model.forwards_unknown_fields

    @property
    def forwards_unknown_fields(self) -> bool:
        """Whether some model's engine forwards fields we do not know (the router's does)."""
        return any(model.forwards_unknown_fields for model in self.models.values())

    def remove_model(self, name: str) -> None:
        """Stop serving a model: new requests for it get 404; requests in flight finish."""
        if self.models.pop(name, None) is not None:
            self.metrics.model_ready.remove(name)

    # --- requests in flight -------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return len(self._live)

    def live_requests(self) -> Iterator[EngineContext]:
        """The contexts of the requests in flight (a snapshot: safe to stop them meanwhile)."""
        return iter(list(self._live))

    def track(self, ctx: EngineContext) -> None:
        """An admitted request is in flight until :meth:`untrack`."""
        self._live[ctx] = None
        self._idle.clear()

    def untrack(self, ctx: EngineContext) -> None:
        self._live.pop(ctx, None)
        if not self._live:
            self._idle.set()

    async def wait_until_idle(self) -> None:
        """Return once no admitted request is in flight (every outcome recorded)."""
        await self._idle.wait()

    async def wait_idle(self, seconds: float) -> None:
        """Wait until no request is in flight, or ``seconds`` of the clock have passed."""
        waiter = asyncio.ensure_future(self._idle.wait())
        sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
        try:
            await asyncio.wait([waiter, sleeper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (waiter, sleeper):
                fut.cancel()
            await asyncio.wait([waiter, sleeper])
