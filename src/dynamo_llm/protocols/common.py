"""What the chat and completions wire models share: decoding, validation, usage.

Decoding is on every request's path, so the happy path is one typed ``msgspec`` decode straight
into the request Struct, whose ``forbid_unknown_fields`` also catches unknown top-level fields
(nested Structs stay lenient: OpenAI SDKs send keys we do not model inside messages and tools).
Only when that decode fails do we spend more: the body is decoded again untyped to tell the
problems apart, so that a body with several reports the first in a fixed order::

    JSON syntax -> not an object -> unknown fields (all of them) -> wrong type / missing field

msgspec stops at the first problem it meets in document order, which is why the typed error is
not reported as it is. A number with a zero fraction where an integer belongs (``"n": 2.0``) is an
integer, as JSON Schema (and so ``/openapi.json``) says: that path decodes once more with such
numbers made ints before it reports a type error.

**Unknown fields are the serving engine's call.** An engine that passes the request on to a
worker (the router) forwards what it does not know (``cache_prompt``, ``guided_json``, any
``extra_body`` field): for a model it serves, the ``accepts_unknown(model)`` predicate says yes
and the body is decoded a third time into the request Struct's lenient twin, which validates the
known fields exactly as strictly and ignores the rest (they travel on in the raw body, byte for
byte: :func:`decode_object`). An engine that serves the request itself cannot honour a field it does
not know, so for its models an unknown field stays a 400 ``unsupported_parameter`` that names it
(at most :data:`MAX_LISTED` names, each cut to :data:`MAX_NAME` characters, are echoed). A body
without unknown fields costs the same one decode either way.

After decoding, each endpoint checks deprecated fields (501) and then the values; the value
checks shared by both endpoints are :func:`check_sampling`.

Every message starts with ``Validation:``, Dynamo's wording, so runbooks and the metrics
classification carry over.
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable
from typing import Any, Generic, NoReturn, Protocol, TypeVar

import msgspec

from ..errors import InvalidRequest

MAX_N = 128
MAX_STOP = 32
SAMPLING_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0, 2),
    "top_p": (0, 1),
    "frequency_penalty": (-2, 2),
    "presence_penalty": (-2, 2),
    "min_p": (0, 1),
}
"""The inclusive ranges of the sampling fields both endpoints take (OpenAI's; ``min_p`` is
vLLM's): checked by :func:`check_sampling` and stated in ``/openapi.json``."""
LOGIT_BIAS_RANGE = (-100, 100)
MAX_REPETITION_PENALTY = 2
"""``repetition_penalty`` is greater than 0 and at most this."""
WHITESPACE = "".join(c for c in map(chr, range(0x3001)) if c.isspace())
"""What ``str.strip()`` removes: a ``model`` of these characters only is empty (the OpenAPI
document's pattern for ``model`` is built from the same set, so the two agree exactly)."""
MAX_LISTED = 8
"""How many unknown field names an ``unsupported_parameter`` error lists (the rest are counted)."""
MAX_NAME = 64
"""How much of an unknown field's name an error echoes."""

AcceptsUnknown = Callable[[str], bool]
"""Whether the model named may be sent fields we do not know (its engine forwards them)."""


class StreamOptions(msgspec.Struct, omit_defaults=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int | None = None


class UsageInfo(msgspec.Struct, omit_defaults=True):
    """Token usage of a response or of a stream's usage chunk; a field is omitted when None.

    We write every count; the counts are optional for reading a worker's usage, which may leave
    one out or send ``null`` (vLLM's ``completion_tokens`` may be null).
    """

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    prompt_tokens_details: PromptTokensDetails | None = None


class UsageCounts(Protocol):
    """Token counts as an engine reports them (``engines.base.Usage``); None: not known."""

    @property
    def prompt_tokens(self) -> int | None: ...
    @property
    def completion_tokens(self) -> int | None: ...
    @property
    def cached_tokens(self) -> int | None: ...
    @property
    def extra(self) -> dict[str, Any] | None: ...


def usage_info(usage: UsageCounts | None) -> dict[str, Any] | None:
    """The wire usage for these counts; None when no count is known (the usage is left out).

    The one shape of usage on the wire (a unary response's and a stream's usage chunk): the
    known counts, ``total_tokens`` when both are known, the cached prompt tokens in
    ``prompt_tokens_details`` beside the worker's own details, then the worker's other keys.
    A count nobody knows is left out, never written as 0.
    """
    if usage is None:
        return None
    prompt, completion = usage.prompt_tokens, usage.completion_tokens
    if prompt is None and completion is None:
        return None
    info: dict[str, Any] = {}
    if prompt is not None:
        info["prompt_tokens"] = prompt
    if completion is not None:
        info["completion_tokens"] = completion
    if prompt is not None and completion is not None:
        info["total_tokens"] = prompt + completion
    extra = usage.extra or {}
    details = extra.get("prompt_tokens_details")
    details = dict(details) if isinstance(details, dict) else {}
    if usage.cached_tokens is not None:
        details["cached_tokens"] = usage.cached_tokens
    if details:
        info["prompt_tokens_details"] = details
    for key, value in extra.items():
        if key not in info and key != "prompt_tokens_details":
            info[key] = value
    return info


# --- decoding ----------------------------------------------------------------------------------


S = TypeVar("S", bound=msgspec.Struct)


class RequestDecoder(Generic[S]):
    """Decodes and explains one request Struct (declared with ``forbid_unknown_fields``).

    A body with unknown top-level fields is refused, naming them, unless ``accepts_unknown``
    says its ``model``'s engine forwards them: it is then decoded into the Struct's lenient twin
    (a subclass that ignores them), whose known fields are checked exactly as strictly.
    """

    __slots__ = ("_fields", "_lenient", "_strict")

    def __init__(self, cls: type[S]) -> None:
        twin = types.new_class(f"Lenient{cls.__name__}", (cls,), {"forbid_unknown_fields": False})
        self._strict = msgspec.json.Decoder(cls)
        self._lenient: msgspec.json.Decoder[S] = msgspec.json.Decoder(twin)
        self._fields = struct_fields(cls)

    def decode(self, body: bytes, accepts_unknown: AcceptsUnknown | None = None) -> S:
        """``body`` as the Struct; every failure an :class:`InvalidRequest`."""
        try:
            return self._strict.decode(body)
        except msgspec.ValidationError as exc:
            error = exc
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise _invalid_json(exc) from exc
        obj = _untyped(body, error)
        if isinstance(obj, InvalidRequest):
            raise obj from error
        unknown = sorted(key for key in obj if key not in self._fields)
        decoder = self._strict
        if unknown:
            model = obj.get("model")
            if accepts_unknown is None or not isinstance(model, str) or not accepts_unknown(model):
                raise _unsupported(unknown) from error
            decoder = self._lenient
            try:
                return decoder.decode(body)
            except msgspec.ValidationError as exc:
                error = exc
        # A number with no fractional part is an integer (as JSON Schema says): ``"n": 2.0``.
        whole = _whole_numbers(obj)
        if whole is obj:
            raise _from_validation_error(str(error)) from error
        try:
            return decoder.decode(msgspec.json.encode(whole))
        except msgspec.ValidationError as exc:
            raise _from_validation_error(str(exc)) from exc


def decode_object(body: bytes | None) -> dict[str, Any] | None:
    """The members of ``body``, each value still the JSON text the client wrote (a
    ``msgspec.Raw``), for an engine to patch and pass on: replace the keys to change, encode the
    dict, and every other value goes on byte for byte (unknown fields, keys nested in messages,
    numbers as written). None when there is no body or it is not a JSON object."""
    if body is None:
        return None
    try:
        return _decode_members(body)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        return None


_decode_members = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode


def struct_fields(cls: type[msgspec.Struct]) -> frozenset[str]:
    return frozenset(f.encode_name for f in msgspec.structs.fields(cls))


def peek_model(body: bytes) -> str | None:
    """The ``model`` of a body that may be invalid, for labelling its error; never raises."""
    return peek_request(body)[0]


def peek_request(body: bytes) -> tuple[str | None, bool]:
    """``(model, stream)`` of a body that may be invalid, for labelling its error; never raises.

    ``model`` is None unless it is a string; ``stream`` is True only for a literal ``true``.
    """
    try:
        peek = _peek_decoder.decode(body)
    except Exception:  # garbage in any shape is an expected input here
        return None, False
    model = peek.model if isinstance(peek.model, str) else None
    return model, peek.stream is True


class _Peek(msgspec.Struct):
    model: Any = None
    stream: Any = None


_peek_decoder = msgspec.json.Decoder(_Peek)

# msgspec's ValidationError text: "<message>" or "<message> - at `$<path>`".
_ERROR_RE = re.compile(r"(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?", re.DOTALL)
_EXPECTED_RE = re.compile(r"Expected `(?P<expected>[^`]+)`, got `(?P<got>[^`]+)`")
_MISSING_RE = re.compile(r"Object missing required field `(?P<field>[^`]+)`")
_UNKNOWN_RE = re.compile(r"Object contains unknown field `(?P<field>[^`]+)`")
_TOP_LEVEL_RE = re.compile(r"[^.\[]*")


def _invalid_json(exc: Exception) -> InvalidRequest:
    reason = "JSON nesting is too deep" if isinstance(exc, RecursionError) else str(exc)
    return InvalidRequest(f"Validation: Invalid JSON body: {reason}", code="invalid_json")


def _untyped(body: bytes, exc: msgspec.ValidationError) -> dict[str, Any] | InvalidRequest:
    """The body decoded untyped, to tell its problems apart; or the error to report."""
    try:
        obj = msgspec.json.decode(body)
    except msgspec.ValidationError:
        # Well-formed JSON holding a number no float can represent (1e400): the typed error
        # says where it is, or names what msgspec met before it.
        return _from_validation_error(str(exc))
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as syntax:
        return _invalid_json(syntax)
    if not isinstance(obj, dict):
        return _not_an_object()
    return obj


def _whole_numbers(value: Any) -> Any:
    """``value`` with every float that has no fractional part made an int; ``value`` itself
    when it holds none (so the caller can tell nothing changed)."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        items = {key: _whole_numbers(item) for key, item in value.items()}
        changed = any(items[key] is not item for key, item in value.items())
        return items if changed else value
    if isinstance(value, list):
        elements = [_whole_numbers(item) for item in value]
        changed = any(new is not old for new, old in zip(elements, value, strict=True))
        return elements if changed else value
    return value


def _not_an_object() -> InvalidRequest:
    return InvalidRequest("Validation: The request body must be a JSON object", code="invalid_json")


def _unsupported(names: list[str]) -> InvalidRequest:
    """The error naming unknown fields: a bounded list however many the body holds."""
    listed = ", ".join(f"`{_cut(name)}`" for name in names[:MAX_LISTED])
    if len(names) > MAX_LISTED:
        listed += f" and {len(names) - MAX_LISTED} more"
    return InvalidRequest(
        f"Validation: Unsupported parameter(s): {listed}",
        param=_cut(names[0]),
        code="unsupported_parameter",
    )


def _cut(name: str) -> str:
    return name if len(name) <= MAX_NAME else name[: MAX_NAME - 3] + "..."


def _from_validation_error(text: str) -> InvalidRequest:
    match = _ERROR_RE.fullmatch(text)
    assert match is not None  # the pattern matches any string
    message = match["message"]
    path = (match["path"] or "").removeprefix(".")
    if unknown := _UNKNOWN_RE.fullmatch(message):
        return _unsupported([unknown["field"]])
    if not path and message.startswith("Expected `object`"):
        return _not_an_object()
    if missing := _MISSING_RE.fullmatch(message):
        full = f"{path}.{missing['field']}" if path else missing["field"]
        return InvalidRequest(
            f"Validation: Missing required parameter: `{full}`",
            param=_top_level(full),
            code="missing_required_parameter",
        )
    if expected := _EXPECTED_RE.fullmatch(message):
        kinds = [kind for kind in expected["expected"].split(" | ") if kind != "null"]
        return InvalidRequest(
            f"Validation: Invalid type for `{path}`: expected {' or '.join(kinds)}, "
            f"got {expected['got']}",
            param=_top_level(path) or None,
            code="invalid_type",
        )
    # Anything else msgspec can say about a value (e.g. "Number out of range").
    reason = message[:1].lower() + message[1:]
    return InvalidRequest(
        f"Validation: Invalid value for `{path}`: {reason}",
        param=_top_level(path) or None,
        code="invalid_value",
    )


def _top_level(path: str) -> str:
    match = _TOP_LEVEL_RE.match(path)
    return match[0] if match else path


# --- value checks ------------------------------------------------------------------------------


def invalid_value(message: str, param: str | None) -> NoReturn:
    raise InvalidRequest(f"Validation: {message}", param=param, code="invalid_value")


def invalid_type(message: str, param: str | None) -> NoReturn:
    raise InvalidRequest(f"Validation: {message}", param=param, code="invalid_type")


def check_range(name: str, value: float | None, low: float, high: float) -> None:
    # Written so that NaN fails: every comparison with NaN is false.
    if value is not None and not low <= value <= high:
        invalid_value(
            f"{name} must be between {low:g} and {high:g}, got {_format_number(value)}", name
        )


def _format_number(value: float) -> str:
    """A number as a client wrote it: JSON ``3`` decodes into a float field as 3.0."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return str(value)


def check_positive(name: str, value: int | None) -> None:
    if value is not None and not value > 0:
        invalid_value(f"{name} must be greater than 0, got {value}", name)


def check_model(model: str) -> None:
    if not model.strip():
        invalid_value("The 'model' field cannot be empty.", "model")


class SamplingFields(Protocol):
    """The request fields both endpoints validate the same way."""

    temperature: float | None
    top_p: float | None
    frequency_penalty: float | None
    presence_penalty: float | None
    logit_bias: dict[str, float] | None
    n: int | None
    max_tokens: int | None
    stop: str | list[str] | None
    stream: bool | None
    stream_options: StreamOptions | None
    top_k: int | None
    min_p: float | None
    repetition_penalty: float | None
    min_tokens: int | None


def check_sampling(req: SamplingFields) -> None:
    """Range checks shared by chat and completions (ranges are OpenAI's, extras are Dynamo's)."""
    for name, (low, high) in SAMPLING_RANGES.items():
        check_range(name, getattr(req, name), low, high)
    if req.logit_bias:
        low, high = LOGIT_BIAS_RANGE
        for bias in req.logit_bias.values():
            if not low <= bias <= high:
                invalid_value(
                    f"logit_bias values must be between {low} and {high}, "
                    f"got {_format_number(bias)}",
                    "logit_bias",
                )
    check_range("n", req.n, 1, MAX_N)
    check_positive("max_tokens", req.max_tokens)
    _check_stop(req.stop)
    if req.stream_options is not None and req.stream is not True:
        invalid_value(
            "The 'stream_options' field is only allowed when 'stream' is set to true.",
            "stream_options",
        )
    if req.top_k is not None and req.top_k != -1 and req.top_k < 1:
        invalid_value(f"top_k must be -1 (disabled) or at least 1, got {req.top_k}", "top_k")
    penalty = req.repetition_penalty
    if penalty is not None and not 0 < penalty <= MAX_REPETITION_PENALTY:
        invalid_value(
            f"repetition_penalty must be greater than 0 and at most {MAX_REPETITION_PENALTY}, "
            f"got {_format_number(penalty)}",
            "repetition_penalty",
        )
    if req.min_tokens is not None and req.min_tokens < 0:
        invalid_value(f"min_tokens must be at least 0, got {req.min_tokens}", "min_tokens")


def _check_stop(stop: str | list[str] | None) -> None:
    if stop is None:
        return
    entries = [stop] if isinstance(stop, str) else stop
    if len(entries) > MAX_STOP:
        invalid_value(f"stop must have at most {MAX_STOP} entries", "stop")
    if not all(entries):
        invalid_value("stop entries must not be empty", "stop")


class _HasStop(Protocol):
    @property
    def stop(self) -> str | list[str] | None: ...


def stop_list(req: _HasStop) -> tuple[str, ...]:
    """The request's stop sequences as a tuple: a string becomes a 1-tuple, None becomes ()."""
    stop = req.stop
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    return tuple(stop)
