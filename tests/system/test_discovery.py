"""Static discovery for real: a frontend whose ``--upstream`` worker is down at start and comes up
later, and an upstream file edited while the frontend runs.

The same paths on a fake clock, with a scripted fetcher, are in
``tests/unit/discovery/test_static.py``."""

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx

from dynamo_llm.config import Config
from dynamo_llm.fleet import Fleet, build_routed_app
from dynamo_llm.http.server import HttpServer
from dynamo_llm.runtime.clock import SystemClock
from dynamo_llm.testing.bad_workers import spawn_bad_worker
from tests.helpers import write
from tests.system.fleet_helpers import fleet_of


async def until_changed(fleet: Fleet, predicate: Callable[[], bool]) -> None:
    """Return once ``predicate()`` holds, re-checking at each change of the worker set.

    A change is announced as the worker is added; discovery publishes the models (the app's
    model list) before its task next waits, so by the time this task runs again they are in.
    """
    changed = asyncio.Event()
    unsubscribe = fleet.workers.on_change(lambda _models: changed.set())
    try:
        while not predicate():
            changed.clear()
            await changed.wait()
    finally:
        unsubscribe()


async def test_a_frontend_learns_a_worker_that_comes_up_after_it(tmp_path: Path) -> None:
    async with asyncio.timeout(15) as net, spawn_bad_worker("refuse") as worker:
        config = Config.from_env({"DYN_UPSTREAMS": worker.url})
        app = build_routed_app(config, SystemClock())
        fleet = fleet_of(app)
        server = HttpServer(app, "127.0.0.1", 0)
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=server.base_url) as http:
                assert (await http.get("/v1/models")).json()["data"] == []
                assert (await http.get("/health")).status_code == 503
                body = {"model": "bad-model", "messages": [{"role": "user", "content": "hi"}]}
                assert (await http.post("/v1/chat/completions", json=body)).status_code == 404

                worker.options.behaviour = "ok"
                await worker.restart()
                await until_changed(fleet, lambda: "bad-model" in app.models)
                listed = (await http.get("/v1/models")).json()["data"]
                assert [card["id"] for card in listed] == ["bad-model"]
                assert (await http.get("/health")).status_code == 200
                reply = await http.post("/v1/chat/completions", json=body)
                assert reply.status_code == 200, reply.text
        finally:
            await app.shutdown(grace=0)
            await server.stop()
    assert not net.expired()


async def test_a_frontend_follows_edits_of_its_upstream_file(tmp_path: Path) -> None:
    async with (
        asyncio.timeout(15) as net,
        spawn_bad_worker("ok", tokens=4, gap=0.25) as first,
        spawn_bad_worker("ok") as second,
    ):
        path = tmp_path / "upstreams.yaml"
        write(path, f"m: [{first.url}]\n")
        config = Config().replace(upstream_file=str(path))
        app = build_routed_app(config, SystemClock())
        fleet = fleet_of(app)
        server = HttpServer(app, "127.0.0.1", 0)
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=server.base_url) as http:
                body = {"model": "n", "prompt": "hi"}
                assert (await http.post("/v1/completions", json=body)).status_code == 404

                write(path, f"m: [{first.url}]\nn: [{second.url}]\n")  # a worker added
                await until_changed(fleet, lambda: "n" in app.models)
                reply = await http.post("/v1/completions", json=body)
                assert reply.status_code == 200, reply.text
                assert len((await second.record())["requests"]) == 1

                # A worker removed while it streams: its request in flight still finishes.
                stream = {"model": "m", "prompt": "hi", "stream": True}
                async with http.stream("POST", "/v1/completions", json=stream) as response:
                    lines = response.aiter_lines()
                    async for line in lines:
                        if line.startswith("data: "):
                            break  # the first token: the worker is mid-stream
                    write(path, f"n: [{second.url}]\n")
                    await until_changed(fleet, lambda: "m" not in app.models)
                    assert first.url not in fleet.workers
                    rest = [line async for line in lines if line.startswith("data: ")]
                assert response.status_code == 200
                assert rest[-1] == "data: [DONE]"
                assert sum('"text":"tok' in line for line in rest) == 3
                models = [card["id"] for card in (await http.get("/v1/models")).json()["data"]]
                assert models == ["n"]
                await app.wait_until_idle()
                assert app.inflight == 0
        finally:
            await app.shutdown(grace=0)
            await server.stop()
    assert not net.expired()
