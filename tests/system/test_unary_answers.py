"""A unary answer taken whole, from our own worker: a real ``dynamo-llm worker --engine mocker``
process behind the routed frontend (in this process, on a real socket).

A routed unary request of one choice, with no migration and no silence limit, is asked of one of
our workers as unary (``stream: false``) and its answer reaches the client as the worker wrote it,
our id in it. Only of ours: a real engine keeps generating a unary answer after the client hung
up, where ours stops (a foreign worker is always asked for a stream:
``tests/system/test_worker_fidelity.py``). The evidence is the worker's own ``/metrics``: its
request counts by ``request_type`` say how it was asked, and the mocker's scheduler says when the
request left it. A fake worker that says it is ours (``bad_workers --owned-by dynamo-llm``)
shows how a whole answer's faults reach the client.
"""

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dynamo_llm.testing.process import ServerProcess
from tests.helpers import Samples, polled, scrape, value
from tests.system.fleet_helpers import (
    SAFETY_NET,
    RawClient,
    bad_workers,
    chat,
    ok,
    routed_frontend,
    send,
)

MODEL = "own"


@pytest.fixture(scope="module")
def own_worker() -> Iterator[str]:
    """Our own worker, at ``--speedup-ratio 1`` (about 6 ms a token): a long request is certainly
    still generating when its client hangs up."""
    args = ["worker", "--engine", "mocker", "--speedup-ratio", "1", "--http-port", "0"]
    with ServerProcess([*args, "--model-name", MODEL]) as proc:
        yield proc.wait_ready(timeout=30)
    assert proc.returncode == 0, proc.log


def story(max_tokens: int, **extra: Any) -> dict[str, Any]:
    content = "tell me a long story"
    return {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, **extra}  # fmt: skip


async def samples(url: str) -> Samples:
    return await asyncio.to_thread(scrape, url)


def grown(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, model=MODEL, **labels) - value(before, name, model=MODEL, **labels)


async def test_our_worker_is_asked_for_a_unary_answer_that_reaches_the_client_whole(
    own_worker: str, tmp_path: Path
) -> None:
    body = story(8, return_token_ids=True)
    async with asyncio.timeout(SAFETY_NET) as net:
        async with httpx.AsyncClient(base_url=own_worker, timeout=SAFETY_NET) as http:
            asked = await http.post("/v1/chat/completions", json=body)
        before = await samples(own_worker)
        async with routed_frontend(tmp_path, upstreams=(own_worker,)) as fe:
            assert fe.worker(own_worker).is_ours  # its /v1/models says owned_by dynamo-llm
            reply = await ok(fe, body, **{"X-Request-Id": "whole-1"})
            await fe.app.wait_until_idle()
            fe.assert_idle(1)
            output_tokens = fe.value("output_sequence_tokens_sum", model=MODEL)
            input_tokens = fe.value("input_sequence_tokens_sum", model=MODEL)
        after = await samples(own_worker)
    assert not net.expired()
    direct, routed = asked.json(), json.loads(reply.body)
    assert routed["id"] == "chatcmpl-whole-1" and routed["model"] == MODEL
    # Every other key as the worker wrote it (the mocker is deterministic): the message, the
    # token ids, the usage.
    assert drop_ids(routed) == drop_ids(direct)
    assert len(routed["choices"][0]["token_ids"]) == routed["usage"]["completion_tokens"] == 8
    assert (output_tokens, input_tokens) == (8, routed["usage"]["prompt_tokens"])
    # The worker was asked for a unary answer, not a stream.
    assert grown(before, after, "dynamo_frontend_requests_total", request_type="unary") == 1
    assert grown(before, after, "dynamo_frontend_requests_total", request_type="stream") == 0


def drop_ids(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in answer.items() if k not in ("id", "created")}


async def test_a_client_hang_up_during_a_unary_answer_stops_our_workers_engine(
    own_worker: str, tmp_path: Path
) -> None:
    cancelled = "dynamo_mocker_cancelled_requests_total"
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        routed_frontend(tmp_path, upstreams=(own_worker,)) as fe,
    ):
        before = await samples(own_worker)
        # 4 000 tokens, ~25 s of simulated decode: past the safety net, unless it is stopped.
        client = await RawClient.send(fe, story(4000), {"X-Request-Id": "gone-1"})

        async def running() -> bool:
            s = await samples(own_worker)
            return value(s, "dynamo_mocker_running_requests", model=MODEL) == 1

        await polled(running, "the request running in the mocker")
        client.hang_up()

        async def gone() -> bool:
            s = await samples(own_worker)
            return grown(before, s, cancelled) == 1 and all(
                value(s, name, model=MODEL) == 0
                for name in (
                    "dynamo_mocker_running_requests",
                    "dynamo_mocker_waiting_requests",
                    "dynamo_mocker_kv_blocks_used",
                )
            )

        await polled(gone, "the cancelled request leaving the mocker")
        await fe.app.wait_until_idle()
        fe.assert_idle(1)
        assert fe.value("model_cancellation_total", request_type="unary") == 1
        after = await samples(own_worker)
    assert not net.expired()
    # Asked as unary, it ended cancelled in the worker too, and nothing was finished.
    unary_cancelled = {"request_type": "unary", "error_type": "cancelled"}
    assert grown(before, after, "dynamo_frontend_requests_total", **unary_cancelled) == 1
    assert grown(before, after, "dynamo_mocker_finished_requests_total") == 0


# A whole answer's faults, from fake workers that say they are ours. No silence limit is set (it
# would make the request streamed), so no worker that falls silent here. The client gets an HTTP
# error, as for a folded stream.
WHOLE_FAULTS = {
    "die-mid-stream": (503, "worker_disconnected", True),
    # Its body ends cleanly, cut short: the worker's answer is not a completion.
    "stop-mid-stream": (502, None, False),
    "error-mid-stream": (502, None, False),
    "malformed-sse": (502, None, False),
}


async def test_a_faulty_whole_answer_is_the_matching_http_error(tmp_path: Path) -> None:
    specs = {
        name: {"behaviour": name, "model": name, "owned_by": "dynamo-llm"} for name in WHOLE_FAULTS
    }
    async with asyncio.timeout(SAFETY_NET) as net, bad_workers(**specs) as w:
        upstreams = tuple(worker.url for worker in w.values())
        async with routed_frontend(tmp_path, upstreams=upstreams) as fe:
            assert all(fe.worker(worker.url).is_ours for worker in w.values())
            replies = await asyncio.gather(
                *(send(fe, chat(name, stream=False)) for name in WHOLE_FAULTS)
            )
            for (name, (status, code, quarantines)), reply in zip(
                WHOLE_FAULTS.items(), replies, strict=True
            ):
                assert reply.status == status, (name, reply.body)
                assert reply.error()["code"] == code, (name, reply.body)
                assert (fe.worker(w[name].url).failures > 0) == quarantines, name
                if name != "die-mid-stream":
                    [seen] = (await w[name].record())["requests"]
                    assert seen["body"]["stream"] is False  # asked for a whole answer
            await fe.app.wait_until_idle()
            assert fe.value("requests_total", error_type="unavailable") == 1
            assert fe.value("requests_total", error_type="internal") == 3
            fe.assert_idle(4)
    assert not net.expired()
