"""One in-process engine behind the OpenAI HTTP API: the app ``dynamo-llm worker`` serves.

``dynamo-llm worker`` is exactly this: the engine :func:`~dynamo_llm.engines.factory.build_engine`
makes from the configuration, behind the one app (:func:`~dynamo_llm.http.app.create_app`) and
server (:class:`~dynamo_llm.http.server.HttpServer`) the frontend uses, so a worker answers
chat, completions, models, health and metrics exactly as the frontend does, and a client that
hangs up kills its request through the same disconnect monitor. ``dynamo-llm serve`` with an
in-process engine is assembled by the same :func:`build_app` (with remote workers it is
:func:`~dynamo_llm.fleet.build_routed_app` instead). The command line (:mod:`dynamo_llm.cli`)
serves the app until SIGTERM or SIGINT.

When the engine is the mocker its scheduler state is exposed in ``/metrics``
(:class:`~dynamo_llm.engines.mocker.metrics.MockerMetrics`, read at scrape time) and summarised
per model in ``/health``. With ``--kv-events-port`` its KV cache changes are published as vLLM's
KV events (:class:`~dynamo_llm.engines.mocker.events.KvEventPublisher`, started and stopped with
the app); ``/health`` names the endpoints and counts the cached blocks.

With ``--discovery-backend etcd`` the worker registers itself once it accepts connections
(:func:`build_registration`: its URL, models, context length, KV block size, metrics URL and,
with ``--kv-events-port``, its KV event endpoints,
under a lease kept alive at a third of ``--discovery-lease-ttl-secs``), and on SIGTERM it
withdraws that key *before* it drains, so frontends stop sending it work first.
"""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import urlsplit

from .config import Config
from .discovery.etcd_client import EtcdClient
from .discovery.instance import Instance
from .discovery.registration import Registration
from .engines.factory import build_engine
from .engines.mocker import MockerEngine
from .engines.mocker.events import KvEventPublisher
from .engines.mocker.metrics import MockerMetrics
from .http.app import App, ServedModel, create_app
from .metrics import Metrics
from .runtime.clock import Clock, SystemClock


def build_models(config: Config, clock: Clock, metrics: Metrics) -> list[ServedModel]:
    """The model ``config`` describes, its engine built, its engine metrics registered.

    The model is named ``config.model_name``, or after its engine (``mocker``, ``echo``).
    Raises ``ValueError`` when the engine cannot be built (see ``build_engine``).
    """
    engine = build_engine(config, clock)
    name = config.model_name or config.engine
    context_length: int | None = getattr(engine, "context_length", None)
    served = ServedModel(name, engine, context_length=context_length)
    if isinstance(engine, MockerEngine):
        mocker_metrics = MockerMetrics()
        mocker_metrics.register(metrics)
        mocker_metrics.watch(name, engine.snapshot)
        publisher = build_kv_publisher(config, engine)
        served.describe = lambda: _describe_mocker(engine, publisher)
    return [served]


def build_kv_publisher(config: Config, engine: MockerEngine) -> KvEventPublisher | None:
    """The publisher of the mocker's KV events when ``--kv-events-port`` is set (not started:
    :func:`kv_publisher_of` finds it for the app's lifecycle)."""
    port = config.kv_events_port
    if port is None:
        return None
    replay = config.kv_events_replay_port
    if replay is None:
        replay = port + 1 if port else 0
    publisher = KvEventPublisher(
        engine.config.block_size,
        host=config.http_host,
        port=port,
        replay_port=replay,
        advertise_host=_advertised_host(config),
    )
    engine.kv_pool.listener = publisher
    return publisher


def kv_publisher_of(engine: object) -> KvEventPublisher | None:
    """The KV event publisher listening to a mocker engine's pool, if any."""
    if isinstance(engine, MockerEngine):
        listener = engine.kv_pool.listener
        if isinstance(listener, KvEventPublisher):
            return listener
    return None


def _advertised_host(config: Config) -> str:
    if config.advertise_url:
        host = urlsplit(config.advertise_url).hostname
        if host:
            return host
    if config.http_host in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return config.http_host


def _describe_mocker(engine: MockerEngine, publisher: KvEventPublisher | None) -> dict[str, Any]:
    s = engine.snapshot()
    out: dict[str, Any] = {
        "engine": "mocker",
        "running": s.running,
        "waiting": s.waiting,
        "kv_blocks_used": s.kv_blocks_used,
        "kv_blocks_total": s.kv_blocks_total,
        "kv_blocks_cached": engine.kv_pool.num_cached,
    }
    if publisher is not None:
        out["kv_events_endpoint"] = publisher.endpoint
        out["kv_events_replay_endpoint"] = publisher.replay_endpoint
        out["kv_event_batches"] = publisher.batches_sent
    return out


def build_app(config: Config, clock: Clock | None = None, *, control_routes: bool = False) -> App:
    """The app serving the engine ``config`` names, with a fresh metrics registry.

    ``control_routes`` (on for ``dynamo-llm worker``) lets a frontend stop a request gracefully
    across the wire (``POST /v1/requests/{id}/stop``).
    """
    clock = clock if clock is not None else SystemClock()
    metrics = Metrics(prefix=config.metrics_prefix)
    models = build_models(config, clock, metrics)
    app = create_app(config, models, metrics, clock, control_routes=control_routes)
    for model in models:
        publisher = kv_publisher_of(model.engine)
        if publisher is not None:
            app.add_lifecycle(publisher.start, publisher.aclose)
    return app


def advertised_url(config: Config, base_url: str, port: int) -> str:
    """The URL frontends reach this worker at: ``--advertise-url``, else the server's own
    (with the host name in place of a wildcard address)."""
    if config.advertise_url:
        return config.advertise_url.rstrip("/")
    if config.http_host in ("0.0.0.0", "::", ""):
        return f"http://{socket.gethostname()}:{port}"
    return base_url


def build_registration(app: App, config: Config, url: str, clock: Clock) -> Registration:
    """The etcd registration of the worker serving ``app`` at ``url`` (not started)."""

    def describe(instance_id: str) -> Instance:
        lengths = [m.context_length for m in app.models.values() if m.context_length]
        publishers = [p for m in app.models.values() if (p := kv_publisher_of(m.engine))]
        publisher = publishers[0] if publishers else None
        return Instance(
            instance_id=instance_id,
            url=url,
            models=tuple(app.models),
            namespace=config.namespace,
            context_length=min(lengths) if lengths else None,
            kv_block_size=config.mocker_block_size if config.engine == "mocker" else None,
            metrics_url=url + "/metrics",
            kv_events_endpoint=publisher.endpoint if publisher else None,
            kv_events_replay_endpoint=publisher.replay_endpoint if publisher else None,
            owned_by="dynamo-llm",
        )

    return Registration(
        EtcdClient(config.etcd_endpoints),
        config.namespace,
        describe,
        ttl=config.discovery_lease_ttl_secs,
        clock=clock,
    )
