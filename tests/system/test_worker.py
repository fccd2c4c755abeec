"""``dynamo-llm worker --engine mocker`` as a real process, driven by the official openai client.

The worker runs as a child process (:class:`~dynamo_llm.testing.process.ServerProcess`) with
``--http-port 0``; its URL comes from its readiness line. Expected outputs are computed here from
the mocker's model itself (:func:`~dynamo_llm.engines.mocker.tokens.next_token_id` over the
fallback tokenizer), so the tests check exact text, exact token ids and exact ``usage``, not just
their shape; that also proves a completion can be replayed from its token ids, which migration
relies on.

Cancellation runs against a second worker at ``--speedup-ratio 1`` (a real-time simulated GPU,
about 6 ms a token), so a long request is certainly still running when the client aborts its
socket; the worker's ``/metrics`` is then polled, with a deadline, until the scheduler shows the
request gone and its KV blocks freed.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from dynamo_llm.engines.mocker.tokens import (
    WordTokenizer,
    next_token_id,
    render_chat,
    render_word,
    seed_key,
)
from dynamo_llm.protocols.chat import ChatMessage
from dynamo_llm.testing.process import ServerProcess
from tests.helpers import scrape, value, wait_for

MODEL = "w"
TOKENIZER = WordTokenizer()


# ---- the mocker's model, computed independently of the worker -------------------------------


def chat_prompt_ids(content: str) -> list[int]:
    return TOKENIZER.encode(render_chat([ChatMessage(role="user", content=content)]))


def continuation(prompt_ids: list[int], n: int, seed: int = 0) -> list[int]:
    """The ``n`` tokens the mocker generates after ``prompt_ids``."""
    key = seed_key(seed)
    ids = list(prompt_ids)
    for _ in range(n):
        ids.append(next_token_id(ids, key, TOKENIZER))
    return ids[len(prompt_ids) :]


def text_of(token_ids: list[int]) -> str:
    return "".join(render_word(t) for t in token_ids)


# ---- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker() -> Iterator[str]:
    args = ["worker", "--engine", "mocker", "--speedup-ratio", "1000", "--http-port", "0"]
    with ServerProcess([*args, "--model-name", MODEL]) as proc:
        yield proc.wait_ready(timeout=30)
    assert proc.returncode == 0, proc.log


@pytest.fixture
def client(worker: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{worker}/v1", api_key="x", max_retries=0, timeout=30) as c:
        yield c


def extra(obj: Any, name: str) -> Any:
    """A field the OpenAI SDK does not model (vLLM's ``token_ids``)."""
    return (obj.model_extra or {}).get(name)


# ---- the OpenAI API ---------------------------------------------------------------------------


def test_models_lists_the_worker_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat_answers_the_mocker_text_with_exact_usage(client: openai.OpenAI) -> None:
    content = "Tell me about the mocker."
    prompt = chat_prompt_ids(content)
    expected = text_of(continuation(prompt, 7))
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=7
    )
    assert answer.model == MODEL
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), 7)
    assert answer.usage.total_tokens == len(prompt) + 7


def test_chat_stream_carries_the_same_text_and_usage(client: openai.OpenAI) -> None:
    content = "Stream it, please."
    prompt = chat_prompt_ids(content)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    with stream:
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == text_of(continuation(prompt, 9))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), 9)


def test_completions_unary_and_stream_agree_with_exact_usage(client: openai.OpenAI) -> None:
    prompt_text = "Once upon a time, in a data centre far away"
    prompt = TOKENIZER.encode(prompt_text)
    expected = text_of(continuation(prompt, 12))
    unary = client.completions.create(model=MODEL, prompt=prompt_text, max_tokens=12)
    assert unary.choices[0].text == expected
    assert unary.usage is not None
    assert (unary.usage.prompt_tokens, unary.usage.completion_tokens) == (len(prompt), 12)
    stream = client.completions.create(
        model=MODEL,
        prompt=prompt_text,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    with stream:
        chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == len(prompt) + 12


def test_the_same_request_twice_gets_the_same_text(client: openai.OpenAI) -> None:
    def ask() -> str | None:
        answer = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Determinism?"}], max_tokens=16
        )
        return answer.choices[0].message.content

    first = ask()
    assert first
    assert ask() == first


def test_return_token_ids_in_unary_choices_and_stream_chunks(client: openai.OpenAI) -> None:
    content = "Which ids?"
    expected = continuation(chat_prompt_ids(content), 6)
    messages: Any = [{"role": "user", "content": content}]
    flag = {"return_token_ids": True}
    answer = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, extra_body=flag
    )
    assert extra(answer.choices[0], "token_ids") == expected
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, stream=True, extra_body=flag
    )
    with stream:
        ids = [t for c in stream for t in (extra(c.choices[0], "token_ids") or [])]
    assert ids == expected
    completion = client.completions.create(
        model=MODEL, prompt="ids please", max_tokens=4, extra_body=flag
    )
    assert extra(completion.choices[0], "token_ids") == continuation(
        TOKENIZER.encode("ids please"), 4
    )
    plain = client.completions.create(model=MODEL, prompt="ids please", max_tokens=4)
    assert extra(plain.choices[0], "token_ids") is None


def test_a_token_id_prompt_is_consumed_as_is(client: openai.OpenAI) -> None:
    prompt = [101, 2023, 2003, 1037, 3231, 102]
    answer = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=5, extra_body={"return_token_ids": True}
    )
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == len(prompt)
    assert answer.usage.completion_tokens == 5
    expected = continuation(prompt, 5)
    assert extra(answer.choices[0], "token_ids") == expected
    assert answer.choices[0].text == text_of(expected)


def test_replaying_prompt_plus_generated_ids_continues_identically(client: openai.OpenAI) -> None:
    """What migration does after a worker dies mid-stream: the rest comes out unchanged."""
    flag = {"return_token_ids": True}
    prompt = TOKENIZER.encode("A request that will be migrated halfway through.")
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, extra_body=flag)
    generated = extra(whole.choices[0], "token_ids")
    assert len(generated) == 10
    rest = client.completions.create(
        model=MODEL, prompt=prompt + generated[:4], max_tokens=6, extra_body=flag
    )
    assert extra(rest.choices[0], "token_ids") == generated[4:]


def test_a_shared_prefix_is_reported_as_cached_tokens(client: openai.OpenAI, worker: str) -> None:
    prompt = list(range(50_000, 50_200))  # 200 ids no other test uses; 3 full 64-token blocks
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens == 192
    samples = scrape(worker)
    assert value(samples, "dynamo_mocker_prefix_cache_hit_rate", model=MODEL) > 0
    assert value(samples, "dynamo_mocker_prefix_cache_hits_total", model=MODEL) >= 192
    queried = value(samples, "dynamo_mocker_prefix_cache_queries_total", model=MODEL)
    assert queried >= 400


def test_health_and_metrics_show_the_scheduler(worker: str) -> None:
    health = httpx.get(f"{worker}/health", timeout=10).json()
    assert health["status"] == "healthy"
    assert health["models"][0]["model"] == MODEL
    assert health["models"][0]["engine"] == "mocker"
    samples = scrape(worker)
    for name in (
        "dynamo_mocker_running_requests",
        "dynamo_mocker_waiting_requests",
        "dynamo_mocker_kv_blocks_used",
        "dynamo_mocker_kv_blocks_total",
        "dynamo_mocker_kv_cache_usage_ratio",
        "dynamo_mocker_prefix_cache_hit_rate",
        "dynamo_mocker_prefix_cache_queries_total",
        "dynamo_mocker_prefix_cache_hits_total",
        "dynamo_mocker_preemptions_total",
        "dynamo_mocker_cancelled_requests_total",
        "dynamo_mocker_finished_requests_total",
        "dynamo_mocker_passes_total",
    ):
        assert (name, frozenset({("model", MODEL)})) in samples, name
    assert value(samples, "dynamo_mocker_kv_blocks_total", model=MODEL) == 16384


def test_an_unknown_model_is_a_404_from_the_worker(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)


# ---- cancellation -----------------------------------------------------------------------------


def open_stream(url: str, body: dict[str, Any]) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    payload = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: worker\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(payload) + payload
    )
    return sock


def read_data_events(sock: socket.socket, count: int) -> bytes:
    received = b""
    while received.count(b"data: {") < count:
        chunk = sock.recv(65536)
        assert chunk, f"stream ended early: {received!r}"
        received += chunk
    return received


def test_killing_the_client_mid_stream_stops_the_simulated_request() -> None:
    args = ["worker", "--engine", "mocker", "--speedup-ratio", "1", "--http-port", "0"]
    with ServerProcess([*args, "--model-name", "slow"]) as proc:
        url = proc.wait_ready(timeout=30)
        before = scrape(url)
        assert value(before, "dynamo_mocker_cancelled_requests_total", model="slow") == 0
        body = {
            "model": "slow",
            "messages": [{"role": "user", "content": "Write a very long story."}],
            "max_tokens": 4000,  # ~25 s of simulated decode at speedup 1
            "stream": True,
        }
        sock = open_stream(url, body)
        try:
            head = read_data_events(sock, 3)
            assert head.startswith(b"HTTP/1.1 200")
            running = scrape(url)
            assert value(running, "dynamo_mocker_running_requests", model="slow") == 1
            assert value(running, "dynamo_mocker_kv_blocks_used", model="slow") > 0
        finally:
            # An abortive close: the worker sees a TCP reset, as when a client process dies.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

        def request_gone() -> bool:
            s = scrape(url)
            return (
                value(s, "dynamo_mocker_cancelled_requests_total", model="slow") == 1
                and value(s, "dynamo_mocker_running_requests", model="slow") == 0
                and value(s, "dynamo_mocker_waiting_requests", model="slow") == 0
                and value(s, "dynamo_mocker_kv_blocks_used", model="slow") == 0
            )

        wait_for(request_gone, "the cancelled request leaving the mocker")
        after = scrape(url)
        assert value(after, "dynamo_mocker_finished_requests_total", model="slow") == 0
        assert (
            value(after, "dynamo_frontend_requests_total", model="slow", error_type="cancelled")
            == 1
        )
        assert value(after, "dynamo_frontend_inflight_requests", model="slow") == 0
        assert value(after, "dynamo_frontend_model_cancellation_total", model="slow") == 1
    assert proc.returncode == 0, proc.log
