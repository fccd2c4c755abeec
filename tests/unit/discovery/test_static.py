"""Static discovery: ``--upstream`` URLs and the ``--upstream-file`` (YAML or JSON), reloaded.

The timing (the file checked every second, an unreachable worker asked again every two) runs on
a FakeClock moved by hand, with a scripted ``/v1/models`` fetcher, so every reload and retry
happens at an exact simulated time. The same paths for real are in
``tests/system/test_discovery.py``.
"""

import json
import logging
from pathlib import Path

import pytest

from dynamo_llm.discovery.static import (
    StaticDiscovery,
    UpstreamFile,
    normalise_url,
    parse_upstream_file,
)
from dynamo_llm.router import Worker, WorkerSet
from dynamo_llm.router.kv_blocks import KvEventSource
from dynamo_llm.runtime import FakeClock
from tests.helpers import write

A, B, C = "http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"


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
    assert parse_upstream_file(YAML).models == EXPECTED
    as_json = json.dumps(
        {"llama-3-8b": [A, "10.0.0.2:8000/"], "org/qwen-7b": [C + "/v1"], "single": A}
    )
    assert parse_upstream_file(as_json).models == EXPECTED
    assert parse_upstream_file("") == UpstreamFile({})
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


def test_a_worker_may_have_its_own_key_which_no_repr_shows() -> None:
    text = f"""\
llama:
  - {A}
  - url: {B}/v1
    api_key: sk-b-planted
qwen:
  - url: {B}
    api_key: sk-b-planted
  - url: {C}
"""
    parsed = parse_upstream_file(text)
    assert parsed.models == {"llama": [A, B], "qwen": [B, C]}
    assert parsed.api_keys == {B: "sk-b-planted"}
    assert "sk-b-planted" not in repr(parsed)


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("m: [{url: http://a, api_key: k1}, {url: http://a/, api_key: k2}]\n", "two different"),
        ("m: [{url: 'http://u:pw@a', api_key: k1}]\n", "http://***@a has both an api_key"),
        ("m: [{url: http://a, apikey: k1}]\n", "unknown field apikey"),
        ("m: [{api_key: k1}]\n", "a worker is a URL or"),
        ("m: [{url: http://a, api_key: [k1]}]\n", "a worker is a URL or"),
    ],
)
def test_a_malformed_worker_key_is_refused_without_quoting_a_key(text: str, said: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_upstream_file(text)
    assert said in str(caught.value)
    assert "k1" not in str(caught.value) and "k2" not in str(caught.value)
    assert "pw" not in str(caught.value)


def test_a_yaml_error_names_its_place_but_never_quotes_the_line() -> None:
    text = "m:\n  - url: http://a\n    api_key: sk-planted: x\n"
    with pytest.raises(ValueError) as caught:
        parse_upstream_file(text)
    assert "line 3" in str(caught.value)
    assert "sk-planted" not in str(caught.value)


# --- StaticDiscovery on a FakeClock --------------------------------------------------------------


class Fetcher:
    """``/v1/models`` of each URL, scripted: a list of answers (an exception = unreachable);
    the last answer repeats. Records when each URL was asked."""

    def __init__(self, clock: FakeClock, script: dict[str, list[object]]) -> None:
        self.clock = clock
        self.script = script
        self.calls: list[tuple[str, float]] = []

    async def __call__(self, url: str) -> tuple[frozenset[str], str]:
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
        forbid_credentials: str | None = None,
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
            forbid_credentials=forbid_credentials,
        )

    def models_of(self) -> dict[str, frozenset[str]]:
        return {w.url: w.models for w in self.workers}


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


@pytest.mark.parametrize(
    "broken, forbid, said",
    [
        ("m: [http://a\n", None, "while parsing"),
        # With an upstream key, a worker URL with credentials (both the Authorization header).
        (
            "m: [http://ops:s3cret@10.0.0.9:8000]\n",
            "--upstream-api-key",
            "worker http://***@10.0.0.9:8000 has credentials in its URL, which cannot go with "
            "--upstream-api-key",
        ),
    ],
    ids=["malformed", "credentials-with-upstream-key"],
)
async def test_a_broken_file_keeps_the_last_good_set_and_says_so(
    broken: str,
    forbid: str | None,
    said: str,
    *,
    tmp_path: Path,
    safety_net: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "upstreams.yaml"
    write(path, f"m: [{A}]\n")
    clock = FakeClock()
    h = Harness(clock, path=path, forbid_credentials=forbid)
    await h.discovery.start()
    try:
        with caplog.at_level(logging.ERROR, logger="dynamo_llm.discovery"):
            write(path, broken)
            await clock.advance(1)
        assert h.models_of() == {A: frozenset({"m"})}
        assert len(h.published) == 1
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        assert str(path) in errors[0].getMessage()
        assert "keeping the previous workers" in errors[0].getMessage()
        assert said in errors[0].getMessage()
        assert "s3cret" not in errors[0].getMessage()
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
        script={A: [down, down, (frozenset({"m"}), "dynamo-llm")], B: [(frozenset({"n"}), "vllm")]},
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
        other = h.workers.get(B)
        assert other is not None and other.owner == "vllm" and not other.is_ours
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
    h = Harness(clock, urls=(A,), path=path, script={A: [(frozenset({"own"}), "")]})
    await h.discovery.start()
    try:
        assert h.models_of() == {A: frozenset({"own", "from-file"})}
        write(path, f"other: [{B}]\n")
        await clock.advance(1)
        assert h.workers.get(A) is not None  # still named by --upstream
        assert B in h.workers
    finally:
        await h.discovery.aclose()


def test_an_upstream_worker_may_name_its_kv_event_endpoints() -> None:
    text = """
m:
  - http://a:1
  - url: http://b:2
    kv_events_endpoint: tcp://b:5557
    kv_events_replay_endpoint: tcp://b:5558
    kv_block_size: 16
"""
    upstream = parse_upstream_file(text)
    assert upstream.models == {"m": ["http://a:1", "http://b:2"]}
    assert upstream.kv_events == {"http://b:2": KvEventSource("tcp://b:5557", "tcp://b:5558", 16)}


@pytest.mark.parametrize(
    "entry",
    [
        "{kv_events_endpoint: tcp://b:1}",
        "{url: http://b, kv_events_endpoint: 5}",
        "{url: http://b, kv_events_endpoint: tcp://b:1, kv_block_size: 0}",
    ],
)
def test_a_malformed_kv_event_entry_is_refused(entry: str) -> None:
    with pytest.raises(ValueError):
        parse_upstream_file(f"m: [{entry}]")
