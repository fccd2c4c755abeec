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


def _int(environ: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw.strip())
    except ValueError:
        log.warning("ignoring %s=%r: not an integer", name, raw)
        return default


def _float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw.strip())
    except ValueError:
        log.warning("ignoring %s=%r: not a number", name, raw)
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
    engine: str = "echo"
    token_echo_delay_ms: float = 10.0
    context_length: int | None = None
    backend_stream_timeout_secs: int | None = None
    first_token_timeout_secs: int | None = None
    request_timeout_secs: int | None = None
    body_limit_mb: int = 45
    graceful_shutdown_timeout_secs: float = 5.0
    metrics_prefix: str | None = None
    log_level: str = "info"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Config:
        defaults = cls()
        return cls(
            http_host=environ.get("DYN_HTTP_HOST") or defaults.http_host,
            http_port=_int(environ, "DYN_HTTP_PORT", defaults.http_port) or defaults.http_port,
            http_interface=environ.get("DYN_HTTP_INTERFACE") or defaults.http_interface,
            model_name=environ.get("DYN_MODEL_NAME") or None,
            engine=environ.get("DYN_ENGINE") or defaults.engine,
            token_echo_delay_ms=_float(
                environ, "DYN_TOKEN_ECHO_DELAY_MS", defaults.token_echo_delay_ms
            ),
            context_length=_int(environ, "DYN_CONTEXT_LENGTH", None),
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
