"""A frontend started before its workers (issue 10, problem 8): it says what it waits for, its
``/health`` says ``loading`` until a worker answers, and then it serves. Real processes."""

import socket

import httpx

from dynamo_llm.testing.process import READY_LINE, ServerProcess
from tests.helpers import environ_without_dyn, wait_for

MODEL = "llama"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_a_frontend_started_before_its_worker_says_it_is_loading_then_serves() -> None:
    port = _free_port()
    upstream = f"http://127.0.0.1:{port}"
    args = ["serve", "--http-port", "0", "--upstream", upstream]
    with ServerProcess(args, env=environ_without_dyn()) as frontend:
        base = frontend.wait_ready(timeout=30)
        banner = next(m for m in map(READY_LINE.search, frontend.log.splitlines()) if m)
        assert banner["models"] == "no model yet"
        assert "engine router" in banner.string and "waiting for 1 worker(s)" in banner.string
        assert "waiting for 1 worker(s) to answer /v1/models" in frontend.log
        with httpx.Client(base_url=base, timeout=10) as c:
            health = c.get("/health")
            assert health.status_code == 503
            assert health.json()["status"] == "loading"
            assert health.json()["waiting_for"] == [upstream]
            assert c.get("/v1/models").json()["data"] == []

            worker_args = ["worker", "--engine", "mocker", "--speedup-ratio", "1000"]
            worker_args += ["--http-port", str(port), "--model-name", MODEL]
            with ServerProcess(worker_args, env=environ_without_dyn()) as worker:
                worker.wait_ready(timeout=30)
                # What an operator's readiness check does: /health until 200.
                wait_for(lambda: c.get("/health").status_code == 200, "/health 200")
                health = c.get("/health").json()
                assert health["status"] == "healthy"
                assert "waiting_for" not in health
                assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [MODEL]
                answer = c.post(
                    "/v1/chat/completions",
                    json={
                        "model": MODEL,
                        "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 3,
                    },
                )
                assert answer.status_code == 200, answer.text
        assert f"model {MODEL}: served by 1 worker(s)" in frontend.log
