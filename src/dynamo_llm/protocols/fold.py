"""Folding a stream's chunks into one answer, by the rules the OpenAI SDK accumulates them with.

A unary answer folded from a worker's stream must say what the worker's own unary answer would:
every field of every chunk, merged. The rules, per part of a chunk (plain dicts, as the worker
sent them):

- **a chat delta** (:func:`merge_delta`, the SDK's ``accumulate_delta``): strings are
  concatenated (``content``, ``reasoning_content``, ``refusal``, a tool call's
  ``function.arguments``), nested objects merged, lists of objects merged entry by entry on their
  ``index`` (tool calls), other lists extended; ``index`` and ``type`` are replaced, not
  accumulated. Unlike the SDK, an ``id``, a ``name`` and the ``role`` are set once: engines that
  repeat them on every delta of a tool call would otherwise get ``call_1call_1...``.
- **logprobs** (:func:`merge_logprobs`): every list is concatenated (chat ``content`` and
  ``refusal``; completions ``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``).
- **anything else** on a choice or a chunk (:func:`merge_last`): the last value that is not null
  wins (vLLM's ``stop_reason``, ``system_fingerprint``, llama.cpp's ``timings``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["merge_delta", "merge_last", "merge_logprobs"]

_SET_ONCE = frozenset({"id", "name", "role"})
_REPLACED = frozenset({"index", "type"})


def merge_delta(acc: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """Fold ``delta`` into ``acc`` (changed in place, and returned)."""
    for key, value in delta.items():
        if value is None:
            acc.setdefault(key, None)
            continue
        mine = acc.get(key)
        if mine is None:
            acc[key] = _fresh(value)
        elif key in _REPLACED:
            acc[key] = value
        elif key in _SET_ONCE:
            if not mine:
                acc[key] = value
        elif isinstance(mine, str) and isinstance(value, str):
            acc[key] = mine + value
        elif isinstance(mine, dict) and isinstance(value, dict):
            merge_delta(mine, value)
        elif isinstance(mine, list) and isinstance(value, list):
            _merge_list(mine, value)
        else:
            acc[key] = value
    return acc


def _merge_list(acc: list[Any], entries: list[Any]) -> None:
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("index"), int):
            for mine in acc:
                if isinstance(mine, dict) and mine.get("index") == entry["index"]:
                    merge_delta(mine, entry)
                    break
            else:
                acc.append(_fresh(entry))
        else:
            acc.append(entry)


def _fresh(value: Any) -> Any:
    """A copy of ``value`` that later merges may change without touching the worker's chunk."""
    if isinstance(value, dict):
        return merge_delta({}, value)
    if isinstance(value, list):
        merged: list[Any] = []
        _merge_list(merged, value)
        return merged
    return value


def merge_logprobs(acc: dict[str, Any] | None, logprobs: Any) -> dict[str, Any] | None:
    """``logprobs`` folded into ``acc``: lists concatenated, other values the last non-null."""
    if not isinstance(logprobs, dict):
        return acc
    if acc is None:
        acc = {}
    for key, value in logprobs.items():
        mine = acc.get(key)
        if isinstance(value, list):
            if isinstance(mine, list):
                mine.extend(value)
            else:
                acc[key] = list(value)
        elif value is not None or key not in acc:
            acc[key] = value
    return acc


def merge_last(acc: dict[str, Any], values: dict[str, Any], skip: frozenset[str]) -> None:
    """The keys of ``values`` not in ``skip`` into ``acc``: the last non-null value wins."""
    for key, value in values.items():
        if key not in skip and (value is not None or key not in acc):
            acc[key] = value
