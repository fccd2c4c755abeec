"""Schemathesis hooks for ``tests/system/schemathesis.toml``: one check of our own.

``positive_data_accepted_within_context`` is schemathesis's ``positive_data_acceptance`` (a
request the document allows is not refused) less one answer: a 400 ``context_length_exceeded``.
Whether the prompt and ``max_tokens`` fit the model's context window (``context_window`` in
``/v1/models``) depends on the prompt's token count, which no schema can state; every other
refusal of a schema-valid request is still a failure.
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance


def _error_code(response: schemathesis.Response) -> object:
    try:
        return json.loads(response.content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


@schemathesis.check
def positive_data_accepted_within_context(
    ctx: schemathesis.CheckContext,
    response: schemathesis.Response,
    case: schemathesis.Case[Any],
) -> bool | None:
    if response.status_code == 400 and _error_code(response) == "context_length_exceeded":
        return None
    return positive_data_acceptance(ctx, response, case)
