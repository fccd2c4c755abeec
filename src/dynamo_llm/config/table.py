"""The options table: :class:`Config`, one field per option.

Each field is declared with :func:`~dynamo_llm.config.options.option`, which makes it a row:
type and default, flag, variable, kind, commands, ``--help`` group and text. Adding an option
is adding a field here; :meth:`Config.from_env`, the ``serve`` and ``worker`` parsers and their
``--help`` are generated from the rows (:mod:`dynamo_llm.config.arguments`). Rows are listed in
``--help`` order, grouped. Variable and flag names are Dynamo's, so runbooks carry over.

This module is over the house's ~400 lines on purpose: it is a table, ten lines a row, and
splitting it by group would scatter the one place a newcomer looks for an option.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass

from .options import (
    ALL,
    BOOL,
    CHOICE,
    FLOAT,
    INT,
    LIST,
    PROCESSES,
    REGISTER,
    SERVE,
    TEXT,
    Group,
    Option,
    at_least_zero,
    lowercase,
    option,
    positive_or_default,
    positive_or_off,
    read_environment,
    rows_of,
    zero_is_default,
    zero_is_off,
)


def lowercase_or_none(value: str | None, _default: object) -> str | None:
    return value.strip().lower() or None if value is not None else None


def default_if_empty(value: tuple[str, ...], default: tuple[str, ...]) -> tuple[str, ...]:
    return value or default


ENGINE = Group("engine")
MOCKER = Group(
    "mocker engine (--engine mocker)",
    "Dynamo's mocker flags. Each scheduler pass takes the modelled prefill + decode time, "
    "divided by the speedup ratios.",
)
ECHO = Group("echo engine (--engine echo)")
HTTP = Group("HTTP server")
TIMEOUTS = Group("timeouts (0 disables)")
OPS = Group("metrics and logging")
ROUTER = Group(
    "remote workers (router)",
    "With --upstream or --upstream-file the frontend routes every request to an "
    "OpenAI-compatible worker (dynamo-llm worker, vLLM, SGLang, llama.cpp, TGI, Ollama) "
    "instead of running an in-process engine.",
)

DISCOVERY = Group(
    "discovery and fleet health (etcd)",
    "With --discovery-backend etcd, workers register under a lease in etcd (worker, register) "
    "and frontends list and watch them (serve). The frontend also probes its idle workers and "
    "reads each worker's /metrics for the load every frontend sees alike.",
)

LOG_LEVELS = ("debug", "info", "warning", "error")
DISCOVERY_BACKENDS = ("static", "file", "etcd")


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the frontend and the worker are configured with; each field is an option."""

    # ---- engine -------------------------------------------------------------------------------
    engine: str = option(
        "mocker",
        "--engine",
        "DYN_ENGINE",
        CHOICE,
        "in-process engine: mocker simulates a vLLM-like engine (batching, KV cache, prefix "
        "caching, preemption) in scaled real time; echo streams the prompt back",
        group=ENGINE,
    )
    model_name: str | None = option(
        None,
        "--model-name",
        "DYN_MODEL_NAME",
        TEXT,
        "name the model is served under (register: the name the engine is registered under, "
        "instead of the names its /v1/models lists)",
        group=ENGINE,
        commands=ALL,
        unset="the engine's name",
    )
    context_length: int | None = option(
        None,
        "--context-length",
        "DYN_CONTEXT_LENGTH",
        INT,
        "the model's context window in tokens (prompt + completion); longer requests get "
        "400 context_length_exceeded (serve with workers: checked before dispatch for a model "
        "with a --tokenizer folder)",
        group=ENGINE,
        unset="mocker 8192 capped by its KV cache, echo unlimited",
    )
    # ---- the mocker (``DYN_MOCKER_*``); defaults are Dynamo's mocker's (SPEC §10) --------------
    mocker_num_gpu_blocks: int = option(
        16384,
        "--num-gpu-blocks-override",
        "DYN_MOCKER_NUM_GPU_BLOCKS",
        INT,
        "KV cache size in blocks",
        group=MOCKER,
        metavar="N",
    )
    mocker_block_size: int = option(
        64,
        "--block-size",
        "DYN_MOCKER_BLOCK_SIZE",
        INT,
        "tokens per KV block",
        group=MOCKER,
        metavar="TOKENS",
    )
    mocker_max_num_seqs: int = option(
        256,
        "--max-num-seqs",
        "DYN_MOCKER_MAX_NUM_SEQS",
        INT,
        "most requests in the running batch",
        group=MOCKER,
        metavar="N",
    )
    mocker_max_num_batched_tokens: int = option(
        8192,
        "--max-num-batched-tokens",
        "DYN_MOCKER_MAX_NUM_BATCHED_TOKENS",
        INT,
        "most tokens computed in one pass (a decode counts 1, a prefill chunk its length)",
        group=MOCKER,
        metavar="N",
    )
    mocker_enable_prefix_caching: bool = option(
        True,
        "--enable-prefix-caching",
        "DYN_MOCKER_ENABLE_PREFIX_CACHING",
        BOOL,
        "reuse KV blocks of a shared prompt prefix (--no-enable-prefix-caching turns it off)",
        group=MOCKER,
    )
    mocker_speedup_ratio: float = option(
        1.0,
        "--speedup-ratio",
        "DYN_MOCKER_SPEEDUP_RATIO",
        FLOAT,
        "run the simulation X times faster than the modelled GPU",
        group=MOCKER,
        metavar="X",
    )
    mocker_decode_speedup_ratio: float = option(
        1.0,
        "--decode-speedup-ratio",
        "DYN_MOCKER_DECODE_SPEEDUP_RATIO",
        FLOAT,
        "additionally speed up the decode part of each pass X times",
        group=MOCKER,
        metavar="X",
    )
    tokenizers: tuple[str, ...] = option(
        (),
        "--tokenizer",
        "DYN_TOKENIZER",
        LIST,
        "the model's tokenizer: a Hugging Face model folder (tokenizer.json with "
        "tokenizer_config.json and/or chat_template.jinja) or a bare tokenizer.json. The mocker "
        "tokenizes with it (without one, a deterministic word tokenizer); a routed frontend "
        "applies the folder's chat template and tokenizer as vLLM does, for precise kv "
        "routing, the --context-length check and input_sequence_tokens; MODEL=PATH for one "
        "model of several (repeatable), a bare PATH for every model without its own",
        group=MOCKER,
        metavar="[MODEL=]PATH",
    )
    mocker_seed: int = option(
        0,
        "--seed",
        "DYN_MOCKER_SEED",
        INT,
        "seed of the deterministic next-token function (a request's own seed wins)",
        group=MOCKER,
    )
    kv_events_port: int | None = option(
        None,
        "--kv-events-port",
        "DYN_KV_EVENTS_PORT",
        INT,
        "publish the mocker's KV cache events (vLLM's ZMQ format) on this port; 0 lets the "
        "OS choose; the endpoint goes into the worker's etcd record",
        group=MOCKER,
        commands=("worker",),
        metavar="PORT",
    )
    kv_events_replay_port: int | None = option(
        None,
        "--kv-events-replay-port",
        "DYN_KV_EVENTS_REPLAY_PORT",
        INT,
        "the ROUTER port that replays missed KV event batches",
        group=MOCKER,
        commands=("worker",),
        metavar="PORT",
        unset="--kv-events-port + 1 (OS-chosen when that is 0)",
    )
    # ---- the echo engine ----------------------------------------------------------------------
    token_echo_delay_ms: float = option(
        10.0,
        "--token-echo-delay-ms",
        "DYN_TOKEN_ECHO_DELAY_MS",
        FLOAT,
        "delay before each token",
        group=ECHO,
    )
    # ---- the HTTP server ----------------------------------------------------------------------
    http_host: str = option(
        "127.0.0.1",
        "--http-host",
        "DYN_HTTP_HOST",
        TEXT,
        "address to listen on (0.0.0.0 for every interface)",
        group=HTTP,
    )
    http_port: int = option(
        8000,
        "--http-port",
        "DYN_HTTP_PORT",
        INT,
        "port to listen on (0 picks a free one; the readiness line on stderr names it)",
        group=HTTP,
    )
    http_interface: str = option(
        "rsgi",
        "--http-interface",
        "DYN_HTTP_INTERFACE",
        CHOICE,
        "server interface: rsgi (granian, fastest) or asgi (uvicorn)",
        group=HTTP,
    )
    event_loop: str = option(
        "uvloop",
        "--event-loop",
        "DYN_EVENT_LOOP",
        CHOICE,
        "the process's event loop: uvloop (in C, fastest) or asyncio (Python's own, for debugging)",
        group=HTTP,
        choices=("uvloop", "asyncio"),
    )
    num_workers: int = option(
        1,
        "--num-workers",
        "DYN_HTTP_NUM_WORKERS",
        PROCESSES,
        "frontend processes serving the one listening socket (auto: one per core); each routes "
        "with its own counts, /metrics adds them all up, one that dies is restarted",
        group=HTTP,
        commands=SERVE,
        metavar="N|auto",
    )
    api_keys: tuple[str, ...] = option(
        (),
        "--api-key",
        "DYN_API_KEY",
        LIST,
        "require an API key on every /v1/ route, as Authorization: Bearer KEY or x-api-key: KEY "
        "(401 otherwise); repeat the flag or separate keys with commas for several, and any "
        "key of --api-key-file is accepted too; prefer the variable (a flag shows in ps)",
        group=HTTP,
        metavar="KEY",
        unset="none: no authentication",
        secret=True,
    )
    api_key_file: str | None = option(
        None,
        "--api-key-file",
        "DYN_API_KEY_FILE",
        TEXT,
        "require an API key as --api-key does, accepting any key in this file: one a line, "
        "blank lines and lines starting with # ignored; a change is seen within a second (a "
        "new key on its first use) without a restart; a version that cannot be read or holds "
        "no key is logged and ignored, the last good keys kept; at start-up the file must "
        "hold a key",
        group=HTTP,
        metavar="PATH",
        unset="none",
    )
    protect_metrics: bool = option(
        False,
        "--protect-metrics",
        "DYN_PROTECT_METRICS",
        BOOL,
        "with API keys, /metrics needs a key too (/health and /live stay open for probes)",
        group=HTTP,
    )
    http2: bool = option(
        False,
        "--http2",
        "DYN_HTTP2",
        BOOL,
        "also speak HTTP/2 cleartext (h2c, prior knowledge or upgrade) under --http-interface "
        "rsgi; off by default: one HTTP/2 connection can hold many streams at once, so only turn "
        "it on behind a proxy that needs it",
        group=HTTP,
    )
    body_limit_mb: int = option(
        4,
        "--body-limit-mb",
        "DYN_HTTP_BODY_LIMIT_MB",
        INT,
        "largest request body accepted (413 above); 0 is the default. A body is decoded on the "
        "event loop, about 2-3 ms per MB during which every other stream of the process waits: "
        "4 MB holds a 256k-token context four times over; raise it for inline base64 images "
        "(Dynamo's default is 45)",
        group=HTTP,
        normalize=zero_is_default,
    )
    graceful_shutdown_timeout_secs: float = option(
        5.0,
        "--graceful-shutdown-timeout-secs",
        "DYN_HTTP_GRACEFUL_SHUTDOWN_TIMEOUT_SECS",
        FLOAT,
        "on SIGTERM/SIGINT, how long requests in flight may finish before they are stopped",
        group=HTTP,
    )
    http_read_timeout_secs: float = option(
        30.0,
        "--http-read-timeout-secs",
        "DYN_HTTP_READ_TIMEOUT_SECS",
        FLOAT,
        "a client must send a request's headers within this long, and then its body within "
        "this long again, or its connection is closed (slow clients cannot hold connections); "
        "0 is the default",
        group=HTTP,
        normalize=positive_or_default,
    )
    # ---- timeouts: unset, unparsable or 0 is off ----------------------------------------------
    backend_stream_timeout_secs: int | None = option(
        None,
        "--backend-stream-timeout-secs",
        "DYN_HTTP_BACKEND_STREAM_TIMEOUT_SECS",
        INT,
        "end a request whose engine sends nothing for this long between items, and before the "
        "first one unless --first-token-timeout-secs is set (the HTTP layer waits twice this)",
        group=TIMEOUTS,
        normalize=positive_or_off,
    )
    first_token_timeout_secs: int | None = option(
        None,
        "--first-token-timeout-secs",
        "DYN_HTTP_FIRST_TOKEN_TIMEOUT_SECS",
        INT,
        "end a request with no first token within this long of its dispatch or of a migration "
        "(504 before any byte was sent); --backend-stream-timeout-secs waits until that token",
        group=TIMEOUTS,
        normalize=positive_or_off,
    )
    request_timeout_secs: int | None = option(
        None,
        "--request-timeout-secs",
        "DYN_HTTP_REQUEST_TIMEOUT_SECS",
        INT,
        "end any request running longer than this",
        group=TIMEOUTS,
        normalize=positive_or_off,
    )
    slow_client_timeout_secs: int | None = option(
        30,
        "--slow-client-timeout-secs",
        "DYN_HTTP_SLOW_CLIENT_TIMEOUT_SECS",
        INT,
        "stop a stream whose client has read nothing for this long while its buffer is full "
        "(counted as slow_client); until then the engine is not pulled for it",
        group=TIMEOUTS,
        normalize=positive_or_off,
    )
    # ---- metrics and logging ------------------------------------------------------------------
    metrics_prefix: str | None = option(
        None,
        "--metrics-prefix",
        "DYN_METRICS_PREFIX",
        TEXT,
        "prefix of the frontend's metric names (the mocker's are always dynamo_mocker_*)",
        group=OPS,
        unset="dynamo_frontend",
    )
    log_level: str = option(
        "info",
        "--log-level",
        "DYN_LOG",
        CHOICE,
        "log level",
        group=OPS,
        commands=ALL,
        choices=LOG_LEVELS,
        normalize=lowercase,
    )
    # ---- remote workers and the router (SPEC §8), serve only: with any upstream, the frontend
    # routes to the workers instead of running an in-process engine ---------------------------
    upstreams: tuple[str, ...] = option(
        (),
        "--upstream",
        "DYN_UPSTREAMS",
        LIST,
        "a worker's base URL (repeatable); its models are read from its /v1/models (register: "
        "the engine to register)",
        group=ROUTER,
        commands=("serve", "register"),
        metavar="URL",
        unset="none",
    )
    upstream_api_key: str | None = option(
        None,
        "--upstream-api-key",
        "DYN_UPSTREAM_API_KEY",
        TEXT,
        "sent to every worker as Authorization: Bearer KEY (a vLLM or SGLang started with "
        "--api-key, a dynamo-llm worker with --api-key), except to one given its own api_key in "
        "--upstream-file; prefer the variable; not together with "
        "credentials in a worker URL (http://user:pass@host, sent as basic auth): refused at "
        "start-up",
        group=ROUTER,
        commands=("serve", "register"),
        metavar="KEY",
        unset="none",
        secret=True,
    )
    upstream_file: str | None = option(
        None,
        "--upstream-file",
        "DYN_UPSTREAM_FILE",
        TEXT,
        "YAML or JSON mapping each model to a list of workers, each a URL or {url: URL, "
        "api_key: KEY} (its own key, sent instead of --upstream-api-key, never shown); "
        "reloaded when it changes",
        group=ROUTER,
        commands=SERVE,
        metavar="PATH",
        unset="none",
    )
    router_mode: str = option(
        "round-robin",
        "--router-mode",
        "DYN_ROUTER_MODE",
        CHOICE,
        "how a worker is chosen: round-robin, random, power-of-two (two random, fewer in "
        "flight wins), least-loaded, kv (prefix-aware), direct (X-Worker-Instance-Id header)",
        group=ROUTER,
        commands=SERVE,
    )
    max_inflight_per_worker: int | None = option(
        None,
        "--max-inflight-per-worker",
        "DYN_MAX_INFLIGHT_PER_WORKER",
        INT,
        "a worker with N requests in flight is busy; when all are, 503 all_workers_busy "
        "(0 is no limit)",
        group=ROUTER,
        commands=SERVE,
        metavar="N",
        normalize=zero_is_off,
        unset="no limit",
    )
    router_kv_overlap_score_weight: float = option(
        1.0,
        "--router-kv-overlap-score-weight",
        "DYN_ROUTER_KV_OVERLAP_SCORE_WEIGHT",
        FLOAT,
        "kv mode: weight of the blocks a worker would have to prefill against its load",
        group=ROUTER,
        commands=SERVE,
        metavar="W",
    )
    router_temperature: float = option(
        0.0,
        "--router-temperature",
        "DYN_ROUTER_TEMPERATURE",
        FLOAT,
        "kv mode: 0 always takes the best score; higher samples among good workers",
        group=ROUTER,
        commands=SERVE,
        metavar="T",
    )
    worker_connect_timeout_secs: float = option(
        5.0,
        "--worker-connect-timeout-secs",
        "DYN_WORKER_CONNECT_TIMEOUT_SECS",
        FLOAT,
        "connecting to a worker taking longer marks it down",
        group=ROUTER,
        commands=SERVE,
        metavar="S",
    )
    # 0 by default: --max-inflight-per-worker is the load limit (it sheds with a 503); this one
    # only caps what the frontend holds open (file descriptors, a worker's connection limit).
    worker_max_connections: int = option(
        0,
        "--worker-max-connections",
        "DYN_WORKER_MAX_CONNECTIONS",
        INT,
        "at most N connections to the workers open at once, all workers together (each request "
        "in flight holds one; an idle one to another worker is closed to make room); a request "
        "past it waits for a free one, and if its first-token or stream timeout runs out while "
        "it waits it gets 503 worker_connections_busy, held against no worker. 0 is no bound: "
        "the load limit is --max-inflight-per-worker",
        group=ROUTER,
        commands=SERVE,
        metavar="N",
        normalize=at_least_zero,
    )
    worker_probe_timeout_secs: float = option(
        5.0,
        "--worker-probe-timeout-secs",
        "DYN_WORKER_PROBE_TIMEOUT_SECS",
        FLOAT,
        "a quarantined worker comes back only after a 1-token completion (or, where the engine "
        "offers none, /health or /v1/models) answers within this long",
        group=ROUTER,
        commands=("serve", "register"),
        metavar="S",
        normalize=zero_is_default,
    )
    # Migration (SPEC §9): how many times a request may move to another worker; 0 is off.
    migration_limit: int = option(
        0,
        "--migration-limit",
        "DYN_MIGRATION_LIMIT",
        INT,
        "a request whose worker fails (unreachable, dropped, shutting down, silent past a "
        "timeout) moves to another worker at most N times, continuing where it stopped; 0 "
        "turns migration off",
        group=ROUTER,
        commands=SERVE,
        metavar="N",
        normalize=at_least_zero,
    )

    # ---- discovery (etcd), idle probes and engine-reported load: issue 12 ---------------------
    discovery_backend: str | None = option(
        None,
        "--discovery-backend",
        "DYN_DISCOVERY_BACKEND",
        CHOICE,
        "where workers are found: static (--upstream), file (--upstream-file) or etcd (workers "
        "register under a lease; worker and register hold one)",
        group=DISCOVERY,
        commands=ALL,
        choices=DISCOVERY_BACKENDS,
        normalize=lowercase_or_none,
        unset="static with --upstream, file with --upstream-file, else the in-process engine",
    )
    etcd_endpoints: tuple[str, ...] = option(
        ("http://127.0.0.1:2379",),
        "--etcd-endpoints",
        "ETCD_ENDPOINTS",
        LIST,
        "etcd client URLs (comma-separated or repeated; the first that answers is used)",
        group=DISCOVERY,
        commands=ALL,
        metavar="URL",
        normalize=default_if_empty,
    )
    namespace: str = option(
        "dynamo",
        "--namespace",
        "DYN_NAMESPACE",
        TEXT,
        "the etcd namespace workers register in and frontends watch",
        group=DISCOVERY,
        commands=ALL,
    )
    discovery_lease_ttl_secs: int = option(
        10,
        "--discovery-lease-ttl-secs",
        "DYN_DISCOVERY_LEASE_TTL_SECS",
        INT,
        "TTL of a worker's etcd lease, kept alive every third of it: a worker that dies "
        "leaves routing within this long",
        group=DISCOVERY,
        commands=("worker", "register"),
        metavar="S",
        normalize=zero_is_default,
    )
    advertise_url: str | None = option(
        None,
        "--advertise-url",
        "DYN_ADVERTISE_URL",
        TEXT,
        "the URL frontends reach this worker at, as registered in etcd",
        group=DISCOVERY,
        commands=("worker",),
        metavar="URL",
        unset="http://<--http-host>:<port> (the host name when listening on 0.0.0.0)",
    )
    register_probe_interval_secs: float = option(
        2.0,
        "--register-probe-interval-secs",
        "DYN_REGISTER_PROBE_INTERVAL_SECS",
        FLOAT,
        "register: how often the engine is probed (a 1-token completion); it is registered "
        "only while the probe passes",
        group=DISCOVERY,
        commands=REGISTER,
        metavar="S",
        normalize=zero_is_default,
    )
    worker_idle_probe_interval_secs: float | None = option(
        2.0,
        "--worker-idle-probe-interval-secs",
        "DYN_WORKER_IDLE_PROBE_INTERVAL_SECS",
        FLOAT,
        "serve: a worker with nothing in flight is checked this often (GET /v1/models), so a "
        "dead idle worker is quarantined before a request is sent to it (0 turns it off)",
        group=DISCOVERY,
        commands=SERVE,
        metavar="S",
        normalize=positive_or_off,
    )
    worker_metrics_interval_secs: float | None = option(
        1.0,
        "--worker-metrics-interval-secs",
        "DYN_WORKER_METRICS_INTERVAL_SECS",
        FLOAT,
        "serve: each worker's /metrics is read this often for its engine-reported queue and KV "
        "use (vLLM, SGLang, llama.cpp, dynamo_mocker_*), the load the router modes use (0 "
        "turns it off: local in-flight counts only)",
        group=DISCOVERY,
        commands=SERVE,
        metavar="S",
        normalize=positive_or_off,
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Config:
        """The configuration ``environ`` describes: each option's variable, else its default.

        ``environ`` is passed in (the entry point passes ``os.environ``); nothing here reads
        the process environment.
        """
        return cls(**read_environment(cls, environ))

    def replace(self, **changes: object) -> Config:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def routed(self) -> bool:
        """True when requests go to remote workers rather than an in-process engine."""
        return bool(self.upstreams or self.upstream_file or self.discovery_backend)

    @property
    def discovery(self) -> str | None:
        """The discovery backend in force: the one named, else implied by the upstream flags."""
        if self.discovery_backend is not None:
            return self.discovery_backend
        if self.upstreams:
            return "static"
        return "file" if self.upstream_file else None

    @property
    def tokenizer_paths(self) -> dict[str | None, str]:
        """``--tokenizer`` by model: ``MODEL=PATH`` under its model, a bare PATH under None.

        Raises ``ValueError`` for an empty model or path.
        """
        paths: dict[str | None, str] = {}
        for item in self.tokenizers:
            model, sep, path = item.partition("=")
            name: str | None = model.strip() if sep else None
            path = (path if sep else model).strip()
            if not path or name == "":
                raise ValueError(f"--tokenizer {item!r}: expected PATH or MODEL=PATH")
            paths[name] = path  # a later one wins: a flag over the variable
        return paths

    @property
    def mocker_tokenizer(self) -> str | None:
        """The mocker's ``tokenizer.json``: ``--tokenizer`` for its model (a folder's own
        ``tokenizer.json``), else None (the word tokenizer)."""
        paths = self.tokenizer_paths
        path = paths.get(self.model_name) if self.model_name is not None else None
        path = path or paths.get(None) or (next(iter(paths.values())) if paths else None)
        if path is not None and os.path.isdir(path):
            return os.path.join(path, "tokenizer.json")
        return path

    @property
    def has_api_keys(self) -> bool:
        """True when requests to the protected routes need an API key."""
        return bool(self.api_keys or self.api_key_file)

    @property
    def http_inactivity_secs(self) -> float | None:
        """The HTTP layer's safety net: twice the backend stream timeout."""
        t = self.backend_stream_timeout_secs
        return 2.0 * t if t else None

    @property
    def body_limit_bytes(self) -> int:
        return self.body_limit_mb * 1024 * 1024


OPTIONS: tuple[Option, ...] = rows_of(Config)
"""The options table, in ``--help`` order: one row per :class:`Config` field."""
