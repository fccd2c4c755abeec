"""Migration (SPEC §9) for real: the routed frontend in front of real ``dynamo-llm worker --engine
mocker`` processes, one of which is SIGKILLed mid-stream, and bad workers that cut their stream.

The Router itself, with a scripted worker client and a fake clock, is in
``tests/unit/router/test_migration.py``."""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dynamo_llm.router import Worker
from dynamo_llm.testing.process import ServerProcess
from tests.system.fleet_helpers import (
    SAFETY_NET,
    RoutedFrontend,
    bad_workers,
    path_of,
    routed_frontend,
)

MODEL = "m"
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
        self.token_ids = 0  # chunks that carried token ids the client did not ask for


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
            seen.token_ids += "prompt_token_ids" in obj
            for choice in obj["choices"]:
                seen.token_ids += "token_ids" in choice or "prompt_token_ids" in choice
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
        assert seen.token_ids == 0, "the ids asked of the worker for a replay are not relayed"
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


async def test_a_unary_request_moves_on_a_refused_connection_uncounted(tmp_path: Path) -> None:
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
            # Nothing was sent to the refusing worker: a retry, not a migration (issue 12).
            assert fe.value("model_migration_total") == 0
            assert fe.worker(upstreams[0]).quarantined
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
