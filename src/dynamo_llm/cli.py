"""Command line: ``dynamo-llm serve`` (also ``python -m dynamo_llm serve``).

Every flag can also be set through its ``DYN_*`` environment variable; a flag wins over the
variable. Flags are named as in Dynamo's frontend so runbooks carry over.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence

from . import __version__
from .config import Config
from .engines.echo import EchoEngine
from .http.app import ServedModel, create_app
from .http.server import INTERFACES, HttpServer
from .metrics import Metrics
from .runtime.clock import SystemClock

log = logging.getLogger("dynamo_llm")

ENGINES = ("echo",)


def _env_help(text: str, var: str, default: object) -> str:
    shown = "off" if default is None else default
    return f"{text} [env {var}; default {shown}]"


def build_parser(defaults: Config) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynamo-llm",
        description="An OpenAI-compatible LLM serving frontend that gets the request lifecycle "
        "right: a client hang-up reaches the engine at once, nothing leaks, every request is "
        "counted once.",
    )
    parser.add_argument("--version", action="version", version=f"dynamo-llm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the frontend with an in-process engine",
        description="Run the OpenAI-compatible frontend (/v1/chat/completions, /v1/completions, "
        "/v1/models, /health, /live, /metrics) in front of an in-process engine.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = defaults
    serve.add_argument(
        "--http-host",
        default=d.http_host,
        help=_env_help(
            "address to listen on (0.0.0.0 for every interface)", "DYN_HTTP_HOST", d.http_host
        ),
    )
    serve.add_argument(
        "--http-port",
        type=int,
        default=d.http_port,
        help=_env_help("port to listen on (0 picks a free one)", "DYN_HTTP_PORT", d.http_port),
    )
    serve.add_argument(
        "--http-interface",
        choices=INTERFACES,
        default=d.http_interface,
        help=_env_help(
            "server interface: rsgi (granian, fastest) or asgi (uvicorn)",
            "DYN_HTTP_INTERFACE",
            d.http_interface,
        ),
    )
    serve.add_argument(
        "--engine",
        choices=ENGINES,
        default=d.engine,
        help=_env_help("in-process engine: echo streams the prompt back", "DYN_ENGINE", d.engine),
    )
    serve.add_argument(
        "--model-name",
        default=d.model_name,
        help=_env_help("name the model is served under", "DYN_MODEL_NAME", "the engine's name"),
    )
    serve.add_argument(
        "--context-length",
        type=int,
        default=d.context_length,
        help=_env_help(
            "the model's context window in tokens; longer prompts get 400 context_length_exceeded",
            "DYN_CONTEXT_LENGTH",
            d.context_length,
        ),
    )
    serve.add_argument(
        "--token-echo-delay-ms",
        type=float,
        default=d.token_echo_delay_ms,
        help=_env_help(
            "echo engine: delay before each token", "DYN_TOKEN_ECHO_DELAY_MS", d.token_echo_delay_ms
        ),
    )
    serve.add_argument(
        "--backend-stream-timeout-secs",
        type=int,
        default=d.backend_stream_timeout_secs,
        help=_env_help(
            "end a request whose engine sends nothing for this long (the HTTP layer waits twice "
            "this; 0 disables)",
            "DYN_HTTP_BACKEND_STREAM_TIMEOUT_SECS",
            d.backend_stream_timeout_secs,
        ),
    )
    serve.add_argument(
        "--first-token-timeout-secs",
        type=int,
        default=d.first_token_timeout_secs,
        help=_env_help(
            "end a request with no first token within this long (504 before any byte was sent)",
            "DYN_HTTP_FIRST_TOKEN_TIMEOUT_SECS",
            d.first_token_timeout_secs,
        ),
    )
    serve.add_argument(
        "--request-timeout-secs",
        type=int,
        default=d.request_timeout_secs,
        help=_env_help(
            "end any request running longer than this",
            "DYN_HTTP_REQUEST_TIMEOUT_SECS",
            d.request_timeout_secs,
        ),
    )
    serve.add_argument(
        "--body-limit-mb",
        type=int,
        default=d.body_limit_mb,
        help=_env_help(
            "largest request body accepted (413 above)", "DYN_HTTP_BODY_LIMIT_MB", d.body_limit_mb
        ),
    )
    serve.add_argument(
        "--graceful-shutdown-timeout-secs",
        type=float,
        default=d.graceful_shutdown_timeout_secs,
        help=_env_help(
            "on SIGTERM/SIGINT, how long requests in flight may finish before they are stopped",
            "DYN_HTTP_GRACEFUL_SHUTDOWN_TIMEOUT_SECS",
            d.graceful_shutdown_timeout_secs,
        ),
    )
    serve.add_argument(
        "--metrics-prefix",
        default=d.metrics_prefix,
        help=_env_help("prefix of every metric name", "DYN_METRICS_PREFIX", "dynamo_frontend"),
    )
    serve.add_argument(
        "--log-level",
        default=d.log_level,
        choices=("debug", "info", "warning", "error"),
        help=_env_help("log level", "DYN_LOG", d.log_level),
    )
    return parser


def config_from_args(args: argparse.Namespace, base: Config) -> Config:
    return base.replace(
        http_host=args.http_host,
        http_port=args.http_port,
        http_interface=args.http_interface,
        engine=args.engine,
        model_name=args.model_name,
        context_length=args.context_length,
        token_echo_delay_ms=args.token_echo_delay_ms,
        backend_stream_timeout_secs=args.backend_stream_timeout_secs or None,
        first_token_timeout_secs=args.first_token_timeout_secs or None,
        request_timeout_secs=args.request_timeout_secs or None,
        body_limit_mb=args.body_limit_mb,
        graceful_shutdown_timeout_secs=args.graceful_shutdown_timeout_secs,
        metrics_prefix=args.metrics_prefix,
        log_level=args.log_level,
    )


def build_models(config: Config, clock: SystemClock) -> list[ServedModel]:
    engine = EchoEngine(
        clock, delay_ms=config.token_echo_delay_ms, context_length=config.context_length
    )
    return [
        ServedModel(
            config.model_name or config.engine, engine, context_length=config.context_length
        )
    ]


async def run_serve(config: Config) -> None:
    clock = SystemClock()
    app = create_app(
        config, build_models(config, clock), Metrics(prefix=config.metrics_prefix), clock
    )
    server = HttpServer(app, config.http_host, config.http_port, interface=config.http_interface)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    models = ", ".join(app.models)
    log.info("dynamo-llm %s serving %s on %s", __version__, models, server.base_url)
    try:
        await stop.wait()
        log.info("shutdown requested")
        await app.shutdown()
    finally:
        await server.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    base = Config.from_env(env)
    args = build_parser(base).parse_args(argv)
    config = config_from_args(args, base)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "serve":
        asyncio.run(run_serve(config))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
