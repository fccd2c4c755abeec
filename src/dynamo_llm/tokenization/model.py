"""A model's tokenizer as its engine applies it: ``--tokenizer MODEL_DIR``.

A Hugging Face model folder gives ``tokenizer.json`` (the ``tokenizers`` model), and
``tokenizer_config.json`` (the special tokens, and usually the ``chat_template``) and/or
``chat_template.jinja`` (which wins, as in transformers). :class:`ModelTokenizer` then turns a
request into the token ids vLLM 0.32 computes for it:

- a chat: the template rendered (:mod:`.template`), encoded with ``add_special_tokens=False``
  (transformers' ``apply_chat_template``, which vLLM calls: the template writes the BOS itself);
- a completion: the prompt encoded with ``add_special_tokens=True`` (the ``tokenizer.json``'s
  post-processor adds the BOS, as vLLM's ``tokenizer.encode`` does), or the client's ids as
  they are.

A request that brings its own ``chat_template``, ``add_special_tokens`` or ``documents``
(vLLM's fields, which the router forwards) is left to the engine: its ids are not known here.

A multi-turn chat reuses the ids of the longest prefix encoded before (:mod:`.prefix`). Work
on a long prompt (at least :data:`THREAD_CHARS` characters) runs in a thread: ``encode_batch``
releases the GIL, so the event loop keeps running; a short one is done inline, where a thread
hop would cost more than the work.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import tokenizers

from ..engines.base import EngineRequest
from ..protocols.chat import ChatCompletionRequest, content_text
from .prefix import PrefixCache, Specials, is_cut_safe, specials_of
from .template import ChatTemplate, Untokenizable, vllm_tools

__all__ = ["THREAD_CHARS", "ModelTokenizer"]

log = logging.getLogger("dynamo_llm.tokenization")

THREAD_CHARS = 16 * 1024
"""A prompt with at least this many characters is rendered and encoded in a thread."""

_OWN_TEMPLATING = (b'"chat_template"', b'"add_special_tokens"', b'"documents"')
"""vLLM's request fields that change the prompt's ids; a request with one is not tokenized
(looked for in the client's JSON as it came: a false hit only costs that request's ids)."""

_SPECIAL_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class ModelTokenizer:
    """One model's tokenizer and chat template; see the module docstring."""

    __slots__ = ("_cache", "_specials", "_tokenizer", "path", "special_tokens", "template")

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        template: ChatTemplate | None,
        special_tokens: dict[str, str],
        path: str = "",
        cache: PrefixCache | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self.template = template
        self.special_tokens = special_tokens
        self.path = path
        specials = specials_of(tokenizer)
        self._specials: Specials | None = (
            specials if specials is not None and is_cut_safe(tokenizer, specials) else None
        )
        self._cache = cache if cache is not None else PrefixCache()
        if self._specials is None:
            log.info("tokenizer %s: no safe cut points, the prefix cache is off", path or "?")

    @classmethod
    def load(cls, path: str) -> ModelTokenizer:
        """The tokenizer of the model folder ``path``; ``ValueError`` when it has none."""
        folder = Path(path)
        if not folder.is_dir():
            raise ValueError(f"tokenizer {path!r}: not a model folder")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # the binding raises a bare Exception for missing or bad files
            raise ValueError(f"tokenizer {path!r}: cannot load tokenizer.json: {exc}") from exc
        config: dict[str, Any] = {}
        config_file = folder / "tokenizer_config.json"
        if config_file.exists():
            try:
                config = json.loads(config_file.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"tokenizer {path!r}: tokenizer_config.json: {exc}") from exc
            if not isinstance(config, dict):
                raise ValueError(f"tokenizer {path!r}: tokenizer_config.json is not an object")
        try:
            source = _template_source(folder, config)
        except OSError as exc:
            raise ValueError(f"tokenizer {path!r}: chat_template.jinja: {exc}") from exc
        try:
            template = ChatTemplate(source) if source is not None else None
        except ValueError as exc:
            raise ValueError(f"tokenizer {path!r}: {exc}") from None
        return cls(tokenizer, template=template, special_tokens=_specials(config), path=path)

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The cache of tokenized prefixes; None when this tokenizer cannot cut safely."""
        return self._cache if self._specials is not None else None

    async def prompt_ids(self, request: EngineRequest) -> list[int] | None:
        """The request's prompt token ids as its engine computes them; None when the frontend
        cannot know them (no chat template, an image, a template that refuses the request)."""
        raw = request.raw_body
        if raw is not None and any(key in raw for key in _OWN_TEMPLATING):
            return None  # the client's own template or special-token switch: the engine knows
        try:
            if request.endpoint == "chat_completions":
                if self.template is None:
                    return None
                if _size(request) >= THREAD_CHARS:
                    return await asyncio.to_thread(self.chat_ids, request, True)
                return self.chat_ids(request)
            prompt = request.prompt
            if isinstance(prompt, list):
                return list(prompt)
            if not isinstance(prompt, str):
                return None
            if len(prompt) >= THREAD_CHARS:
                (enc,) = await asyncio.to_thread(self._tokenizer.encode_batch, [prompt])
                return list(enc.ids)
            return list(self._tokenizer.encode(prompt).ids)
        except Untokenizable as exc:
            log.debug("request %s: prompt not tokenized: %s", request.id, exc)
            return None

    def render_chat(self, request: EngineRequest) -> str:
        """The chat request's prompt text (raises :class:`Untokenizable`)."""
        if self.template is None:
            raise Untokenizable("the model has no chat template")
        params = request.params
        tools = None
        extra: dict[str, Any] = {}
        if isinstance(params, ChatCompletionRequest):
            tools = vllm_tools(params.tools)
            if params.reasoning_effort is not None:
                extra["reasoning_effort"] = params.reasoning_effort
                extra["enable_thinking"] = params.reasoning_effort != "none"
            if params.chat_template_kwargs:
                extra.update(params.chat_template_kwargs)
        return self.template.render(
            request.messages,
            special_tokens=self.special_tokens,
            tools=tools,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            extra=extra,
        )

    def chat_ids(self, request: EngineRequest, in_thread: bool = False) -> list[int]:
        """The chat request's ids: its rendered text encoded, reusing a cached prefix."""
        return self.encode_rendered(self.render_chat(request), in_thread)

    def encode_rendered(self, text: str, in_thread: bool = False) -> list[int]:
        """``text`` (a rendered chat) encoded without special tokens added, cached prefix reused.

        ``in_thread``: encode with ``encode_batch``, which releases the GIL while it works.
        """
        specials = self._specials
        if specials is None:
            return self._encode([text], in_thread)[0]
        cuts = specials.cut_points(text)
        cache = self._cache
        hit = cache.longest(text, cuts) if cuts else None
        start, ids = hit if hit is not None else (0, [])
        last = cuts[-1] if cuts else 0
        if last <= start:
            return ids + self._encode([text[start:]], in_thread)[0]
        head, tail = self._encode([text[start:last], text[last:]], in_thread)
        ids += head
        cache.put(text[:last], ids)
        return ids + tail

    def _encode(self, texts: list[str], in_thread: bool) -> list[list[int]]:
        if in_thread:
            return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]
        encode = self._tokenizer.encode
        return [encode(t, add_special_tokens=False).ids for t in texts]

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)


def _template_source(folder: Path, config: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: transformers takes "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _specials(config: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in _SPECIAL_KEYS:
        value = config.get(key)
        if isinstance(value, dict):  # an AddedToken written out
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def _size(request: EngineRequest) -> int:
    """About how many characters the chat renders to: the client's JSON when it is there (its
    tools are rendered too, and may be far longer than the messages), else the messages."""
    if request.raw_body is not None:
        return len(request.raw_body)
    return sum(len(content_text(m.content)) for m in request.messages)
