"""A frontend on a real loopback socket, for tests and benchmarks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ..config import Config
from ..engines.base import Engine
from ..http.app import App, ServedModel, create_app
from ..http.server import HttpServer
from ..metrics import Metrics
from ..runtime.clock import Clock, SystemClock


class Frontend:
    """A running app: its base URL, and its metrics as a Prometheus parser reads them."""

    def __init__(self, app: App, server: HttpServer) -> None:
        self.app = app
        self.server = server

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def metrics(self) -> Metrics:
        return self.app.metrics

    def metrics_text(self) -> str:
        return generate_latest(self.metrics.registry).decode()

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """Every sample called ``name`` (prefix included), parsed from the exposition text."""
        out = []
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                if sample.name == name:
                    out.append((dict(sample.labels), sample.value))
        return out

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
        prefixed = f"{self.metrics.prefix}_{name}"
        return sum(
            v
            for sample_labels, v in self.samples(prefixed)
            if all(sample_labels.get(k) == want for k, want in labels.items())
        )


@asynccontextmanager
async def running_frontend(
    engine: Engine | None = None,
    *,
    models: list[ServedModel] | None = None,
    model: str = "test-model",
    config: Config | None = None,
    clock: Clock | None = None,
    interface: str = "rsgi",
    environ: Mapping[str, str] | None = None,
    http2: bool = False,
) -> AsyncIterator[Frontend]:
    """Serve ``engine`` as ``model`` (or ``models``) on 127.0.0.1 with an OS-chosen port."""
    if config is None:
        config = Config.from_env(environ or {})
    if models is None:
        if engine is None:
            raise ValueError("give an engine or models")
        models = [ServedModel(model, engine, context_length=config.context_length)]
    app = create_app(config, models, Metrics(prefix=config.metrics_prefix), clock or SystemClock())
    async with serving(app, interface=interface, http2=http2) as frontend:
        yield frontend


@asynccontextmanager
async def serving(
    app: App, *, interface: str = "rsgi", http2: bool = False
) -> AsyncIterator[Frontend]:
    """Serve an app already built (a worker's, a routed one) on 127.0.0.1, an OS-chosen port;
    shut it down (no grace) and stop the server after."""
    server = HttpServer(
        app,
        "127.0.0.1",
        0,
        interface=interface,
        http2=http2,
        read_timeout=app.config.http_read_timeout_secs,
    )
    await server.start()
    try:
        yield Frontend(app, server)
    finally:
        await app.shutdown(grace=0, kill_wait=5)
        await server.stop()
