"""Migration (SPEC §9): a request whose worker fails continues on another worker.

The Router with a scripted fake worker client and a fake clock (no sockets); the same paths in
front of real worker processes are in ``tests/system/test_migration.py``.
"""

import asyncio
from collections.abc import AsyncGenerator, Callable
from typing import Any

import msgspec
import pytest

from dynamo_llm.cli import parse_config
from dynamo_llm.engines.base import EngineOutput, EngineRequest, OwnedStream, Usage
from dynamo_llm.engines.endpoints import CHAT, COMPLETIONS
from dynamo_llm.errors import (
    Cancelled,
    InvalidRequest,
    WorkerDisconnected,
    WorkerResponseTimeout,
    WorkerShuttingDown,
    WorkerUnreachable,
)
from dynamo_llm.metrics import Metrics
from dynamo_llm.protocols.chat import ChatCompletionRequest, decode_chat_request
from dynamo_llm.protocols.completions import CompletionRequest, decode_completion_request
from dynamo_llm.router import WorkerSet
from dynamo_llm.router.engine import Router
from dynamo_llm.runtime import EngineContext, FakeClock, StopReason
from tests.helpers import registered
from tests.unit.router.helpers import MODEL, inflight, router_over

PROMPT_IDS = [7, 8, 9]


def next_id(ids: list[int]) -> int:
    """The fake model: deterministic in the last few ids, like the mocker."""
    return (sum(ids[-4:]) * 31 + len(ids)) % 1000


def word(token: int) -> str:
    return f"w{token} "


def reference(n: int) -> tuple[list[int], str]:
    ids = list(PROMPT_IDS)
    for _ in range(n):
        ids.append(next_id(ids))
    generated = ids[len(PROMPT_IDS) :]
    return generated, "".join(map(word, generated))


class Scripted:
    """Stands in for WorkerClient. ``steps`` are what the next attempts do, in order, whichever
    worker they go to (then ``behaviour[url]``'s steps, then ``ok``). A step is
    ``ok``, ``refuse``, ``drop@K`` (K tokens then the connection drops), ``shutdown@K``,
    ``timeout@K``, ``reject`` (a 4xx), ``hold`` (waits for the attempt to be killed before
    answering its headers), ``text`` (no token ids), ``late`` (no token ids, and the prompt's
    size only in the usage at the end, as llama.cpp reports it; ``late@K`` fails before it)."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.behaviour: dict[str, list[str]] = {}
        self.sent: list[tuple[str, EngineRequest, dict[str, Any]]] = []
        self.closed: list[str] = []
        self.holding = asyncio.Event()

    async def open_stream(
        self, url: str, request: EngineRequest, ctx: EngineContext, **kwargs: Any
    ) -> AsyncGenerator[EngineOutput, None]:
        self.sent.append((url, request, kwargs))
        steps = self.steps or self.behaviour.get(url, [])
        step = steps.pop(0) if steps else "ok"
        kind, _, at = step.partition("@")
        if kind == "refuse":
            raise WorkerUnreachable("connection refused")
        if kind == "reject":
            raise InvalidRequest("bad request")
        if kind == "hold":
            self.holding.set()
            await ctx.stopped()
            raise Cancelled("stopped while connecting")
        return self._stream(url, request, kind, int(at or 10**9))

    async def _stream(
        self, url: str, request: EngineRequest, kind: str, fail_at: int
    ) -> AsyncGenerator[EngineOutput, None]:
        try:
            prompt = request.prompt
            if isinstance(prompt, list):
                ids = list(prompt)
            elif request.endpoint == "completions":
                assert prompt is not None
                ids = list(PROMPT_IDS) + _ids_of(prompt[len("hi") :])
            else:
                assert isinstance(request.params, ChatCompletionRequest)
                messages = request.params.messages
                ids = list(PROMPT_IDS)
                if messages[-1].role == "assistant":
                    content = messages[-1].content
                    assert isinstance(content, str)
                    ids += _ids_of(content)
            prompt_len = len(ids)
            max_tokens = request.max_tokens
            assert max_tokens is not None, "every request here has a budget"
            for k in range(max_tokens):
                if k == fail_at:
                    await asyncio.sleep(0)
                    if kind == "shutdown":
                        raise WorkerShuttingDown()
                    if kind == "timeout":
                        raise WorkerResponseTimeout()
                    raise WorkerDisconnected("dropped")
                token = next_id(ids)
                ids.append(token)
                last = k == max_tokens - 1
                exact = kind not in ("text", "late")
                yield EngineOutput(
                    word(token),
                    token_ids=[token] if exact else None,
                    prompt_token_ids=list(ids[:prompt_len]) if k == 0 and exact else None,
                    prompt_tokens=prompt_len if k == 0 and kind != "late" else None,
                    finish_reason="length" if last else None,
                    usage=Usage(prompt_len, k + 1) if last else None,
                )
        finally:
            self.closed.append(url)


def _ids_of(text: str) -> list[int]:
    return [int(w[1:]) for w in text.split()]


def setup(*urls: str, limit: int = 1) -> tuple[Metrics, WorkerSet, Scripted, Router]:
    client = Scripted()
    metrics, workers, router = router_over(client, urls, FakeClock(), migration_limit=limit)
    return metrics, workers, client, router


def completion(max_tokens: int = 6, **extra: Any) -> EngineRequest:
    body = {"model": MODEL, "prompt": "hi", "stream": True, "max_tokens": max_tokens, **extra}
    params = decode_completion_request(msgspec.json.encode(body))
    return COMPLETIONS.request(params, "hi", id="r1", model=MODEL, max_tokens=max_tokens)


def chat(max_tokens: int = 6, **extra: Any) -> EngineRequest:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "max_tokens": max_tokens,
        **extra,
    }
    params = decode_chat_request(msgspec.json.encode(body))
    return CHAT.request(params, id="r1", model=MODEL, max_tokens=max_tokens)


def migrations(metrics: Metrics, kind: str) -> float:
    return metrics.model_migration_total.labels(MODEL, kind).value


async def collect(
    router: Router, request: EngineRequest, ctx: EngineContext | None = None
) -> list[EngineOutput]:
    stream = await router.generate(request, ctx or EngineContext("r1"))
    assert isinstance(stream, OwnedStream)
    assert isinstance(stream, OwnedStream)
    outs: list[EngineOutput] = []
    try:
        async with asyncio.timeout(5):
            async for out in stream:
                outs.append(out)
    finally:
        await stream.aclose()
    return outs


def joined(outs: list[EngineOutput]) -> str:
    return "".join(o.text for o in outs)


def token_ids(outs: list[EngineOutput]) -> list[int]:
    """Every output's token ids, in order; each output must carry them."""
    ids: list[int] = []
    for out in outs:
        assert out.token_ids is not None, out
        ids += out.token_ids
    return ids


@pytest.mark.parametrize("make", [completion, chat], ids=["completions", "chat"])
async def test_a_stream_dropped_mid_way_continues_token_exact_on_another_worker(
    make: Callable[[int], EngineRequest],
) -> None:
    metrics, workers, client, router = setup("http://a", "http://b")
    client.behaviour["http://a"] = ["drop@2"]
    outs = await collect(router, make(6))
    ids, text = reference(6)
    assert joined(outs) == text
    assert token_ids(outs) == ids
    assert outs[-1].usage == Usage(3, 6)
    assert [o.finish_reason for o in outs].count("length") == 1
    assert sum(o.prompt_tokens is not None for o in outs) == 1, "the replay's prompt is hidden"
    # The replay: token ids on the completions endpoint, the budget reduced.
    url, replay, kwargs = client.sent[1]
    assert url == "http://b"
    assert replay.endpoint == "completions"
    assert isinstance(replay.params, CompletionRequest)
    assert replay.prompt == PROMPT_IDS + ids[:2]
    assert replay.max_tokens == replay.params.max_tokens == 4
    assert kwargs == {"first_token_timeout": None, "is_ours": False} | {
        "track_tokens": True,
        "relay": False,
    }
    assert migrations(metrics, "ongoing_request") == 1
    assert migrations(metrics, "new_request") == 0
    assert registered(workers, "http://a").quarantined
    assert inflight(workers) == {"http://a": 0, "http://b": 0}
    assert client.closed == ["http://a", "http://b"]
    await router.aclose()


@pytest.mark.parametrize("make", [completion, chat], ids=["completions", "chat"])
async def test_without_token_ids_the_replay_continues_the_text(
    make: Callable[[int], EngineRequest],
) -> None:
    _metrics, _workers, client, router = setup("http://a", "http://b")
    client.behaviour["http://a"] = ["text@3"]
    outs = await collect(router, make(5))
    _, text = reference(5)
    assert joined(outs) == text
    assert outs[-1].usage == Usage(3, 5)
    replay = client.sent[1][1]
    _, head = reference(3)
    if make is chat:
        assert replay.endpoint == "chat_completions"
        assert isinstance(replay.params, ChatCompletionRequest)
        last = replay.params.messages[-1]
        assert (last.role, last.content) == ("assistant", head)
        assert replay.params.continue_final_message is True
        assert replay.params.add_generation_prompt is False
        assert replay.params.max_tokens == 2
    else:
        assert isinstance(replay.params, CompletionRequest)
        assert replay.prompt == replay.params.prompt == "hi" + head
        assert replay.params.max_tokens == 2
    await router.aclose()


@pytest.mark.parametrize("make", [completion, chat], ids=["completions", "chat"])
async def test_the_original_prompt_is_counted_when_the_first_worker_never_said_its_size(
    make: Callable[[int], EngineRequest],
) -> None:
    # llama.cpp: no token ids, and the prompt's size only in the usage the first worker never
    # sent. The replay's prompt (the original and the text) is not the client's: the request
    # asks for one token to learn it, once the replay is over.
    _metrics, workers, client, router = setup("http://a", "http://b")
    client.behaviour["http://a"] = ["late@3"]
    client.behaviour["http://b"] = ["late", "late"]
    request = make(5)
    outs = await collect(router, request)
    _, text = reference(5)
    assert joined(outs) == text
    assert outs[-1].usage == Usage(3, 5)
    assert [url for url, _, _ in client.sent] == ["http://a", "http://b", "http://b"]
    count = client.sent[2][1]
    assert count.endpoint == request.endpoint
    assert count.max_tokens == 1
    if make is chat:
        assert isinstance(count.params, ChatCompletionRequest)
        assert count.params.messages == request.messages
        assert count.params.max_tokens == 1
    else:
        assert isinstance(count.params, CompletionRequest)
        assert count.prompt == count.params.prompt == "hi"
        assert count.params.max_tokens == 1
    assert client.closed == ["http://a", "http://b", "http://b"], "the replay ended first"
    assert inflight(workers) == {"http://a": 0, "http://b": 0}
    await router.aclose()


async def test_the_frontends_prompt_count_goes_on_the_first_token_only_across_a_migration() -> None:
    _metrics, workers, client, router = setup("http://a", "http://b")

    async def prompt_ids(req: EngineRequest) -> list[int] | None:
        return list(PROMPT_IDS)

    router.prompt_ids = prompt_ids
    client.behaviour["http://a"] = ["late@3"]  # never says the prompt's size, then drops
    client.behaviour["http://b"] = ["late", "late"]
    outs = await collect(router, completion(5))
    assert joined(outs) == reference(5)[1]
    assert [o.prompt_tokens for o in outs] == [3, None, None, None, None]
    assert outs[-1].usage == Usage(3, 5)
    assert inflight(workers) == {"http://a": 0, "http://b": 0}
    await router.aclose()


async def test_a_prompt_count_that_fails_leaves_the_prompt_out_of_the_usage() -> None:
    _metrics, _workers, client, router = setup("http://a", "http://b")
    client.behaviour["http://a"] = ["late@3"]
    client.behaviour["http://b"] = ["late", "reject"]
    outs = await collect(router, completion(5))
    assert joined(outs) == reference(5)[1]
    assert outs[-1].usage == Usage(None, 5), "unknown, never the replay's prompt"
    assert len(client.sent) == 3
    await router.aclose()


async def test_a_refused_dispatch_goes_elsewhere_after_quarantining_the_worker_uncounted() -> None:
    metrics, workers, client, router = setup("http://a", "http://b")
    client.behaviour["http://a"] = ["refuse"]
    seen_quarantined: list[bool] = []
    open_stream = client.open_stream

    async def spy(
        url: str, request: EngineRequest, ctx: EngineContext, **kwargs: Any
    ) -> AsyncGenerator[EngineOutput, None]:
        if url == "http://b":
            seen_quarantined.append(registered(workers, "http://a").quarantined)
        return await open_stream(url, request, ctx, **kwargs)

    client.open_stream = spy  # type: ignore[method-assign]  # a spy on this one fake
    outs = await collect(router, completion(4))
    assert joined(outs) == reference(4)[1]
    assert outs[-1].usage == Usage(3, 4)
    assert [url for url, _, _ in client.sent] == ["http://a", "http://b"]
    assert seen_quarantined == [True], "quarantined before the retry was chosen"
    # Nothing was sent, so nothing was generated: not a migration (issue 12, item 4).
    assert migrations(metrics, "new_request") == 0
    assert migrations(metrics, "ongoing_request") == 0
    assert inflight(workers) == {"http://a": 0, "http://b": 0}
    await router.aclose()


async def test_the_failed_worker_is_excluded_even_when_it_would_be_chosen_again() -> None:
    # Three workers, limit 2: a fails, then b fails; c finishes. Round robin would pick a again.
    metrics, _workers, client, router = setup("http://a", "http://b", "http://c", limit=2)
    client.steps = ["drop@1", "shutdown@1"]
    outs = await collect(router, chat(5))
    assert joined(outs) == reference(5)[1]
    assert outs[-1].usage == Usage(3, 5)
    assert sorted(url for url, _, _ in client.sent) == ["http://a", "http://b", "http://c"]
    assert migrations(metrics, "ongoing_request") == 2
    assert client.sent[2][1].prompt == PROMPT_IDS + reference(2)[0]
    await router.aclose()


async def test_when_the_budget_is_spent_the_last_error_reaches_the_client_and_is_not_counted() -> (
    None
):
    metrics, workers, client, router = setup("http://a", "http://b", "http://c", limit=1)
    client.steps = ["drop@1", "drop@1"]
    stream = await router.generate(completion(5), EngineContext("r1"))
    assert isinstance(stream, OwnedStream)
    texts = []
    with pytest.raises(WorkerDisconnected):
        async with asyncio.timeout(5):
            async for out in stream:
                texts.append(out.text)
    await stream.aclose()
    assert "".join(texts) == reference(2)[1], "what was generated was delivered once"
    assert migrations(metrics, "ongoing_request") == 1, "only the migration actually made"
    assert len({url for url, _, _ in client.sent}) == len(client.sent) == 2
    assert inflight(workers) == {"http://a": 0, "http://b": 0, "http://c": 0}
    await router.aclose()


async def test_with_no_other_worker_the_original_failure_reaches_the_client_uncounted() -> None:
    metrics, workers, client, router = setup("http://a", limit=3)
    client.behaviour["http://a"] = ["refuse"]
    with pytest.raises(WorkerUnreachable):
        await router.generate(completion(4), EngineContext("r1"))
    assert migrations(metrics, "new_request") == 0
    assert inflight(workers) == {"http://a": 0}
    await router.aclose()


@pytest.mark.parametrize(
    ("step", "error"),
    [("timeout@2", WorkerResponseTimeout), ("reject", InvalidRequest)],
    ids=["response_timeout", "4xx"],
)
async def test_errors_that_are_not_migratable_reach_the_client(
    step: str, error: type[Exception]
) -> None:
    metrics, workers, client, router = setup("http://a", "http://b", limit=2)
    client.behaviour["http://a"] = [step]
    with pytest.raises(error):
        await collect(router, completion(5))
    assert len(client.sent) == 1
    assert migrations(metrics, "new_request") + migrations(metrics, "ongoing_request") == 0
    assert registered(workers, "http://a").quarantined is (error is WorkerResponseTimeout)
    await router.aclose()


@pytest.mark.parametrize(
    "extra",
    [
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        {"response_format": {"type": "json_object"}},
        {"nvext": {"guided_regex": "a+"}},
        {"n": 2},
    ],
    ids=["json_schema", "json_object", "guided", "n2"],
)
async def test_requests_that_cannot_be_replayed_are_not_migrated(extra: dict[str, Any]) -> None:
    metrics, _workers, client, router = setup("http://a", "http://b", limit=2)
    client.behaviour["http://a"] = ["drop@2"]
    with pytest.raises(WorkerDisconnected):
        await collect(router, chat(5, **extra))
    assert len(client.sent) == 1
    assert "relay" not in client.sent[0][2], "a request that cannot migrate is relayed as usual"
    assert migrations(metrics, "ongoing_request") == 0
    await router.aclose()


async def test_migration_off_relays_as_before() -> None:
    _metrics, _workers, client, router = setup("http://a", "http://b", limit=0)
    client.behaviour["http://a"] = ["drop@2"]
    with pytest.raises(WorkerDisconnected):
        await collect(router, completion(5))
    assert client.sent[0][2] == {"first_token_timeout": None, "is_ours": False}
    await router.aclose()


async def test_a_hang_up_while_the_replay_connects_stops_it_and_starts_nothing_more() -> None:
    _metrics, workers, client, router = setup("http://a", "http://b", "http://c", limit=2)
    client.steps = ["drop@2", "hold"]
    ctx = EngineContext("r1")
    stream = await router.generate(completion(6), ctx)
    assert isinstance(stream, OwnedStream)
    got = [await stream.__anext__(), await stream.__anext__()]
    nxt = asyncio.ensure_future(stream.__anext__())
    async with asyncio.timeout(5):
        await client.holding.wait()  # the replay is connecting to b
    ctx.kill(StopReason.CLIENT_DISCONNECT)
    with pytest.raises(Cancelled):
        async with asyncio.timeout(5):
            await nxt
    await stream.aclose()
    assert joined(got) == reference(2)[1]
    assert len(client.sent) == 2, "no third attempt"
    held = client.sent[1][0]
    assert not registered(workers, held).quarantined, "a hang-up is not the worker's fault"
    assert inflight(workers) == {"http://a": 0, "http://b": 0, "http://c": 0}
    await router.aclose()


async def test_a_hang_up_after_a_migration_reaches_the_worker_generating_the_replay() -> None:
    _metrics, workers, client, router = setup("http://a", "http://b", limit=1)
    client.behaviour["http://a"] = ["drop@1"]
    ctx = EngineContext("r1")
    stream = await router.generate(completion(6), ctx)
    assert isinstance(stream, OwnedStream)
    await stream.__anext__()
    await stream.__anext__()  # the first token of the replay, from b
    assert client.sent[-1][0] == "http://b"
    attempts = list(ctx._children or [])
    assert len(attempts) == 1 and not attempts[0].is_stopped
    ctx.kill(StopReason.CLIENT_DISCONNECT)
    assert attempts[0].is_killed, "the replay's attempt context is the request's child"
    await stream.aclose()
    assert inflight(workers) == {"http://a": 0, "http://b": 0}
    await router.aclose()


def test_the_migration_limit_comes_from_the_flag_or_the_environment() -> None:
    assert parse_config(["serve"], {})[1].migration_limit == 0
    assert parse_config(["serve"], {"DYN_MIGRATION_LIMIT": "3"})[1].migration_limit == 3
    flag = parse_config(["serve", "--migration-limit", "2"], {"DYN_MIGRATION_LIMIT": "3"})[1]
    assert flag.migration_limit == 2
