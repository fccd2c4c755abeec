"""The OpenAPI 3.1 description served at ``/openapi.json``.

The request and unary response schemas are the wire models' (:mod:`dynamo_llm.protocols.schema`,
which states every constraint the validators enforce); this module lays out the paths, the
answers of each route (the OpenAI error shape for every error, the health and model objects)
and what depends on how the app runs: whether unknown request fields are allowed (an app whose
engine forwards them, the router), the served model names as examples of ``model``, the bearer
scheme when API keys are set, and the worker's stop route when it is on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from .. import __version__
from ..protocols.schema import wire_schemas

__all__ = ["DocumentShape", "openapi_document"]

Schema = dict[str, Any]

_ERROR_SCHEMA: Schema = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "integer", "null"]},
            },
            "required": ["message", "type", "param", "code"],
        }
    },
    "required": ["error"],
}

_MODEL_CARD: Schema = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
        "context_window": {"type": "integer"},
    },
    "required": ["id", "object", "created", "owned_by"],
}

_MODEL_LIST: Schema = {
    "type": "object",
    "properties": {
        "object": {"const": "list"},
        "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
    },
    "required": ["object", "data"],
}

# /health while serving: each model's own description (its workers, for the router) rides along.
_HEALTH: Schema = {
    "type": "object",
    "properties": {
        "status": {"enum": ["healthy", "loading", "unhealthy", "shutting_down"]},
        "models": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"model": {"type": "string"}, "ready": {"type": "boolean"}},
                "required": ["model", "ready"],
            },
        },
        "waiting_for": {"type": "array", "items": {"type": "string"}},
        "message": {"type": "string"},
    },
    "required": ["status"],
}

_LIVE: Schema = {
    "type": "object",
    "properties": {"status": {"enum": ["live", "shutting_down"]}, "message": {"type": "string"}},
    "required": ["status", "message"],
}

_CHUNK: Schema = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "object": {"enum": ["chat.completion.chunk", "text_completion"]},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "index": {"type": "integer", "minimum": 0},
                    "finish_reason": {"type": ["string", "null"]},
                },
                "required": ["index"],
            },
        },
        "usage": {"anyOf": [{"$ref": "#/components/schemas/UsageInfo"}, {"type": "null"}]},
    },
    "required": ["id", "object", "created", "model", "choices"],
}


def _event(event: str, data: Schema, *required: str) -> Schema:
    return {
        "type": "object",
        "properties": {"event": {"const": event}, "data": data},
        "required": [*required, "data"],
    }


def _json_text(name: str) -> Schema:
    """A string holding the JSON of the schema ``name``."""
    return {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"$ref": f"#/components/schemas/{name}"},
    }


# One server-sent event: a chunk, the closing [DONE], or an error frame (event: error).
_EVENT: Schema = {
    "anyOf": [
        _event("message", _json_text("Chunk")),
        _event("message", {"const": "[DONE]"}),
        _event("error", _json_text("Error"), "event"),
    ]
}

_STOPPED: Schema = {
    "type": "object",
    "properties": {"id": {"type": "string"}, "stopped": {"type": "integer", "minimum": 1}},
    "required": ["id", "stopped"],
}


@dataclass(frozen=True, slots=True)
class DocumentShape:
    """What the document says that depends on how the app runs."""

    accepts_unknown_fields: bool = False
    """Unknown top-level request fields are forwarded (the router), not refused."""
    model_names: tuple[str, ...] = ()
    """The models served now: examples of ``model``."""
    api_keys: bool = False
    """``/v1/`` routes need an API key (``Authorization: Bearer`` or ``x-api-key``)."""
    protect_metrics: bool = False
    """With ``api_keys``, ``/metrics`` needs one too."""
    control_routes: bool = False
    """The worker's ``POST /v1/requests/{id}/stop`` is on."""


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str = "An OpenAI-shaped error") -> Schema:
    return _json(description, _ref("Error"))


def _inference_op(summary: str, request: str, response: str) -> Schema:
    return {
        "summary": summary,
        "parameters": [
            {
                "name": "X-Request-Id",
                "in": "header",
                "required": False,
                "description": "The request's id (1-128 printable ASCII characters; any other "
                "value is replaced by a fresh UUID), echoed on the response",
                "schema": {"type": "string"},
            }
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref(request)}},
        },
        "responses": {
            "200": {
                "description": "A completion (JSON), or a stream of server-sent events when "
                "`stream` is true, ending with `data: [DONE]` or an `event: error` frame",
                "content": {
                    "application/json": {"schema": _ref(response)},
                    "text/event-stream": {"schema": _EVENT},
                },
            },
            "501": _error("`functions` or `function_call`: deprecated, use `tools`"),
            "default": _error(),
        },
    }


def _get_op(summary: str, ok: Schema, *more: tuple[str, Schema]) -> Schema:
    return {"summary": summary, "responses": {"200": ok, **dict(more), "default": _error()}}


def _paths(shape: DocumentShape) -> dict[str, Schema]:
    paths: dict[str, Schema] = {
        "/v1/chat/completions": {
            "post": _inference_op(
                "Create a chat completion", "ChatCompletionRequest", "ChatCompletionResponse"
            )
        },
        "/v1/completions": {
            "post": _inference_op("Create a completion", "CompletionRequest", "CompletionResponse")
        },
        "/v1/models": {"get": _get_op("List the served models", _json("OK", _MODEL_LIST))},
        "/v1/models/{model}": {
            "get": {
                **_get_op("Describe one model", _json("OK", _ref("Model"))),
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
            }
        },
        "/health": {
            "get": _get_op(
                "Models and whether each can take requests",
                _json("At least one model is ready", _ref("Health")),
                ("503", _json("No model is ready, or shutting down", _ref("Health"))),
            )
        },
        "/live": {
            "get": _get_op(
                "Liveness",
                _json("Serving", _LIVE),
                ("503", _json("Shutting down", _LIVE)),
            )
        },
        "/metrics": {
            "get": _get_op(
                "Prometheus metrics",
                {
                    "description": "The Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
            )
        },
    }
    if shape.control_routes:
        paths["/v1/requests/{id}/stop"] = {
            "post": {
                "summary": "Stop generating for the request in flight with this id (its stream "
                "ends normally)",
                "parameters": [
                    {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {"200": _json("Stopped", _STOPPED), "default": _error()},
            }
        }
    if shape.api_keys:
        for path, ops in paths.items():
            if path.startswith("/v1/") or (shape.protect_metrics and path == "/metrics"):
                for op in ops.values():
                    op["security"] = [{"bearer": []}, {"apiKey": []}]
                    op["responses"]["401"] = _error("A missing or wrong API key")
    return paths


def openapi_document(shape: DocumentShape = DocumentShape()) -> bytes:
    """The document for an app of this shape, as JSON."""
    components = wire_schemas(shape.accepts_unknown_fields)
    if shape.model_names:
        for name in ("ChatCompletionRequest", "CompletionRequest"):
            components[name]["properties"]["model"]["examples"] = list(shape.model_names)
    components |= {
        "Error": _ERROR_SCHEMA,
        "Model": _MODEL_CARD,
        "Health": _HEALTH,
        "Chunk": _CHUNK,
    }
    doc: Schema = {
        "openapi": "3.1.0",
        "info": {"title": "dynamo-llm", "version": __version__},
        "paths": _paths(shape),
        "components": {"schemas": components},
    }
    if shape.api_keys:
        doc["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
        }
    return msgspec.json.encode(doc)
