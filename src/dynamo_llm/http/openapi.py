"""The OpenAPI 3.1 description served at ``/openapi.json``, generated from the wire models."""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from .. import __version__
from ..protocols.chat import ChatCompletionRequest
from ..protocols.completions import CompletionRequest

_ERROR_SCHEMA = {
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


def _inference_op(summary: str, schema: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "parameters": [
            {
                "name": "X-Request-Id",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
            }
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        },
        "responses": {
            "200": {
                "description": "A completion (JSON), or a stream of server-sent events when "
                "`stream` is true, ending with `data: [DONE]` or an `event: error` frame",
                "content": {"application/json": {}, "text/event-stream": {}},
            },
            "default": _error_response(),
        },
    }


def _error_response() -> dict[str, Any]:
    return {
        "description": "An OpenAI-shaped error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _get_op(summary: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "responses": {"200": {"description": "OK"}, "default": _error_response()},
    }


@functools.cache
def openapi_document() -> bytes:
    (_, components) = msgspec.json.schema_components(
        [ChatCompletionRequest, CompletionRequest], ref_template="#/components/schemas/{name}"
    )
    components["Error"] = _ERROR_SCHEMA
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "dynamo-llm", "version": __version__},
        "paths": {
            "/v1/chat/completions": {
                "post": _inference_op("Create a chat completion", "ChatCompletionRequest")
            },
            "/v1/completions": {"post": _inference_op("Create a completion", "CompletionRequest")},
            "/v1/models": {"get": _get_op("List the served models")},
            "/v1/models/{model}": {
                "get": {
                    **_get_op("Describe one model"),
                    "parameters": [
                        {
                            "name": "model",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                }
            },
            "/health": {"get": _get_op("Models and whether each can take requests (503 if none)")},
            "/live": {"get": _get_op("Liveness (503 while shutting down)")},
            "/metrics": {"get": _get_op("Prometheus metrics")},
        },
        "components": {"schemas": components},
    }
    return msgspec.json.encode(doc)
