"""A model's chat template, rendered as vLLM 0.32 renders it for a chat request.

vLLM hands the template to transformers' ``apply_chat_template``; this module does what those
two do for a text-only chat, so that the frontend's prompt is byte for byte the engine's:

- the environment is transformers' (``_compile_jinja_template``): jinja2's
  ``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and ``lstrip_blocks``, the
  ``loopcontrols`` extension, a ``{% generation %}`` tag that renders its body, ``tojson`` that
  does not escape HTML (``json.dumps``, ``ensure_ascii=False``), and the globals
  ``raise_exception`` and ``strftime_now``;
- the variables are ``messages``, ``tools`` (None without tools), ``documents`` (None),
  ``add_generation_prompt``, the tokenizer's special tokens (``bos_token``, ``eos_token``, ...),
  and the request's ``chat_template_kwargs`` (and ``reasoning_effort``) that the template uses;
- the messages are vLLM's ``parse_chat_messages`` of the client's: with a template that does not
  loop over a message's content (vLLM's "string" content format) a content of parts becomes its
  text parts joined by newlines and no content becomes ``""``; with one that does ("openai"),
  every content becomes a list of ``{"type": "text", "text": ...}`` parts. An assistant's
  ``tool_calls`` keep their shape with ``arguments`` decoded from JSON to an object (``{}`` when
  empty or not an object), a tool message keeps ``tool_call_id``, ``name`` is kept, and a
  ``developer`` message becomes ``system`` when the template does not name that role;
- a tool is what vLLM's ``ChatCompletionToolsParam.model_dump()`` gives:
  ``{"type", "function": {"name", "description", "parameters"[, "strict"]}}``;
- ``continue_final_message`` leaves the last message open, with transformers' tag trick.

A content part that is not text (an image) makes the prompt one the frontend cannot know:
:class:`Untokenizable` is raised, and the caller leaves the request to the engine.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.sandbox

from ..protocols.chat import ChatMessage

__all__ = ["ChatTemplate", "Untokenizable", "vllm_tools"]


class Untokenizable(Exception):
    """The request's prompt is not one the frontend can render (a template error, an image)."""


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks assistant text with it."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render", [], [], None, None)
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "

_ARGUMENTS = frozenset(("messages", "tools", "documents", "add_generation_prompt"))
"""The variables :meth:`ChatTemplate.render` passes itself."""


class ChatTemplate:
    """One compiled chat template, with what vLLM reads from it once."""

    __slots__ = ("_template", "content_format", "names_developer", "source", "variables")

    def __init__(self, source: str) -> None:
        env = _environment()
        try:
            ast = env.parse(source)
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise ValueError(f"the chat template does not compile: {exc}") from exc
        self.source = source
        self.variables = frozenset(jinja2.meta.find_undeclared_variables(ast))
        self.content_format = "openai" if _loops_over_content(ast) else "string"
        self.names_developer = '"developer"' in source or "'developer'" in source

    def render(
        self,
        messages: Sequence[ChatMessage],
        *,
        special_tokens: Mapping[str, str],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text; raises :class:`Untokenizable` when it cannot be rendered."""
        conversation = self.conversation(messages)
        if not conversation:
            raise Untokenizable("no messages")
        kwargs: dict[str, Any] = dict(special_tokens)
        if extra:
            variables = self.variables
            kwargs.update(
                (k, v)
                for k, v in extra.items()
                if k in variables and k not in ("chat_template", "tokenize")
            )
            if not _ARGUMENTS.isdisjoint(kwargs):
                # vLLM lets such a kwarg override its own argument, or fails on it: unknown here.
                raise Untokenizable("a chat_template_kwargs key names a template argument")
        final: str | None = None
        if continue_final_message:
            if add_generation_prompt:
                raise Untokenizable("continue_final_message with add_generation_prompt")
            final = _tag_final(conversation)
        try:
            text = self._template.render(
                messages=conversation,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **kwargs,
            )
        except jinja2.TemplateError as exc:
            raise Untokenizable(f"the chat template refused the request: {exc}") from exc
        except Exception as exc:  # the template's own code on the client's values (a TypeError)
            raise Untokenizable(f"the chat template failed on the request: {exc!r}") from exc
        if final is not None:
            text = _cut_at_tag(text, final)
        return text

    def conversation(self, messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
        """The messages as vLLM hands them to the template (see the module docstring)."""
        openai = self.content_format == "openai"
        out: list[dict[str, Any]] = []
        for message in messages:
            role = message.role
            texts = _texts(message.content)
            content: Any = (
                [{"type": "text", "text": t} for t in texts] if openai else "\n".join(texts)
            )
            entry: dict[str, Any] = {"role": role, "content": content}
            if role == "assistant" and message.tool_calls is not None:
                entry["tool_calls"] = _tool_calls(message.tool_calls)
                if not entry["tool_calls"]:
                    del entry["tool_calls"]
            elif role == "tool":
                if message.tool_call_id is not None:
                    entry["tool_call_id"] = message.tool_call_id
                if openai:
                    entry["content"] = "\n".join(texts)
            if message.name is not None:
                entry["name"] = message.name
            if role == "developer":
                entry["tools"] = None
            out.append(entry)
        if not self.names_developer and any(m["role"] == "developer" for m in out):
            out = _developer_to_system(out)
        return out


def vllm_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]] | None:
    """The request's tools as vLLM passes them to the template (``model_dump()`` of each)."""
    if tools is None:
        return None
    out: list[dict[str, Any]] = []
    for tool in tools:
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise Untokenizable("a tool without a function")
        dumped: dict[str, Any] = {
            "name": function.get("name"),
            "description": function.get("description"),
            "parameters": function.get("parameters"),
        }
        if function.get("strict") is not None:
            dumped["strict"] = function["strict"]
        defer = tool.get("defer_loading")
        function_defer = function.get("defer_loading")
        if function_defer is None:
            function_defer = defer  # vLLM hands the tool's flag down to its function
        if function_defer is not None:
            dumped["defer_loading"] = function_defer
        entry: dict[str, Any] = {"type": tool.get("type", "function"), "function": dumped}
        if defer is not None:
            entry["defer_loading"] = defer
        out.append(entry)
    return out


def _texts(content: str | list[dict[str, Any]] | None) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    texts: list[str] = []
    for part in content:
        kind = part.get("type")
        text = part.get("text")
        if kind in ("text", "input_text", "output_text") and isinstance(text, str):
            texts.append(text)
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        else:
            raise Untokenizable(f"a content part of type {kind!r}")
    return texts


def _tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for call in calls:
        function = call.get("function")
        if call.get("type", "function") != "function" or not isinstance(function, dict):
            raise Untokenizable("a tool call that is not a function")
        function = dict(function)
        arguments = function.get("arguments")
        if not arguments:
            parsed: Any = {}
        elif isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
            except json.JSONDecodeError:
                parsed = {}
        else:
            parsed = arguments
        function["arguments"] = parsed if isinstance(parsed, dict) else {}
        out.append({**call, "function": function})
    return out


def _developer_to_system(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """vLLM's ``_convert_developer_to_system`` then ``_consolidate_system_messages``."""
    converted = []
    for message in conversation:
        if message["role"] == "developer":
            message = {k: v for k, v in message.items() if k != "tools"}  # noqa: PLW2901
            message["role"] = "system"
        converted.append(message)
    systems: list[str] = []
    others: list[dict[str, Any]] = []
    merge = False
    for i, m in enumerate(converted):
        if m["role"] != "system":
            others.append(m)
            continue
        merge = merge or i > 0 or bool(systems)
        content = m.get("content", "")
        if isinstance(content, list):
            content = "\n".join(p["text"] for p in content if "text" in p)
        if content:
            systems.append(content)
    if not merge:
        return converted
    return [{"role": "system", "content": "\n\n".join(systems)}, *others]


def _tag_final(conversation: list[dict[str, Any]]) -> str:
    last = conversation[-1] = dict(conversation[-1])
    content = last.get("content")
    if isinstance(content, list):
        for part in reversed(content):
            if "text" in part:
                final = str(part["text"])
                part["text"] = final + _CONTINUE_TAG
                return final
        raise Untokenizable("no text to continue in the final message")
    final = str(content or "")
    last["content"] = final + _CONTINUE_TAG
    return final


def _cut_at_tag(text: str, final: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise Untokenizable("the template drops the final message it should continue")
    at = text.rindex(tag)
    if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return text[:at]
    return text[:at].rstrip()


# ---- vLLM's content-format detection (``_detect_content_format``) ------------------------------


def _loops_over_content(ast: jinja2.nodes.Template) -> bool:
    """Whether the template iterates over a message's ``content`` (vLLM: the "openai" format).

    vLLM walks the AST for a ``for`` over ``<message>['content']`` where ``<message>`` is a loop
    variable over ``messages`` (or a variable assigned from one of its items); this follows the
    same two steps.
    """
    message_vars = set()
    for node in ast.find_all(jinja2.nodes.For):
        if _is_var(node.iter, "messages") and isinstance(node.target, jinja2.nodes.Name):
            message_vars.add(node.target.name)
    for assign in ast.find_all(jinja2.nodes.Assign):
        if isinstance(assign.target, jinja2.nodes.Name) and _is_item_of(assign.node, "messages"):
            message_vars.add(assign.target.name)
    content_vars = set()
    for assign in ast.find_all(jinja2.nodes.Assign):
        if isinstance(assign.target, jinja2.nodes.Name) and any(
            _is_key(assign.node, v, "content") for v in message_vars
        ):
            content_vars.add(assign.target.name)
    for node in ast.find_all(jinja2.nodes.For):
        it = node.iter
        if any(_is_key(it, v, "content") for v in message_vars) or any(
            _is_var(it, v) for v in content_vars
        ):
            return True
    return False


def _is_var(node: jinja2.nodes.Node, name: str) -> bool:
    return isinstance(node, jinja2.nodes.Name) and node.name == name


def _is_item_of(node: jinja2.nodes.Node, name: str) -> bool:
    return isinstance(node, jinja2.nodes.Getitem) and _is_var(node.node, name)


def _is_key(node: jinja2.nodes.Node, name: str, key: str) -> bool:
    if isinstance(node, jinja2.nodes.Getitem):
        arg = node.arg
        return _is_var(node.node, name) and isinstance(arg, jinja2.nodes.Const) and arg.value == key
    if isinstance(node, jinja2.nodes.Getattr):
        return _is_var(node.node, name) and node.attr == key
    return False
