"""A unary answer taken whole: a one-choice request asked of its worker as unary, passed on.

A unary client's request is normally asked of the worker as a stream, whose events are parsed
and folded into one response (:mod:`dynamo_llm.http.aggregate`): every time limit watches the
events, and a migration replays what they said. When nothing needs them (the router decides:
the worker is one of ours, which stops generating when the connection closes, as real engines
do not for a unary request; no migration, no silence limit: :mod:`dynamo_llm.router.attempt`)
and the request has one choice (no ``n > 1``, no batch of prompts),
:meth:`~.client.WorkerClient.open_answer` asks the worker for a unary answer instead (``stream``
as the client sent it, no ``stream_options``) and its body becomes the stream's one output
(``EngineOutput.response``), which the frontend sends as it is.

Nothing in the answer is parsed into outputs or folded. Its body is decoded once into a small
shape that checks it is a completion and reads what the frontend needs: the id and the model
name, rewritten in the bytes to ours as the raw relay does (:mod:`.relay`; decoded and
re-encoded only when the worker spelt them otherwise), and the usage, for the metrics. Every
other key reaches the client as the worker wrote it: tool calls, logprobs, reasoning, the
engine's own keys, and the usage as the engine counted it (absent when it sent none, unless
the answer carries every token id, the client having asked for them: then counted from them, as
for a stream).

Errors are those of a stream's admission (an error status, a refused or dropped connection:
:mod:`.errors`), plus: a 2xx whose body is an error object is the worker's error; an empty body
is :class:`~dynamo_llm.errors.UpstreamNoStream` (the worker answered, badly: probed, not
quarantined); a body that is not a JSON completion, or is larger than :data:`MAX_ANSWER`, is
an ``upstream_error``; the connection dropping before the body ended is
:class:`~dynamo_llm.errors.WorkerDisconnected`. A worker that streams anyway (an event stream to
``stream: false``) is read as a parsed stream, as before.

The body is read to its end over the request's own :mod:`.h1` connection, which then goes back
to its pool. A stop or kill of the attempt's context closes the connection at once, which is all
a worker learns from (there are no events to stop between).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Any

import msgspec

from ..engines.base import EngineOutput, Usage
from ..errors import Cancelled, UpstreamError, WorkerDisconnected
from ..protocols.common import UsageInfo, usage_info
from ..runtime.context import EngineContext
from .errors import describe, error_from_worker, no_stream_error
from .h1 import Connection, H1Error

__all__ = ["MAX_ANSWER", "one_output", "read_answer", "whole_answer"]

log = logging.getLogger("dynamo_llm.transport")


class _Choice(msgspec.Struct):
    finish_reason: str | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


class _Answer(msgspec.Struct):
    """What the frontend reads of a worker's unary answer (the rest is skipped)."""

    id: str | None = None
    object: str | None = None
    model: str | None = None
    choices: list[_Choice] | None = None
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None
    error: Any = None


_answer_decoder = msgspec.json.Decoder(_Answer)
_encode = msgspec.json.encode


MAX_ANSWER = 256 * 1024 * 1024
"""The largest answer body read (a worker gone wrong cannot make one request hold more). Far
above a real answer: a long generation with top-20 logprobs comes to tens of MB."""


async def read_answer(conn: Connection, ctx: EngineContext) -> bytes:
    """The whole body of the answer on ``conn``, which goes back to its pool once read to its
    end and is closed otherwise; a stop of ``ctx`` closes it at once and cancels."""
    remove = ctx.on_stop(lambda _ctx: conn.close())
    parts: list[bytes] = []
    size = 0
    complete = False
    try:
        while part := await conn.read_any(MAX_ANSWER):
            size += len(part)
            if size > MAX_ANSWER:
                raise UpstreamError(f"The worker's answer is larger than {MAX_ANSWER} bytes")
            parts.append(part)
        complete = True
    except H1Error as exc:
        if ctx.is_stopped:
            raise Cancelled(f"Context id {ctx.id} is stopped or killed") from None
        raise WorkerDisconnected(
            f"The worker's connection dropped before its answer ended: {describe(exc)}"
        ) from exc
    finally:
        remove()
        if complete:
            conn.release()
        else:
            conn.close()
    return parts[0] if len(parts) == 1 else b"".join(parts)


def whole_answer(status: int, body: bytes, *, response_id: str, model: str) -> EngineOutput:
    """The one output of a worker's unary answer ``body`` (see the module doc)."""
    if not body.strip():
        raise no_stream_error(status, "", body)
    try:
        answer = _answer_decoder.decode(body)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        raise _malformed(body) from None
    if answer.error is not None or answer.object == "error":
        raise error_from_worker(None, body)
    if not answer.choices:
        raise _malformed(body)
    choice = answer.choices[0]
    usage = answer.usage
    counts = None
    if usage is not None:
        details = usage.prompt_tokens_details
        counts = Usage(
            usage.prompt_tokens,
            usage.completion_tokens,
            details.cached_tokens if details is not None else None,
        )
    response = _renamed(body, answer, response_id, model)
    if counts is None and choice.token_ids is not None:
        # No usage, but every token id (the client asked for them): the counts are exact.
        prompt_ids = answer.prompt_token_ids or choice.prompt_token_ids
        counts = Usage(None if prompt_ids is None else len(prompt_ids), len(choice.token_ids))
        response = _with_usage(response, counts)
    return EngineOutput(
        # Unknown: at least one, the lower bound a stream's event counts for too.
        num_tokens=(counts and counts.completion_tokens) or 1,
        finish_reason=choice.finish_reason,
        usage=counts,
        prompt_tokens=counts.prompt_tokens if counts is not None else None,
        response=response,
    )


async def one_output(out: EngineOutput) -> AsyncGenerator[EngineOutput, None]:
    """A stream of the one output ``out``."""
    yield out


def _renamed(body: bytes, answer: _Answer, response_id: str, model: str) -> bytes:
    """``body`` with our id and model name in place of the worker's."""
    renamed: bytes | None = body
    if answer.id != response_id:
        renamed = _replace_value(body, b'"id"', answer.id, response_id)
    if renamed is not None and answer.model != model:
        renamed = _replace_value(renamed, b'"model"', answer.model, model)
    if renamed is not None:
        return renamed
    # Spelt otherwise (escapes, spacing) or left out: rewritten through the decoded object.
    obj = msgspec.json.decode(body)
    obj["id"] = response_id
    obj["model"] = model
    return _encode(obj)


def _with_usage(body: bytes, usage: Usage) -> bytes:
    """``body`` (a JSON object) with a ``usage`` key for ``usage`` last."""
    end = body.rstrip()
    return end[:-1] + b',"usage":' + _encode(usage_info(usage)) + b"}"


def _replace_value(body: bytes, key: bytes, old: str | None, new: str) -> bytes | None:
    """``body`` with the first ``key: old`` (either JSON spacing) holding ``new``; None if
    there is none."""
    if old is None:
        return None
    value = _encode(old)
    for sep in (b":", b": "):
        needle = key + sep + value
        at = body.find(needle)
        if at >= 0:
            return b"".join((body[:at], key, sep, _encode(new), body[at + len(needle) :]))
    return None


def _malformed(body: bytes) -> UpstreamError:
    """The error for a 2xx body that is not a completion; the bytes go to the log only."""
    log.warning("a worker sent a malformed answer: %r", body[:200])
    return UpstreamError("The worker sent a malformed answer (not a JSON completion object)")
