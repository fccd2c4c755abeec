"""The chat template rendered as vLLM 0.32 renders it (transformers' apply_chat_template).

The expected strings were checked against transformers 5.19's ``apply_chat_template`` (the
version vLLM 0.32 runs) on the same folders; the engine suite compares the ids with vLLM's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dynamo_llm.tokenization import ChatTemplate, ModelTokenizer, Untokenizable
from tests.unit.tokenization.helpers import CHATML, LLAMA2, chat, model_folder

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "Sunny."},
    {"role": "user", "content": "And Rome?"},
]


@pytest.fixture(scope="module")
def llama2(tmp_path_factory: pytest.TempPathFactory) -> ModelTokenizer:
    return ModelTokenizer.load(str(model_folder(tmp_path_factory.mktemp("llama2"), LLAMA2)))


@pytest.fixture(scope="module")
def chatml(tmp_path_factory: pytest.TempPathFactory) -> ModelTokenizer:
    return ModelTokenizer.load(str(model_folder(tmp_path_factory.mktemp("chatml"), CHATML)))


def render(tokenizer: ModelTokenizer, **body: Any) -> str:
    return tokenizer.render_chat(chat(body))


def test_a_multi_turn_chat_with_a_system_message_renders_as_the_template_says(
    llama2: ModelTokenizer,
) -> None:
    text = render(
        llama2,
        messages=MULTI_TURN,
    )
    assert text == (
        "<s><<SYS>> Be brief. <</SYS>> [INST] Weather in Paris? [/INST] Sunny.</s>"
        "[INST] And Rome? [/INST] "
    )


def test_trim_and_lstrip_blocks_shape_a_multi_line_template(chatml: ModelTokenizer) -> None:
    text = render(
        chatml,
        messages=MULTI_TURN,
    )
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n\n<|im_start|>user\nWeather in Paris?"
        "<|im_end|>\n\n<|im_start|>assistant\nSunny.<|im_end|>\n\n<|im_start|>user\nAnd Rome?"
        "<|im_end|>\n\n<|im_start|>assistant\n"
    )


def test_tools_and_tool_calls_reach_the_template_as_vllm_passes_them(
    chatml: ModelTokenizer,
) -> None:
    text = render(
        chatml,
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "20 celsius"},
        ],
        tools=TOOLS,
    )
    tool = json.dumps({"type": "function", "function": TOOLS[0]["function"]})
    assert text == (
        f"<|im_start|>system\n# Tools\n{tool}\n<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n\n"
        '<|im_start|>assistant\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
        "</tool_call>\n<|im_end|>\n\n<|im_start|>tool\n20 celsius<|im_end|>\n\n"
        "<|im_start|>assistant\n"
    )


def test_a_tool_without_description_or_parameters_is_dumped_with_nulls() -> None:
    template = ChatTemplate("{{ tools | tojson }}")
    request = chat({"messages": [{"role": "user", "content": "x"}]})
    tools = [{"type": "function", "function": {"name": "now", "strict": True}}]
    from dynamo_llm.tokenization.template import vllm_tools

    text = template.render(request.messages, special_tokens={}, tools=vllm_tools(tools))
    assert json.loads(text) == [
        {
            "type": "function",
            "function": {"name": "now", "description": None, "parameters": None, "strict": True},
        }
    ]


def test_text_parts_are_joined_by_newlines_for_a_template_that_takes_strings(
    llama2: ModelTokenizer,
) -> None:
    parts = [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]
    text = render(llama2, messages=[{"role": "user", "content": parts}])
    assert text == "<s>[INST] part one\npart two [/INST] "


def test_a_template_that_loops_over_content_gets_the_parts(chatml: ModelTokenizer) -> None:
    assert chatml.template is not None and chatml.template.content_format == "openai"
    parts = [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]
    text = render(chatml, messages=[{"role": "user", "content": parts}])
    assert text == "<|im_start|>user\npart onepart two<|im_end|>\n\n<|im_start|>assistant\n"


def test_an_image_part_makes_the_prompt_unknowable(llama2: ModelTokenizer) -> None:
    parts = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    with pytest.raises(Untokenizable):
        render(llama2, messages=[{"role": "user", "content": parts}])


def test_raise_exception_in_the_template_refuses_the_request() -> None:
    template = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok"
    )
    request = chat({"messages": [{"role": "assistant", "content": "x"}]})
    with pytest.raises(Untokenizable, match="user first"):
        template.render(request.messages, special_tokens={})


def test_a_developer_message_becomes_system_for_a_template_without_that_role() -> None:
    template = ChatTemplate(
        "{% for m in messages %}{{ m['role'] }}={{ m['content'] }};{% endfor %}"
    )
    request = chat(
        {
            "messages": [
                {"role": "user", "content": "u"},
                {"role": "developer", "content": "d"},
                {"role": "system", "content": "s"},
            ]
        }
    )
    assert template.render(request.messages, special_tokens={}) == "system=d\n\ns;user=u;"


def test_continue_final_message_leaves_the_last_message_open(llama2: ModelTokenizer) -> None:
    text = render(
        llama2,
        messages=[
            {"role": "user", "content": "Count"},
            {"role": "assistant", "content": "one two"},
        ],
        add_generation_prompt=False,
        continue_final_message=True,
    )
    assert text == "<s>[INST] Count [/INST] one two"


def test_template_kwargs_reach_only_the_variables_it_names() -> None:
    template = ChatTemplate("{{ flavour }}{% if tokenize is defined %}!{% endif %}{{ bos_token }}")
    request = chat({"messages": [{"role": "user", "content": "x"}]})
    text = template.render(
        request.messages,
        special_tokens={"bos_token": "<s>"},
        extra={"flavour": "mint", "tokenize": True, "unused": 1},
    )
    assert text == "mint<s>"


def test_strftime_now_is_a_global() -> None:
    template = ChatTemplate("{{ strftime_now('%Y') | length }}")
    request = chat({"messages": [{"role": "user", "content": "x"}]})
    assert template.render(request.messages, special_tokens={}) == "4"


def test_chat_template_jinja_wins_over_the_config(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, "from the config")
    (folder / "chat_template.jinja").write_text("from the file")
    tokenizer = ModelTokenizer.load(str(folder))
    assert render(tokenizer, messages=[{"role": "user", "content": "x"}]) == "from the file"


@pytest.mark.parametrize("name", ["messages", "tools", "documents", "add_generation_prompt"])
def test_a_template_kwarg_named_like_a_template_argument_refuses_the_request(name: str) -> None:
    # Before: jinja's render() got the name twice and raised TypeError (a 500 to the client).
    template = ChatTemplate(f"{{{{ {name} }}}}")
    request = chat({"messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(Untokenizable):
        template.render(request.messages, special_tokens={}, extra={name: 1})


def test_a_template_failing_on_a_client_value_refuses_the_request() -> None:
    # A kwarg of a type the template does not expect: a TypeError inside the render.
    template = ChatTemplate("{{ 'effort: ' + effort }}")
    request = chat({"messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(Untokenizable):
        template.render(request.messages, special_tokens={}, extra={"effort": 1})
