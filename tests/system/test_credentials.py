"""API keys in and out, and secrets never shown (issue 10, problems 1-3). Real processes: a
``dynamo-llm worker`` that needs a key, a ``serve`` in front of it that has one."""

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dynamo_llm.testing import FakeEngine, running_frontend
from dynamo_llm.testing.process import ServerProcess
from tests.helpers import environ_without_dyn

MODEL = "llama"
WORKER_KEY = "wk-planted-4f1d9c"
CLIENT_KEY = "ck-planted-77ab20"
URL_SECRET = "pw-planted-93e1aa"
MOCKER = ["--engine", "mocker", "--speedup-ratio", "1000", "--http-port", "0"]


@pytest.fixture(scope="module")
def locked_worker() -> Iterator[str]:
    """A worker that answers only requests carrying ``WORKER_KEY``."""
    env = {**environ_without_dyn(), "DYN_API_KEY": WORKER_KEY}
    with ServerProcess(["worker", *MOCKER, "--model-name", MODEL], env=env) as proc:
        yield proc.wait_ready(timeout=30)
    assert proc.returncode == 0, proc.log


@pytest.fixture(scope="module")
def open_worker() -> Iterator[str]:
    with ServerProcess(
        ["worker", *MOCKER, "--model-name", MODEL], env=environ_without_dyn()
    ) as proc:
        yield proc.wait_ready(timeout=30)
    assert proc.returncode == 0, proc.log


def _chat(stream: bool = False) -> dict[str, object]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 5,
        "stream": stream,
    }


async def test_with_api_keys_every_v1_route_needs_one_and_the_probes_do_not() -> None:
    env = {"DYN_API_KEY": f"{CLIENT_KEY},second-key"}
    async with (
        running_frontend(FakeEngine(), environ=env) as fe,
        httpx.AsyncClient(base_url=fe.base_url) as c,
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": CLIENT_KEY}):
            resp = await c.get("/v1/models", headers=headers)
            assert resp.status_code == 401, headers
            assert resp.headers["www-authenticate"] == "Bearer"
            error = resp.json()["error"]
            assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
            assert CLIENT_KEY not in resp.text
        unknown = await c.post("/v1/no-such-route")
        assert unknown.status_code == 401  # a stranger learns nothing about the routes
        for key in (CLIENT_KEY, "second-key"):
            ok = await c.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200
        for path in ("/health", "/live", "/metrics", "/openapi.json"):
            assert (await c.get(path)).status_code == 200, path
        async with openai.AsyncOpenAI(
            base_url=f"{fe.base_url}/v1", api_key=CLIENT_KEY, max_retries=0
        ) as sdk:
            answer = await sdk.chat.completions.create(
                model="test-model", messages=[{"role": "user", "content": "hi"}]
            )
            assert answer.choices[0].message.content == "Hello, world!"
        async with openai.AsyncOpenAI(
            base_url=f"{fe.base_url}/v1", api_key="nope", max_retries=0
        ) as sdk:
            with pytest.raises(openai.AuthenticationError):
                await sdk.models.list()


def _requests_total(metrics_text: str) -> dict[tuple[str, ...], float]:
    """``requests_total`` samples with a count, by (model, endpoint, request_type, error_type)."""
    counted: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "dynamo_frontend_requests_total" and sample.value:
                labels = sample.labels
                key = (labels["model"], labels["endpoint"], labels["request_type"])
                counted[(*key, labels["error_type"])] = sample.value
    return counted


async def test_a_401_is_counted_once_as_unauthorized_and_its_body_labels_nothing() -> None:
    planted = "attacker-model-5e1f"
    async with (
        running_frontend(FakeEngine(), environ={"DYN_API_KEY": CLIENT_KEY}) as fe,
        httpx.AsyncClient(base_url=fe.base_url) as c,
    ):
        refused = [
            ("/v1/chat/completions", {"model": planted, "messages": [], "stream": True}),
            ("/v1/chat/completions", {"model": "test-model", "messages": []}),
            ("/v1/completions", {"model": planted + "-2", "prompt": "x"}),
        ]
        for path, body in refused:
            resp = await c.post(path, json=body, headers={"Authorization": "Bearer wrong"})
            assert resp.status_code == 401
        # What no handler would have answered is not a request of any endpoint: not counted.
        assert (await c.get("/v1/chat/completions")).status_code == 401
        assert (await c.get("/v1/models")).status_code == 401
        assert (await c.post("/v1/no-such-route", json={"model": planted})).status_code == 401
        ok = await c.post(
            "/v1/chat/completions",
            json={"model": "test-model", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        )
        assert ok.status_code == 200
        text = (await c.get("/metrics")).text
    assert planted not in text
    assert _requests_total(text) == {
        ("unknown_model", "chat_completions", "unary", "unauthorized"): 2,
        ("unknown_model", "completions", "unary", "unauthorized"): 1,
        ("test-model", "chat_completions", "unary", ""): 1,
    }


def test_a_locked_worker_refuses_strangers_including_their_stops(locked_worker: str) -> None:
    with httpx.Client(base_url=locked_worker, timeout=30) as c:
        assert c.post("/v1/chat/completions", json=_chat()).status_code == 401
        stop = c.post("/v1/requests/victim-id/stop")
        assert stop.status_code == 401
        headers = {"Authorization": f"Bearer {WORKER_KEY}"}
        with c.stream("POST", "/v1/chat/completions", json=_chat(True), headers=headers) as s:
            # A stranger's stop of this very request changes nothing: it still ends cleanly.
            rid = s.headers["x-request-id"]
            assert c.post(f"/v1/requests/{rid}/stop").status_code == 401
            body = "".join(s.iter_text())
        assert body.rstrip().endswith("data: [DONE]")
        assert '"finish_reason":"length"' in body


def _ask(base: str) -> None:
    with openai.OpenAI(base_url=f"{base}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30) as sdk:
        answer = sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=5
        )
    assert answer.choices[0].finish_reason == "length"
    assert answer.choices[0].message.content


def _shown(base: str, env: dict[str, str]) -> list[str]:
    """What the frontend shows an operator: /health, /metrics and serve --help."""
    with httpx.Client(base_url=base, timeout=30) as c:
        shown = [c.get("/health").text, c.get("/metrics").text]
    help_text = subprocess.run(
        [sys.executable, "-m", "dynamo_llm", "serve", "--help"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [*shown, help_text]


def test_a_frontend_with_the_upstream_key_fronts_a_locked_worker(locked_worker: str) -> None:
    env = {
        **environ_without_dyn(),
        "DYN_UPSTREAM_API_KEY": WORKER_KEY,
        "DYN_API_KEY": CLIENT_KEY,
        "DYN_UPSTREAMS": locked_worker,
    }
    with ServerProcess(["serve", "--http-port", "0", "--log-level", "debug"], env=env) as proc:
        base = proc.wait_ready(timeout=30)
        _ask(base)
        shown = _shown(base, env)
    for text in [*shown, proc.log]:
        assert WORKER_KEY not in text
        assert CLIENT_KEY not in text
    assert proc.returncode == 0, proc.log


def test_credentials_in_a_worker_url_are_used_but_never_shown(open_worker: str) -> None:
    host_port = open_worker.removeprefix("http://")
    env = {
        **environ_without_dyn(),
        "DYN_API_KEY": CLIENT_KEY,
        "DYN_UPSTREAMS": f"http://operator:{URL_SECRET}@{host_port}",
    }
    with ServerProcess(["serve", "--http-port", "0", "--log-level", "debug"], env=env) as proc:
        base = proc.wait_ready(timeout=30)
        _ask(base)
        shown = _shown(base, env)
    assert host_port in shown[0]  # the worker is in /health, its credentials are not
    assert f'worker="http://***@{host_port}"' in shown[1]
    for text in [*shown, proc.log]:
        assert URL_SECRET not in text
        assert CLIENT_KEY not in text
    assert proc.returncode == 0, proc.log


def _running(worker: str) -> float:
    text = httpx.get(f"{worker}/metrics", timeout=10).text
    line = next(x for x in text.splitlines() if x.startswith("dynamo_mocker_running_requests{"))
    return float(line.rsplit(" ", 1)[1])


def test_a_stranger_who_knows_a_clients_request_id_cannot_stop_it() -> None:
    """The worker only knows each attempt by the frontend's fresh UUID, never by the id the
    client chose, so knowing (or guessing) the client's ``X-Request-Id`` stops nothing."""
    real_time = ["worker", "--engine", "mocker", "--http-port", "0", "--model-name", MODEL]
    with (
        ServerProcess(
            real_time, env=environ_without_dyn()
        ) as worker,  # ~6 ms a token: 400 take seconds
        ServerProcess(
            ["serve", "--http-port", "0"],
            env={**environ_without_dyn(), "DYN_UPSTREAMS": worker.wait_ready(timeout=30)},
        ) as frontend,
    ):
        open_worker = worker.url
        assert open_worker is not None
        base = frontend.wait_ready(timeout=30)
        body = {**_chat(True), "max_tokens": 400}
        headers = {"X-Request-Id": "victim-request"}
        with (
            httpx.Client(base_url=base, timeout=30) as client,
            client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as s,
        ):
            assert s.headers["x-request-id"] == "victim-request"
            lines = s.iter_lines()
            while not next(lines).startswith("data: "):
                pass  # the first token: the request is generating on the worker
            assert _running(open_worker) == 1
            stop = httpx.post(f"{open_worker}/v1/requests/victim-request/stop", timeout=10)
            assert stop.status_code == 404
            rest = "\n".join(lines)
        assert rest.rstrip().endswith("data: [DONE]")
        assert '"finish_reason":"length"' in rest
    assert frontend.returncode == 0, frontend.log


@pytest.mark.parametrize("source", ["flag", "file"])
def test_an_upstream_key_with_credentials_in_a_worker_url_is_a_start_up_error(
    source: str, tmp_path: Path
) -> None:
    """Both would be the request's Authorization header, so every request to that worker would
    fail: ``serve`` says so at once, naming the worker redacted, and exits non-zero."""
    worker = f"http://operator:{URL_SECRET}@127.0.0.1:9"
    env = {**environ_without_dyn(), "DYN_UPSTREAM_API_KEY": WORKER_KEY}
    if source == "flag":
        args = ["--upstream", worker]
    else:
        path = tmp_path / "workers.yaml"
        path.write_text(f"{MODEL}: [{worker}]\n")
        args = ["--upstream-file", str(path)]
    with ServerProcess(["serve", "--http-port", "0", *args], env=env) as proc:
        proc.proc.wait(timeout=60)
    log = proc.log  # complete once the process is stopped
    assert proc.returncode == 2, log
    assert "dynamo-llm serve: error: worker http://***@127.0.0.1:9 has credentials" in log
    assert "--upstream-api-key" in log
    assert "serving" not in log
    for secret in (URL_SECRET, WORKER_KEY):
        assert secret not in log
