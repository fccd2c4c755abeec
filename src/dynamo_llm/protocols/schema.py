"""JSON Schema of the wire models, stating every constraint the validators enforce.

msgspec generates the shapes (field names, types, which are required); this module adds what the
validators of :mod:`.chat`, :mod:`.completions` and :mod:`.common` check beyond the types, from
the same constants: ranges, non-empty strings and lists, the roles, the bounded ``stop`` list, and
the rules that tie two fields together (``stream_options`` only with ``stream: true``; a
completions batch times ``n`` at most ``MAX_N``; ``best_of`` at least ``n``), written as
``if``/``then`` clauses. The aim is an exact description: a request the schema allows is not
refused for its shape, and one it forbids is refused (a schema fuzzer checks both,
``tests/system/test_schema_fuzz.py``).

Unknown top-level fields are the serving engine's call (:mod:`.common`): ``accepts_unknown``
says whether the document allows them (the router forwards them) or forbids them (an in-process
engine refuses them). Nested objects (messages, content parts, tools) always allow unknown keys.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from .chat import MAX_TOP_LOGPROBS, ROLES, ChatCompletionRequest, ChatCompletionResponse
from .common import (
    LOGIT_BIAS_RANGE,
    MAX_N,
    MAX_REPETITION_PENALTY,
    MAX_STOP,
    SAMPLING_RANGES,
    WHITESPACE,
)
from .completions import MAX_BEST_OF, MAX_LOGPROBS, CompletionRequest, CompletionResponse

__all__ = ["NON_BLANK", "wire_schemas"]

REF = "#/components/schemas/{name}"

NON_BLANK = "[^" + WHITESPACE + "]"
"""A string holding at least one character ``str.strip()`` would keep (``model`` must)."""

Schema = dict[str, Any]


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}], "default": None}


def _int(minimum: int | None = None, maximum: int | None = None) -> Schema:
    schema: Schema = {"type": "integer"}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    return schema


def _number(low: float, high: float) -> Schema:
    return {"type": "number", "minimum": low, "maximum": high}


_STOP = _nullable(
    {
        "anyOf": [
            {"type": "string", "minLength": 1},
            {
                "type": "array",
                "maxItems": MAX_STOP,
                "items": {"type": "string", "minLength": 1},
            },
        ]
    }
)

# A prompt of token ids (non-negative), and one prompt of a batch.
_TOKENS: Schema = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
_BATCH_ITEM: Schema = {"anyOf": [{"type": "string", "minLength": 1}, _TOKENS]}

# stream_options is refused unless stream is true (null stream_options is no option at all).
_STREAM_OPTIONS_NEED_STREAM: Schema = {
    "anyOf": [
        {"properties": {"stream_options": {"type": "null"}}},
        {"properties": {"stream": {"const": True}}, "required": ["stream"]},
    ]
}


def _sampling() -> dict[str, Schema]:
    """The fields :func:`~.common.check_sampling` checks, for both endpoints."""
    low, high = LOGIT_BIAS_RANGE
    props = {name: _nullable(_number(lo, hi)) for name, (lo, hi) in SAMPLING_RANGES.items()}
    props |= {
        "logit_bias": _nullable({"type": "object", "additionalProperties": _number(low, high)}),
        "n": _nullable(_int(1, MAX_N)),
        "max_tokens": _nullable(_int(1)),
        "stop": _STOP,
        "top_k": _nullable({"type": "integer", "anyOf": [{"const": -1}, {"minimum": 1}]}),
        "repetition_penalty": _nullable(
            {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_REPETITION_PENALTY}
        ),
        "min_tokens": _nullable(_int(0)),
    }
    return props


def _batch_times_n() -> Schema:
    """A completions batch of ``b`` prompts allows ``n`` up to ``MAX_N // b``: one branch per
    run of batch sizes with the same bound (a batch holds at most ``MAX_N`` prompts), and one
    for a single prompt (a string or one list of token ids)."""
    branches: list[Schema] = [
        {"properties": {"prompt": {"anyOf": [{"type": "string"}, _TOKENS]}}},
    ]
    size = 1
    while size <= MAX_N:
        bound = MAX_N // size
        last = MAX_N // bound
        batch = {"type": "array", "minItems": size, "maxItems": last, "items": _BATCH_ITEM}
        branches.append({"properties": {"prompt": batch, "n": _nullable(_int(1, bound))}})
        size = last + 1
    return {"anyOf": branches}


def _best_of_at_least_n() -> Schema:
    """``best_of``, when set, is at least ``n`` (1 when ``n`` is not set), so at least 1."""
    branches: list[Schema] = [{"properties": {"best_of": {"type": "null"}}}]
    branches += [
        {
            "properties": {"best_of": {"const": k}, "n": _nullable(_int(1, k))},
            "required": ["best_of"],
        }
        for k in range(1, MAX_BEST_OF + 1)
    ]
    return {"anyOf": branches}


def _prompt() -> Schema:
    text = {"type": "string", "minLength": 1}
    return {
        "anyOf": [
            text,
            _TOKENS,
            {"type": "array", "minItems": 1, "maxItems": MAX_N, "items": text},
            {"type": "array", "minItems": 1, "maxItems": MAX_N, "items": _TOKENS},
        ]
    }


def _constrain(schema: Schema, props: dict[str, Schema], rules: list[Schema], open_: bool) -> None:
    schema["properties"].update(props)
    if rules:
        schema["allOf"] = rules
    if open_:
        schema.pop("additionalProperties", None)


@functools.cache
def _components(accepts_unknown: bool) -> dict[str, Schema]:
    (_, components) = msgspec.json.schema_components(
        [ChatCompletionRequest, CompletionRequest, ChatCompletionResponse, CompletionResponse],
        ref_template=REF,
    )
    model = {"type": "string", "pattern": NON_BLANK}
    chat = components["ChatCompletionRequest"]
    _constrain(
        chat,
        {
            "model": model,
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": {"$ref": REF.format(name="ChatMessage")},
            },
            **_sampling(),
            "top_logprobs": _nullable(_int(0, MAX_TOP_LOGPROBS)),
            "max_completion_tokens": _nullable(_int(1)),
            # Deprecated: refused with 501 whatever their value (so only null is allowed).
            "functions": {"type": "null", "default": None, "deprecated": True},
            "function_call": {"type": "null", "default": None, "deprecated": True},
        },
        [_STREAM_OPTIONS_NEED_STREAM],
        accepts_unknown,
    )
    components["ChatMessage"]["properties"]["role"] = {"type": "string", "enum": sorted(ROLES)}
    completion = components["CompletionRequest"]
    _constrain(
        completion,
        {
            "model": model,
            "prompt": _prompt(),
            **_sampling(),
            "logprobs": _nullable(_int(0, MAX_LOGPROBS)),
            "best_of": _nullable(_int(1, MAX_BEST_OF)),
        },
        [_STREAM_OPTIONS_NEED_STREAM, _batch_times_n(), _best_of_at_least_n()],
        accepts_unknown,
    )
    return components


def wire_schemas(accepts_unknown: bool) -> dict[str, Schema]:
    """The components of the wire models (requests and unary responses), by name; a fresh copy
    the caller may change."""
    copy: dict[str, Schema] = msgspec.json.decode(msgspec.json.encode(_components(accepts_unknown)))
    return copy
