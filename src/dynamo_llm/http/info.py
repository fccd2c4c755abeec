"""The info routes: ``/v1/models`` (and one model), ``/health``, ``/live``, ``/metrics``,
``/openapi.json`` and ``/docs``.

``/health`` is readiness (200 while at least one model is ready, with each model's own
description) and refreshes ``model_ready`` as it reads it; ``/live`` is liveness (503 once a
graceful shutdown has begun).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from ..errors import ModelNotFound, clip
from .connection import Connection, HttpRequest
from .openapi import DocumentShape, openapi_document
from .responses import JSON_HEADERS, respond_error, respond_json
from .routes import GET, Route
from .state import AppState, ServedModel

__all__ = ["routes"]

_MODELS = "/v1/models"


def routes(state: AppState) -> list[Route]:
    """The info routes over ``state``."""
    info = _Info(state)
    return [
        Route(GET, _MODELS, info.list_models),
        Route(GET, _MODELS + "/{id}", info.get_model),
        Route(GET, "/health", info.health),
        Route(GET, "/live", info.live),
        Route(GET, "/metrics", info.metrics),
        Route(GET, "/openapi.json", info.openapi),
        Route(GET, "/docs", info.docs),
    ]


def _model_card(model: ServedModel) -> dict[str, Any]:
    card: dict[str, Any] = {
        "id": model.name,
        "object": "model",
        "created": model.created,
        "owned_by": model.owned_by,
    }
    if model.context_length is not None:
        card["context_window"] = model.context_length
    return card


class _Info:
    __slots__ = ("_state",)

    def __init__(self, state: AppState) -> None:
        self._state = state

    async def list_models(
        self, request: HttpRequest, conn: Connection, args: dict[str, str]
    ) -> None:
        cards = [_model_card(m) for m in self._state.models.values()]
        await respond_json(conn, 200, {"object": "list", "data": cards})

    async def get_model(self, request: HttpRequest, conn: Connection, args: dict[str, str]) -> None:
        name = args["id"].lstrip("/")
        model = self._state.models.get(name)
        if model is None:
            await respond_error(
                conn, ModelNotFound(f"The model `{clip(name)}` does not exist.", param="model")
            )
            return
        await respond_json(conn, 200, _model_card(model))

    async def health(self, request: HttpRequest, conn: Connection, args: dict[str, str]) -> None:
        state = self._state
        if state.shutting_down:
            # A load balancer must stop sending work as soon as shutdown begins.
            await respond_json(conn, 503, _SHUTTING_DOWN)
            return
        models = []
        any_ready = False
        for model in state.models.values():
            ready = model.is_ready()
            any_ready = any_ready or ready
            state.metrics.model_ready.labels(model.name).set(1 if ready else 0)
            models.append({"model": model.name, "ready": ready, **model.describe()})
        waiting = list(state.waiting_for())
        status = "healthy" if any_ready else "loading" if waiting else "unhealthy"
        body: dict[str, object] = {"status": status, "models": models}
        if waiting:
            body["waiting_for"] = waiting
        discovery = state.discovery()
        if discovery is not None:
            body["discovery"] = dict(discovery)
        await respond_json(conn, 200 if any_ready else 503, body)

    async def live(self, request: HttpRequest, conn: Connection, args: dict[str, str]) -> None:
        if self._state.shutting_down:
            await respond_json(conn, 503, _SHUTTING_DOWN)
        else:
            await respond_json(conn, 200, {"status": "live", "message": "Service is live"})

    async def metrics(self, request: HttpRequest, conn: Connection, args: dict[str, str]) -> None:
        body = self._state.metrics.render()
        await conn.respond(200, [("content-type", CONTENT_TYPE_LATEST)], body)

    async def openapi(self, request: HttpRequest, conn: Connection, args: dict[str, str]) -> None:
        state = self._state
        shape = DocumentShape(
            accepts_unknown_fields=state.forwards_unknown_fields,
            model_names=tuple(state.models),
            api_keys=state.config.has_api_keys,
            protect_metrics=state.config.protect_metrics,
            control_routes=state.control_routes,
        )
        await conn.respond(200, JSON_HEADERS, openapi_document(shape))

    async def docs(self, request: HttpRequest, conn: Connection, args: dict[str, str]) -> None:
        await conn.respond(200, [("content-type", "text/html; charset=utf-8")], _DOCS_HTML)


_SHUTTING_DOWN = {"status": "shutting_down", "message": "Service is shutting down"}

_DOCS_HTML = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>dynamo-llm API</title></head>
<body><h1>dynamo-llm</h1>
<p>OpenAI-compatible API. The machine-readable description is at
<a href="/openapi.json">/openapi.json</a> (OpenAPI 3.1).</p>
<ul>
<li><code>POST /v1/chat/completions</code></li>
<li><code>POST /v1/completions</code></li>
<li><code>GET /v1/models</code>, <code>GET /v1/models/{id}</code></li>
<li><code>GET /health</code>, <code>GET /live</code>, <code>GET /metrics</code></li>
</ul></body></html>
"""
