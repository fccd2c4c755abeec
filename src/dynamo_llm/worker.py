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
per model in ``/health``.

With ``--discovery-backend etcd`` the worker registers itself once it accepts connections
(:func:`build_registration`: its URL, models, context length, KV block size and metrics URL,
under a lease kept alive at a third of ``--discovery-lease-ttl-secs``), and on SIGTERM it
withdraws that key *before* it drains, so frontends stop sending it work first.
"""

from __future__ import annotations

import socket
from typing import Any

from .config import Config
from .discovery.etcd_client import EtcdClient
from .discovery.instance import Instance
from .discovery.registration import Registration
from .engines.factory import build_engine
from .engines.mocker import MockerEngine
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
        served.describe = lambda: _describe_mocker(engine)
    return [served]


def _describe_mocker(engine: MockerEngine) -> dict[str, Any]:
    s = engine.snapshot()
    return {
        "engine": "mocker",
        "running": s.running,
        "waiting": s.waiting,
        "kv_blocks_used": s.kv_blocks_used,
        "kv_blocks_total": s.kv_blocks_total,
    }


def build_app(config: Config, clock: Clock | None = None, *, control_routes: bool = False) -> App:
    """The app serving the engine ``config`` names, with a fresh metrics registry.

    ``control_routes`` (on for ``dynamo-llm worker``) lets a frontend stop a request gracefully
    across the wire (``POST /v1/requests/{id}/stop``).
    """
    clock = clock if clock is not None else SystemClock()
    metrics = Metrics(prefix=config.metrics_prefix)
    return create_app(
        config,
        build_models(config, clock, metrics),
        metrics,
        clock,
        control_routes=control_routes,
    )


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
        return Instance(
            instance_id=instance_id,
            url=url,
            models=tuple(app.models),
            namespace=config.namespace,
            context_length=min(lengths) if lengths else None,
            kv_block_size=config.mocker_block_size if config.engine == "mocker" else None,
            metrics_url=url + "/metrics",
            owned_by="dynamo-llm",
        )

    return Registration(
        EtcdClient(config.etcd_endpoints),
        config.namespace,
        describe,
        ttl=config.discovery_lease_ttl_secs,
        clock=clock,
    )
