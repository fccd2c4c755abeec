"""Static discovery: ``--upstream`` URLs and the ``--upstream-file`` (YAML or JSON), reloaded.

The timing (the file checked every second, an unreachable worker asked again every two) runs on
a FakeClock moved by hand, with a scripted ``/v1/models`` fetcher, so every reload and retry
happens at an exact simulated time. Two tests then run the same paths for real: a frontend whose
``--upstream`` worker is down at start and comes up later, and an upstream file edited while the
frontend runs.
"""

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from dynamo_llm.config import Config
from dynamo_llm.discovery.static import StaticDiscovery, normalise_url, parse_upstream_file
from dynamo_llm.fleet import Fleet, build_routed_app
from dynamo_llm.http.server import HttpServer
from dynamo_llm.router import Worker, WorkerSet
from dynamo_llm.runtime import FakeClock
from dynamo_llm.runtime.clock import SystemClock
from dynamo_llm.testing.bad_workers import spawn_bad_worker

A, B, C = "http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"


@pytest.fixture
async def safety_net() -> AsyncIterator[None]:
    async with asyncio.timeout(10) as net:
        yield
    assert not net.expired()


# --- the file format -----------------------------------------------------------------------------

YAML = """\
llama-3-8b:
  - http://10.0.0.1:8000
  - 10.0.0.2:8000/
org/qwen-7b: [http://10.0.0.3:8000/v1]
single: http://10.0.0.1:8000
"""
EXPECTED = {"llama-3-8b": [A, B], "org/qwen-7b": [C], "single": [A]}


def test_the_upstream_file_is_yaml_or_json_with_urls_normalised() -> None:
    assert parse_upstream_file(YAML) == EXPECTED
    as_json = json.dumps(
        {"llama-3-8b": [A, "10.0.0.2:8000/"], "org/qwen-7b": [C + "/v1"], "single": A}
    )
    assert parse_upstream_file(as_json) == EXPECTED
    assert parse_upstream_file("") == {}
    assert normalise_url(" https://h:1/v1/ ") == "https://h:1"


@pytest.mark.parametrize(
    "text",
    [
        "- http://10.0.0.1:8000\n",  # a list, not a mapping
        "m: [1, 2]\n",  # not URLs
        "m: [http://a, '']\n",  # an empty URL
        "m: {url: http://a}\n",  # not a list
        "'': [http://a]\n",  # an empty model name
        "1: [http://a]\n",  # a model name that is not a string
        "m: [http://a\n",  # not YAML at all
        '{"m": ["http://a"]',  # truncated JSON
    ],
)
def test_a_malformed_upstream_file_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_upstream_file(text)


# --- StaticDiscovery on a FakeClock --------------------------------------------------------------


class Fetcher:
    """``/v1/models`` of each URL, scripted: a list of answers (an exception = unreachable);
    the last answer repeats. Records when each URL was asked."""

    def __init__(self, clock: FakeClock, script: dict[str, list[object]]) -> None:
        self.clock = clock
        self.script = script
        self.calls: list[tuple[str, float]] = []

    async def __call__(self, url: str) -> tuple[frozenset[str], bool]:
        self.calls.append((url, self.clock.now()))
        answers = self.script[url]
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, tuple)
        return answer

    def times(self, url: str) -> list[float]:
        return [t for u, t in self.calls if u == url]


class Harness:
    def __init__(
        self,
        clock: FakeClock,
        *,
        urls: tuple[str, ...] = (),
        path: Path | None = None,
        script: dict[str, list[object]] | None = None,
    ) -> None:
        async def never(worker: Worker) -> bool:
            return False

        self.clock = clock
        self.workers = WorkerSet(clock=clock, probe=never)
        self.fetcher = Fetcher(clock, script or {})
        self.published: list[frozenset[str]] = []
        self.discovery = StaticDiscovery(
            self.workers,
            self.fetcher,
            clock,
            urls=urls,
            path=path,
            on_models=self.published.append,
        )

    def models_of(self) -> dict[str, frozenset[str]]:
        return {w.url: w.models for w in self.workers}


def write(path: Path, text: str) -> None:
    """Rewrite the file and move its mtime on by a second, whatever the file system's
    timestamp granularity, so that the change is visible to a reload."""
    stamp = path.stat().st_mtime if path.exists() else 1_000_000.0
    path.write_text(text)
    os.utime(path, (stamp + 1, stamp + 1))


@pytest.mark.parametrize("suffix", ["yaml", "json"])
async def test_file_workers_are_registered_at_start_without_asking_them(
    suffix: str, tmp_path: Path, safety_net: None
) -> None:
    path = tmp_path / f"upstreams.{suffix}"
    write(path, YAML if suffix == "yaml" else json.dumps(EXPECTED))
    clock = FakeClock()
    h = Harness(clock, path=path)
    await h.discovery.start()
    try:
        assert h.models_of() == {
            A: frozenset({"llama-3-8b", "single"}),
            B: frozenset({"llama-3-8b"}),
            C: frozenset({"org/qwen-7b"}),
        }
        assert [w.url for w in h.workers.workers_for("llama-3-8b")] == [A, B]  # file order
        assert h.published == [frozenset({"llama-3-8b", "org/qwen-7b", "single"})]
        assert h.fetcher.calls == []
        await clock.advance(10)
        assert len(h.published) == 1  # an unchanged file changes nothing
    finally:
        await h.discovery.aclose()


async def test_the_file_is_reloaded_when_it_changes(tmp_path: Path, safety_net: None) -> None:
    path = tmp_path / "upstreams.yaml"
    write(path, f"m: [{A}, {B}]\n")
    clock = FakeClock()
    h = Harness(clock, path=path)
    await h.discovery.start()
    try:
        a = h.workers.get(A)
        assert a is not None
        slot_a = h.workers.acquire(A)
        slot_b = h.workers.acquire(B)
        write(path, f"m: [{A}, {C}]\nn: [{C}]\n")  # C added (two models), B removed
        await clock.advance(0.9)
        assert set(h.models_of()) == {A, B}  # not before the next check
        await clock.advance(0.1)
        assert h.models_of() == {A: frozenset({"m"}), C: frozenset({"m", "n"})}
        assert h.published[-1] == frozenset({"m", "n"})
        # A kept its state across the reload; B's request in flight ends harmlessly.
        assert h.workers.get(A) is a and a.inflight == 1
        slot_b.release()
        slot_a.release()
        assert a.inflight == 0

        write(path, f"n: [{C}]\n")  # model m gone with its last worker
        await clock.advance(1)
        assert h.models_of() == {C: frozenset({"n"})}
        assert h.published[-1] == frozenset({"n"})
        assert len(h.published) == 3
    finally:
        await h.discovery.aclose()


async def test_a_broken_file_keeps_the_last_good_set_and_says_so(
    tmp_path: Path, safety_net: None, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "upstreams.yaml"
    write(path, f"m: [{A}]\n")
    clock = FakeClock()
    h = Harness(clock, path=path)
    await h.discovery.start()
    try:
        with caplog.at_level(logging.ERROR, logger="dynamo_llm.discovery"):
            write(path, "m: [http://a\n")
            await clock.advance(1)
        assert h.models_of() == {A: frozenset({"m"})}
        assert len(h.published) == 1
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        assert str(path) in errors[0].getMessage()
        assert "keeping the previous workers" in errors[0].getMessage()
        await clock.advance(5)
        assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1  # said once

        path.unlink()  # gone: the same
        await clock.advance(1)
        assert h.models_of() == {A: frozenset({"m"})}

        write(path, f"m: [{B}]\n")  # fixed: applied at the next check
        await clock.advance(1)
        assert h.models_of() == {B: frozenset({"m"})}
    finally:
        await h.discovery.aclose()


@pytest.mark.parametrize("text", [None, "m: [http://a\n"])
async def test_a_missing_or_broken_file_at_start_is_an_error(
    text: str | None, tmp_path: Path
) -> None:
    path = tmp_path / "upstreams.yaml"
    if text is not None:
        write(path, text)
    h = Harness(FakeClock(), path=path)
    with pytest.raises(ValueError, match=str(path)):
        await h.discovery.start()
    await h.discovery.aclose()


async def test_an_unreachable_upstream_is_asked_again_every_two_seconds_until_it_answers(
    safety_net: None,
) -> None:
    clock = FakeClock()
    down = ConnectionRefusedError("connection refused")
    h = Harness(
        clock,
        urls=(A + "/v1", B),
        script={A: [down, down, (frozenset({"m"}), True)], B: [(frozenset({"n"}), False)]},
    )
    await h.discovery.start()
    try:
        # B answered at once; A is not registered (it serves nothing yet).
        assert h.models_of() == {B: frozenset({"n"})}
        assert h.published == [frozenset({"n"})]
        await clock.advance(3.9)
        assert h.fetcher.times(A) == [0.0, 2.0]
        assert A not in h.workers
        await clock.advance(0.1)
        assert h.fetcher.times(A) == [0.0, 2.0, 4.0]
        worker = h.workers.get(A)
        assert worker is not None and worker.models == {"m"} and worker.is_ours
        assert h.published == [frozenset({"n"}), frozenset({"m", "n"})]
        await clock.advance(20)
        assert h.fetcher.times(A) == [0.0, 2.0, 4.0]  # known now: never asked again
        assert h.fetcher.times(B) == [0.0]
    finally:
        await h.discovery.aclose()


async def test_an_upstream_also_named_in_the_file_serves_both_and_stays_when_dropped_from_it(
    tmp_path: Path, safety_net: None
) -> None:
    path = tmp_path / "upstreams.yaml"
    write(path, f"from-file: [{A}]\n")
    clock = FakeClock()
    h = Harness(clock, urls=(A,), path=path, script={A: [(frozenset({"own"}), False)]})
    await h.discovery.start()
    try:
        assert h.models_of() == {A: frozenset({"own", "from-file"})}
        write(path, f"other: [{B}]\n")
        await clock.advance(1)
        assert h.workers.get(A) is not None  # still named by --upstream
        assert B in h.workers
    finally:
        await h.discovery.aclose()


# --- for real ------------------------------------------------------------------------------------


def fleet_of(app: object) -> Fleet:
    for start, _ in app._lifecycle:  # type: ignore[attr-defined]
        fleet = getattr(start, "__self__", None)
        if isinstance(fleet, Fleet):
            return fleet
    raise AssertionError("build_routed_app registered no Fleet")


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
