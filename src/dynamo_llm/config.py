"""Configuration, read once from the environment (and the CLI) into a frozen dataclass.

No other module reads ``os.environ``: :meth:`Config.from_env` takes the environment as an
argument, the CLI layers its flags over it, and the result is injected where it is needed.
Variable names are Dynamo's, so runbooks carry over.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger("dynamo_llm.config")

TRUTHY = {"1", "true", "on", "yes"}
FALSY = {"0", "false", "off", "no"}


def _int(environ: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw.strip())
    except ValueError:
        log.warning("ignoring %s=%r: not an integer", name, raw)
        return default


def _int_or(environ: Mapping[str, str], name: str, default: int) -> int:
    value = _int(environ, name, default)
    return default if value is None else value


def _float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw.strip())
    except ValueError:
        log.warning("ignoring %s=%r: not a number", name, raw)
        return default


def _bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in TRUTHY:
        return True
    if value in FALSY:
        return False
    log.warning("ignoring %s=%r: not a boolean", name, raw)
    return default


def _timeout(environ: Mapping[str, str], name: str) -> int | None:
    """A seconds value where unset, unparsable or 0 disables the timeout."""
    value = _int(environ, name, None)
    return value if value is not None and value > 0 else None


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the frontend is configured with. Field docs are the ``--help`` texts."""

    http_host: str = "127.0.0.1"
    http_port: int = 8000
    http_interface: str = "rsgi"
    model_name: str | None = None
    engine: str = "mocker"
    token_echo_delay_ms: float = 10.0
    context_length: int | None = None
    # The mocker's knobs (``DYN_MOCKER_*``); defaults are Dynamo's mocker's (SPEC §10).
    mocker_num_gpu_blocks: int = 16384
    mocker_block_size: int = 64
    mocker_max_num_seqs: int = 256
    mocker_max_num_batched_tokens: int = 8192
    mocker_enable_prefix_caching: bool = True
    mocker_speedup_ratio: float = 1.0
    mocker_decode_speedup_ratio: float = 1.0
    mocker_tokenizer: str | None = None
    mocker_seed: int = 0
    backend_stream_timeout_secs: int | None = None
    first_token_timeout_secs: int | None = None
    request_timeout_secs: int | None = None
    body_limit_mb: int = 45
    graceful_shutdown_timeout_secs: float = 5.0
    metrics_prefix: str | None = None
    log_level: str = "info"
    # Remote workers and the router (SPEC §8). With any upstream, the frontend routes to the
    # workers instead of running an in-process engine.
    upstreams: tuple[str, ...] = ()
    upstream_file: str | None = None
    router_mode: str = "round-robin"
    max_inflight_per_worker: int | None = None
    router_kv_overlap_score_weight: float = 1.0
    router_temperature: float = 0.0
    worker_connect_timeout_secs: float = 5.0
    # Migration (SPEC §9): how many times a request may move to another worker; 0 is off.
    migration_limit: int = 0

    @property
    def routed(self) -> bool:
        """True when requests go to remote workers rather than an in-process engine."""
        return bool(self.upstreams or self.upstream_file)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Config:
        defaults = cls()
        return cls(
            http_host=environ.get("DYN_HTTP_HOST") or defaults.http_host,
            http_port=_int_or(environ, "DYN_HTTP_PORT", defaults.http_port),
            http_interface=environ.get("DYN_HTTP_INTERFACE") or defaults.http_interface,
            model_name=environ.get("DYN_MODEL_NAME") or None,
            engine=environ.get("DYN_ENGINE") or defaults.engine,
            token_echo_delay_ms=_float(
                environ, "DYN_TOKEN_ECHO_DELAY_MS", defaults.token_echo_delay_ms
            ),
            context_length=_int(environ, "DYN_CONTEXT_LENGTH", None),
            mocker_num_gpu_blocks=_int_or(
                environ, "DYN_MOCKER_NUM_GPU_BLOCKS", defaults.mocker_num_gpu_blocks
            ),
            mocker_block_size=_int_or(environ, "DYN_MOCKER_BLOCK_SIZE", defaults.mocker_block_size),
            mocker_max_num_seqs=_int_or(
                environ, "DYN_MOCKER_MAX_NUM_SEQS", defaults.mocker_max_num_seqs
            ),
            mocker_max_num_batched_tokens=_int_or(
                environ, "DYN_MOCKER_MAX_NUM_BATCHED_TOKENS", defaults.mocker_max_num_batched_tokens
            ),
            mocker_enable_prefix_caching=_bool(
                environ, "DYN_MOCKER_ENABLE_PREFIX_CACHING", defaults.mocker_enable_prefix_caching
            ),
            mocker_speedup_ratio=_float(
                environ, "DYN_MOCKER_SPEEDUP_RATIO", defaults.mocker_speedup_ratio
            ),
            mocker_decode_speedup_ratio=_float(
                environ, "DYN_MOCKER_DECODE_SPEEDUP_RATIO", defaults.mocker_decode_speedup_ratio
            ),
            mocker_tokenizer=environ.get("DYN_MOCKER_TOKENIZER") or None,
            mocker_seed=_int_or(environ, "DYN_MOCKER_SEED", defaults.mocker_seed),
            backend_stream_timeout_secs=_timeout(environ, "DYN_HTTP_BACKEND_STREAM_TIMEOUT_SECS"),
            first_token_timeout_secs=_timeout(environ, "DYN_HTTP_FIRST_TOKEN_TIMEOUT_SECS"),
            request_timeout_secs=_timeout(environ, "DYN_HTTP_REQUEST_TIMEOUT_SECS"),
            body_limit_mb=_int(environ, "DYN_HTTP_BODY_LIMIT_MB", defaults.body_limit_mb)
            or defaults.body_limit_mb,
            graceful_shutdown_timeout_secs=_float(
                environ,
                "DYN_HTTP_GRACEFUL_SHUTDOWN_TIMEOUT_SECS",
                defaults.graceful_shutdown_timeout_secs,
            ),
            metrics_prefix=environ.get("DYN_METRICS_PREFIX") or None,
            log_level=(environ.get("DYN_LOG") or defaults.log_level).lower(),
            upstreams=tuple(
                u.strip() for u in (environ.get("DYN_UPSTREAMS") or "").split(",") if u.strip()
            ),
            upstream_file=environ.get("DYN_UPSTREAM_FILE") or None,
            router_mode=environ.get("DYN_ROUTER_MODE") or defaults.router_mode,
            max_inflight_per_worker=_int(environ, "DYN_MAX_INFLIGHT_PER_WORKER", None) or None,
            router_kv_overlap_score_weight=_float(
                environ,
                "DYN_ROUTER_KV_OVERLAP_SCORE_WEIGHT",
                defaults.router_kv_overlap_score_weight,
            ),
            router_temperature=_float(
                environ, "DYN_ROUTER_TEMPERATURE", defaults.router_temperature
            ),
            worker_connect_timeout_secs=_float(
                environ, "DYN_WORKER_CONNECT_TIMEOUT_SECS", defaults.worker_connect_timeout_secs
            ),
            migration_limit=max(
                0, _int_or(environ, "DYN_MIGRATION_LIMIT", defaults.migration_limit)
            ),
        )

    def replace(self, **changes: object) -> Config:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def http_inactivity_secs(self) -> float | None:
        """The HTTP layer's safety net: twice the backend stream timeout."""
        t = self.backend_stream_timeout_secs
        return 2.0 * t if t else None

    @property
    def body_limit_bytes(self) -> int:
        return self.body_limit_mb * 1024 * 1024
