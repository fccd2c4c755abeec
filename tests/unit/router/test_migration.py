"""Migration (SPEC §9): a request whose worker fails continues on another worker.

Two tiers: the Router with a scripted fake worker client and a fake clock (no sockets), then the
routed frontend in front of real ``dynamo-llm worker --engine mocker`` processes, one of which is
SIGKILLed mid-stream.
"""

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
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
from dynamo_llm.router import Worker, WorkerSet
from dynamo_llm.router.engine import Router
from dynamo_llm.router.policies import RouterMode, RoutingPolicy
from dynamo_llm.runtime import EngineContext, FakeClock, StopReason
from dynamo_llm.testing.process import ServerProcess
from tests.system.fleet_helpers import (
    SAFETY_NET,
    RoutedFrontend,
    bad_workers,
    path_of,
    registered,
    routed_frontend,
)

MODEL = "m"
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
    answering its headers), ``text`` (no token ids)."""

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
                yield EngineOutput(
                    word(token),
                    token_ids=None if kind == "text" else [token],
                    prompt_token_ids=list(ids[:prompt_len]) if k == 0 and kind != "text" else None,
                    prompt_tokens=prompt_len if k == 0 else None,
                    finish_reason="length" if last else None,
                    usage=Usage(prompt_len, k + 1) if last else None,
                )
        finally:
            self.closed.append(url)


def _ids_of(text: str) -> list[int]:
    return [int(w[1:]) for w in text.split()]


def setup(*urls: str, limit: int = 1) -> tuple[Metrics, WorkerSet, Scripted, Router]:
    clock = FakeClock()
    metrics = Metrics()

    async def probe(worker: Worker) -> bool:
        return True

    workers = WorkerSet(clock=clock, probe=probe, metrics=metrics)
    for url in urls:
        workers.add(Worker(url, [MODEL]))
    client = Scripted()
    router = Router(
        workers,
        RoutingPolicy(RouterMode.ROUND_ROBIN),
        # Router annotates the concrete WorkerClient; the fake has the one method it calls.
        client,  # type: ignore[arg-type]
        clock,
        metrics=metrics,
        migration_limit=limit,
    )
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


def inflight(workers: WorkerSet) -> dict[str, int]:
    return {w.id: w.inflight for w in workers}


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


# --- the router, without sockets -----------------------------------------------------------------


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


async def test_a_refused_dispatch_migrates_as_a_new_request_after_quarantining_the_worker() -> None:
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
    assert migrations(metrics, "new_request") == 1
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


# --- real processes: the routed frontend, mocker workers, a SIGKILL mid-stream -------------------

SPEEDUP = "5"  # ~1 ms a token: a 300-token answer lasts long enough to kill its worker mid-way
MAX_TOKENS = 300
KILL_AFTER = 10  # content events received before the worker is killed


@contextlib.asynccontextmanager
async def mocker_workers(count: int) -> AsyncIterator[dict[str, ServerProcess]]:
    """``count`` real ``dynamo-llm worker --engine mocker`` processes, by URL."""
    args = ["worker", "--engine", "mocker", "--speedup-ratio", SPEEDUP, "--http-port", "0"]
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(ServerProcess([*args, "--model-name", MODEL])) for _ in range(count)
        ]
        urls = await asyncio.gather(*(asyncio.to_thread(p.wait_ready, 30) for p in procs))
        yield dict(zip(urls, procs, strict=True))


def payload(kind: str, *, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": MAX_TOKENS, "stream": stream}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": "tell me a long story"}]
    else:
        body["prompt"] = "once upon a time"
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def piece(choice: dict[str, Any]) -> str:
    return (choice.get("delta") or {}).get("content") or choice.get("text") or ""


async def expected(url: str, kind: str) -> tuple[str, dict[str, int]]:
    """The answer of a healthy worker, asked directly (the mocker is deterministic)."""
    body = payload(kind, stream=False)
    async with httpx.AsyncClient(base_url=url, timeout=SAFETY_NET) as http:
        resp = await http.post(path_of(body), json=body)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    choice = answer["choices"][0]
    text = choice["message"]["content"] if kind == "chat" else choice["text"]
    return text, answer["usage"]


class Sse:
    """What a client saw of one SSE response."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.ids: set[str] = set()
        self.usage: dict[str, Any] | None = None
        self.errors: list[dict[str, Any]] = []
        self.done = 0
        self.roles = 0


async def stream_and_kill(
    fe: RoutedFrontend,
    workers: dict[str, ServerProcess],
    kind: str,
    rid: str,
) -> Sse:
    """Stream a request; SIGKILL the worker serving it after ``KILL_AFTER`` content events."""
    seen = Sse()
    body = payload(kind, stream=True)
    event = None
    killed = False
    async with fe.http.stream(
        "POST", path_of(body), json=body, headers={"X-Request-Id": rid}
    ) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
                continue
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                seen.done += 1
                continue
            obj = json.loads(data)
            if event == "error":
                seen.errors.append(obj["error"])
                event = None
                continue
            seen.ids.add(obj["id"])
            if obj.get("usage"):
                seen.usage = obj["usage"]
            for choice in obj["choices"]:
                seen.roles += (choice.get("delta") or {}).get("role") is not None
                if text := piece(choice):
                    seen.text.append(text)
            if not killed and len(seen.text) >= KILL_AFTER:
                serving = [url for url in workers if fe.worker(url).inflight == 1]
                assert len(serving) == 1, fe.worker_gauges()
                workers[serving[0]].proc.kill()  # SIGKILL: no goodbye on the wire
                killed = True
    assert killed, "the answer ended before its worker could be killed"
    return seen


@pytest.mark.parametrize("kind", ["chat", "completions"])
async def test_a_worker_killed_mid_stream_is_invisible_to_the_client(
    kind: str, tmp_path: Path
) -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        mocker_workers(2) as workers,
        routed_frontend(tmp_path, upstreams=tuple(workers), env={"DYN_MIGRATION_LIMIT": "1"}) as fe,
    ):
        await fe.until(lambda: all(url in fe.fleet.workers for url in workers))
        text, usage = await expected(next(iter(workers)), kind)
        seen = await stream_and_kill(fe, workers, kind, "mig-1")
        assert seen.errors == []
        assert "".join(seen.text) == text, "no duplicated and no missing text"
        assert seen.done == 1
        assert seen.roles == (1 if kind == "chat" else 0)
        assert seen.ids == {("chatcmpl-" if kind == "chat" else "cmpl-") + "mig-1"}
        assert seen.usage is not None
        assert (seen.usage["prompt_tokens"], seen.usage["completion_tokens"]) == (
            usage["prompt_tokens"],
            MAX_TOKENS,
        )
        assert fe.value("model_migration_total", migration_type="ongoing_request") == 1
        assert fe.value("model_migration_total", migration_type="new_request") == 0
        fe.assert_idle(requests=1)
        assert fe.value("requests_total", status="success") == 1
    assert not net.expired()


async def test_without_migration_a_killed_worker_ends_the_stream_with_an_error(
    tmp_path: Path,
) -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        mocker_workers(2) as workers,
        routed_frontend(tmp_path, upstreams=tuple(workers)) as fe,
    ):
        await fe.until(lambda: all(url in fe.fleet.workers for url in workers))
        seen = await stream_and_kill(fe, workers, "chat", "mig-off")
        assert [e["code"] for e in seen.errors] == ["worker_disconnected"]
        assert fe.value("model_migration_total") == 0
        fe.assert_idle(requests=1)
    assert not net.expired()


async def test_a_unary_request_migrates_on_a_refused_connection(tmp_path: Path) -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        mocker_workers(1) as workers,
        bad_workers(gone=dict(behaviour="refuse", model=MODEL)) as bad,
    ):
        (url,) = workers
        text, usage = await expected(url, "completions")
        upstreams = (bad["gone"].url, url)
        env = {"DYN_MIGRATION_LIMIT": "1"}
        async with routed_frontend(tmp_path, upstreams=(url,), env=env) as fe:
            await fe.until(lambda: url in fe.fleet.workers)
            # The refusing worker joins after discovery, as a worker that died after it was
            # listed: every request it is chosen for fails to connect.
            fe.fleet.workers.add(Worker(upstreams[0], [MODEL]))
            replies = [
                await fe.http.post("/v1/completions", json=payload("completions", stream=False))
                for _ in range(2)
            ]
            for reply in replies:
                assert reply.status_code == 200, reply.text
                assert reply.json()["choices"][0]["text"] == text
                assert reply.json()["usage"] == usage
            assert fe.value("model_migration_total", migration_type="new_request") == 1
            fe.assert_idle(requests=2)
    assert not net.expired()


async def test_without_token_ids_a_chat_continues_as_a_partial_assistant_message(
    tmp_path: Path,
) -> None:
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        bad_workers(
            cut=dict(behaviour="stop-mid-stream", tokens=20),
            ok=dict(behaviour="ok", tokens=20),
        ) as bad,
        routed_frontend(
            tmp_path,
            upstreams=(bad["cut"].url, bad["ok"].url),
            env={"DYN_MIGRATION_LIMIT": "1"},
        ) as fe,
    ):
        await fe.until(lambda: len(fe.fleet.workers) == 2)
        body = {
            "model": "bad-model",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        # Round robin: one of two requests in a row goes to the worker that cuts its stream.
        streams = []
        for rid in ("t-1", "t-2"):
            async with fe.http.stream(
                "POST", "/v1/chat/completions", json=body, headers={"X-Request-Id": rid}
            ) as resp:
                streams.append([line async for line in resp.aiter_lines() if line])
        assert fe.value("model_migration_total", migration_type="ongoing_request") == 1
        record = await bad["ok"].record()
        replays = [r for r in record["requests"] if r["body"].get("continue_final_message")]
        assert len(replays) == 1
        replay = replays[0]["body"]
        cut = "".join(f"tok{i}" for i in range(3))  # what the cut worker sent
        assert replay["messages"][-1] == {"role": "assistant", "content": cut}
        assert replay["add_generation_prompt"] is False
        assert replay["max_tokens"] == 5
        migrated = streams[["t-1", "t-2"].index(replays[0]["id"])]
        chunks = [json.loads(line[6:]) for line in migrated if line != "data: [DONE]"]
        text = "".join(piece(c) for chunk in chunks for c in chunk["choices"])
        assert text == cut + "".join(f"tok{i}" for i in range(5))
        assert migrated.count("data: [DONE]") == 1
        assert chunks[-1]["usage"]["completion_tokens"] == 8
        roles = [c for chunk in chunks for c in chunk["choices"] if "role" in c.get("delta", {})]
        assert len(roles) == 1
        fe.assert_idle(requests=2)
    assert not net.expired()


def test_the_migration_limit_comes_from_the_flag_or_the_environment() -> None:
    assert parse_config(["serve"], {})[1].migration_limit == 0
    assert parse_config(["serve"], {"DYN_MIGRATION_LIMIT": "3"})[1].migration_limit == 3
    flag = parse_config(["serve", "--migration-limit", "2"], {"DYN_MIGRATION_LIMIT": "3"})[1]
    assert flag.migration_limit == 2
