"""One in-process engine served over the OpenAI HTTP API, until SIGTERM or SIGINT.

``dynamo-llm worker`` is exactly this: the engine :func:`~dynamo_llm.engines.factory.build_engine`
makes from the configuration, behind the one app (:func:`~dynamo_llm.http.app.create_app`) and
server (:class:`~dynamo_llm.http.server.HttpServer`) the frontend uses, so a worker answers
chat, completions, models, health and metrics exactly as the frontend does, and a client that
hangs up kills its request through the same disconnect monitor. ``dynamo-llm serve`` with an
in-process engine is assembled by the same :func:`build_app` (the router will later sit between
the frontend's app and remote workers; the in-process case stays this one).

When the engine is the mocker its scheduler state is exposed in ``/metrics``
(:class:`~dynamo_llm.engines.mocker.metrics.MockerMetrics`, read at scrape time) and summarised
per model in ``/health``.

Startup prints one readiness line to stderr, whatever the log level, once connections are
accepted: ``dynamo-llm <command>: serving <models> on http://<host>:<port>``. With
``--http-port 0`` it is how a supervisor or a test learns the port the OS chose.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from typing import Any, TextIO

from . import __version__
from .config import Config
from .engines.factory import build_engine
from .engines.mocker import MockerEngine
from .engines.mocker.metrics import MockerMetrics
from .http.app import App, ServedModel, create_app
from .http.server import HttpServer
from .metrics import Metrics
from .router.engine import Router
from .runtime.clock import Clock, SystemClock

log = logging.getLogger("dynamo_llm")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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


async def serve_until_signalled(
    app: App, config: Config, command: str, *, ready_stream: TextIO | None = None
) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then drain gracefully and stop.

    On the signal ``/live`` turns 503, requests in flight get
    ``graceful_shutdown_timeout_secs`` to finish, the rest are killed, and the server and the
    engines are closed.
    """
    server = HttpServer(app, config.http_host, config.http_port, interface=config.http_interface)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in _SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    threads_before = _native_thread_ids()
    try:
        try:
            await server.start()
            models = ", ".join(app.models)
            stream = ready_stream if ready_stream is not None else sys.stderr
            print(
                f"dynamo-llm {command}: serving {models} on {server.base_url} "
                f"(engine {'router' if app_is_routed(app) else config.engine}, "
                f"{config.http_interface}, version {__version__})",
                file=stream,
                flush=True,
            )
            await stop.wait()
            log.info("shutdown requested")
            await app.shutdown()
        finally:
            await server.stop()
            await _wait_for_server_threads(threads_before, limit=1.0)
    finally:
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)
    log.info("stopped")


def app_is_routed(app: App) -> bool:
    return any(isinstance(model.engine, Router) for model in app.models.values())


def _native_thread_ids() -> set[int]:
    try:
        return {int(tid) for tid in os.listdir("/proc/self/task")}
    except OSError:  # not Linux: nothing to wait for
        return set()


async def _wait_for_server_threads(before: set[int], limit: float) -> None:
    """Wait (bounded) until the threads the server started have exited.

    granian's embedded server returns from ``serve()`` while its Rust runtime threads are still
    winding down; if the interpreter finalises under one of them, the thread panics and the
    process may abort with status 134 instead of exiting 0 (granian issue #693). Those threads
    are the native threads that appeared since ``before`` and are not Python threads; they are
    normally gone within a few milliseconds. After a client hung up mid-stream granian keeps one
    of them parked (in a futex wait, not touching Python) for good, which is why the wait is
    bounded: exiting under that one is harmless.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while True:
        python_threads = {t.native_id for t in threading.enumerate()}
        if not (_native_thread_ids() - before - python_threads):
            return
        if loop.time() >= deadline:
            log.info("an HTTP server thread is still parked after %gs; exiting anyway", limit)
            return
        await asyncio.sleep(0.005)
