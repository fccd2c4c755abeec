"""Folding a stream's chunks as the OpenAI SDK does, and the usage on the wire (issue 9)."""

from __future__ import annotations

from typing import Any

from dynamo_llm.engines.base import Usage
from dynamo_llm.protocols.common import usage_info
from dynamo_llm.protocols.fold import merge_delta, merge_last, merge_logprobs
from dynamo_llm.protocols.stream import carries_output, chat_choice


def fold(*deltas: dict[str, Any]) -> dict[str, Any]:
    acc: dict[str, Any] = {}
    for delta in deltas:
        merge_delta(acc, delta)
    return acc


def test_tool_call_deltas_merge_by_index_with_their_arguments_concatenated() -> None:
    message = fold(
        {"role": "assistant", "content": None},
        {"tool_calls": [{"index": 0, "id": "a", "type": "function",
                         "function": {"name": "f", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"x"'}}]},
        {"tool_calls": [{"index": 1, "id": "b", "type": "function",
                         "function": {"name": "g", "arguments": "{}"}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
    )  # fmt: skip
    assert message == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"index": 0, "id": "a", "type": "function",
             "function": {"name": "f", "arguments": '{"x": 1}'}},
            {"index": 1, "id": "b", "type": "function",
             "function": {"name": "g", "arguments": "{}"}},
        ],
    }  # fmt: skip


def test_an_id_a_name_and_the_role_repeated_on_every_delta_are_set_once() -> None:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}}
    message = fold(
        {"role": "assistant"},
        {
            "role": "assistant",
            "tool_calls": [{**call, "function": {"name": "f", "arguments": "{"}}],
        },
        {"tool_calls": [{**call, "function": {"name": "f", "arguments": "}"}}]},
    )
    assert message["role"] == "assistant"
    assert message["tool_calls"] == [
        {
            "index": 0,
            "id": "call_1",
            "type": "function",
            "function": {"name": "f", "arguments": "{}"},
        }
    ]


def test_one_delta_may_hold_several_fragments_of_one_call() -> None:
    message = fold(
        {"tool_calls": [
            {"index": 0, "id": "a", "function": {"name": "f", "arguments": "["}},
            {"index": 0, "function": {"arguments": "]"}},
        ]}
    )  # fmt: skip
    assert message["tool_calls"] == [
        {"index": 0, "id": "a", "function": {"name": "f", "arguments": "[]"}}
    ]


def test_folding_never_changes_the_chunks_it_reads() -> None:
    first = {"tool_calls": [{"index": 0, "function": {"arguments": "a"}}]}
    fold(first, {"tool_calls": [{"index": 0, "function": {"arguments": "b"}}]})
    assert first == {"tool_calls": [{"index": 0, "function": {"arguments": "a"}}]}


def test_logprobs_lists_are_concatenated_for_chat_and_completions() -> None:
    chat = merge_logprobs(None, {"content": [{"token": "a"}], "refusal": None})
    chat = merge_logprobs(chat, None)
    chat = merge_logprobs(chat, {"content": [{"token": "b"}, {"token": "c"}], "refusal": None})
    assert chat == {"content": [{"token": "a"}, {"token": "b"}, {"token": "c"}], "refusal": None}
    first = {"tokens": ["a"], "token_logprobs": [-1.0], "top_logprobs": [{"a": -1.0}],
             "text_offset": [0]}  # fmt: skip
    completion = merge_logprobs(None, first)
    completion = merge_logprobs(
        completion,
        {
            "tokens": ["b"],
            "token_logprobs": [-2.0],
            "top_logprobs": [{"b": -2.0}],
            "text_offset": [1],
        },
    )
    assert completion == {
        "tokens": ["a", "b"],
        "token_logprobs": [-1.0, -2.0],
        "top_logprobs": [{"a": -1.0}, {"b": -2.0}],
        "text_offset": [0, 1],
    }
    assert first["tokens"] == ["a"], "the chunk itself is left as it was"


def test_other_keys_keep_their_last_value_that_is_not_null() -> None:
    acc: dict[str, Any] = {}
    merge_last(acc, {"index": 0, "stop_reason": None, "x": 1}, frozenset({"index"}))
    merge_last(acc, {"stop_reason": 7, "x": None}, frozenset())
    assert acc == {"stop_reason": 7, "x": 1}


def test_a_choice_carries_output_when_its_delta_holds_anything_but_its_role() -> None:
    assert not carries_output({"delta": {"role": "assistant", "content": ""}})
    assert not carries_output({"delta": {}, "finish_reason": "stop"})
    assert carries_output({"delta": {"tool_calls": [{"index": 0}]}})
    assert carries_output({"delta": {"reasoning_content": "hm"}})
    assert carries_output({"text": "a"})


def test_a_completion_choice_reads_as_a_chat_choice_with_chat_logprobs() -> None:
    choice = chat_choice(
        {
            "index": 0,
            "text": "hé",
            "logprobs": {"tokens": ["hé"], "token_logprobs": [-0.5],
                         "top_logprobs": [{"hé": -0.5, "x": -2.0}], "text_offset": [3]},
            "finish_reason": None,
            "stop_reason": None,
        }
    )  # fmt: skip
    assert choice == {
        "index": 0,
        "delta": {"content": "hé"},
        "logprobs": {
            "content": [
                {
                    "token": "hé",
                    "logprob": -0.5,
                    "bytes": [104, 195, 169],
                    "top_logprobs": [
                        {"token": "hé", "logprob": -0.5, "bytes": [104, 195, 169]},
                        {"token": "x", "logprob": -2.0, "bytes": [120]},
                    ],
                }
            ],
            "refusal": None,
        },
        "finish_reason": None,
        "stop_reason": None,
    }


def test_usage_nobody_knows_is_left_out_never_written_as_zeros() -> None:
    assert usage_info(None) is None
    assert usage_info(Usage(None, None)) is None
    assert usage_info(Usage(None, 12)) == {"completion_tokens": 12}
    assert usage_info(Usage(3, 2)) == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
    }


def test_the_workers_own_usage_keys_are_written_beside_the_counts() -> None:
    usage = Usage(
        3,
        2,
        1,
        {"prompt_tokens_details": {"audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 1}, "x": "y"},
    )  # fmt: skip
    assert usage_info(usage) == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 1},
        "completion_tokens_details": {"reasoning_tokens": 1},
        "x": "y",
    }


def test_a_sum_with_an_unknown_count_is_unknown_and_extra_numbers_add_up() -> None:
    a = Usage(3, 2, 1, {"completion_tokens_details": {"reasoning_tokens": 1}, "tag": "a"})
    b = Usage(4, 5, None, {"completion_tokens_details": {"reasoning_tokens": 2}, "tag": "b"})
    assert a + b == Usage(
        7, 7, None, {"completion_tokens_details": {"reasoning_tokens": 3}, "tag": "a"}
    )
    assert (a + Usage(None, 1)).prompt_tokens is None
    shared = Usage(3, 2, 1, {"prompt_tokens_details": {"audio_tokens": 4}, "x": 1})
    assert shared.without_prompt() == Usage(0, 2, 0, {"x": 1})
