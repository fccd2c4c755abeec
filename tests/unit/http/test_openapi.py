"""What ``/openapi.json`` says depends on how the app runs: unknown fields, model names, API keys
and the worker's stop route."""

from __future__ import annotations

import json
from typing import Any

from dynamo_llm.http.openapi import DocumentShape, openapi_document


def _doc(**shape: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(openapi_document(DocumentShape(**shape)))
    return doc


def test_the_plain_document_forbids_unknown_fields_and_needs_no_key() -> None:
    doc = _doc()
    schemas = doc["components"]["schemas"]
    assert schemas["ChatCompletionRequest"]["additionalProperties"] is False
    assert "securitySchemes" not in doc["components"]
    assert "/v1/requests/{id}/stop" not in doc["paths"]
    assert "examples" not in schemas["ChatCompletionRequest"]["properties"]["model"]


def test_a_router_allows_unknown_fields_and_names_its_models() -> None:
    schemas = _doc(accepts_unknown_fields=True, model_names=("llama", "qwen"))["components"][
        "schemas"
    ]
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        assert "additionalProperties" not in schemas[name]
        assert schemas[name]["properties"]["model"]["examples"] == ["llama", "qwen"]


_EITHER_KEY: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]


def test_with_api_keys_every_v1_operation_needs_a_bearer_or_an_x_api_key() -> None:
    doc = _doc(api_keys=True, control_routes=True)
    assert doc["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
    }
    for path, ops in doc["paths"].items():
        for op in ops.values():
            if path.startswith("/v1/"):
                assert op["security"] == _EITHER_KEY, path
                assert "401" in op["responses"], path
            else:
                assert "security" not in op, path
    assert "post" in doc["paths"]["/v1/requests/{id}/stop"]


def test_with_protected_metrics_the_metrics_operation_needs_a_key_and_the_probes_do_not() -> None:
    paths = _doc(api_keys=True, protect_metrics=True)["paths"]
    assert paths["/metrics"]["get"]["security"] == _EITHER_KEY
    for path in ("/health", "/live"):
        assert "security" not in paths[path]["get"], path
