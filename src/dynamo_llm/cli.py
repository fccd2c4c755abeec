"""Command line: ``dynamo-llm serve`` and ``dynamo-llm worker`` (also ``python -m dynamo_llm``).

- ``serve`` runs the OpenAI-compatible frontend with an in-process engine: the mocker unless
  ``--engine`` (``DYN_ENGINE``) says otherwise, so the bare command answers like a deployment.
- ``worker`` serves one engine over the same OpenAI API, from the same app and server, so it can
  stand in for a vLLM server behind any router.

Both take the same flags, added by :func:`add_http_arguments` and :func:`add_engine_arguments`.
Every flag can also be set through its environment variable (named in ``--help``); a flag wins
over the variable. Flags are named as in Dynamo's frontend and mocker so runbooks carry over.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from . import __version__
from .config import Config
from .engines.factory import ENGINES
from .fleet import build_routed_app
from .http.server import INTERFACES
from .router.policies import RouterMode
from .runtime.clock import SystemClock
from .worker import build_app, serve_until_signalled

COMMANDS = ("serve", "worker")


def _env_help(text: str, var: str, default: object) -> str:
    shown = "off" if default is None else default
    return f"{text} [env {var}; default {shown}]"


def add_http_arguments(parser: argparse.ArgumentParser, d: Config) -> None:
    """The HTTP server, timeout, metrics and logging flags."""
    http = parser.add_argument_group("HTTP server")
    http.add_argument(
        "--http-host",
        default=d.http_host,
        help=_env_help(
            "address to listen on (0.0.0.0 for every interface)", "DYN_HTTP_HOST", d.http_host
        ),
    )
    http.add_argument(
        "--http-port",
        type=int,
        default=d.http_port,
        help=_env_help(
            "port to listen on (0 picks a free one; the readiness line on stderr names it)",
            "DYN_HTTP_PORT",
            d.http_port,
        ),
    )
    http.add_argument(
        "--http-interface",
        choices=INTERFACES,
        default=d.http_interface,
        help=_env_help(
            "server interface: rsgi (granian, fastest) or asgi (uvicorn)",
            "DYN_HTTP_INTERFACE",
            d.http_interface,
        ),
    )
    http.add_argument(
        "--body-limit-mb",
        type=int,
        default=d.body_limit_mb,
        help=_env_help(
            "largest request body accepted (413 above)", "DYN_HTTP_BODY_LIMIT_MB", d.body_limit_mb
        ),
    )
    http.add_argument(
        "--graceful-shutdown-timeout-secs",
        type=float,
        default=d.graceful_shutdown_timeout_secs,
        help=_env_help(
            "on SIGTERM/SIGINT, how long requests in flight may finish before they are stopped",
            "DYN_HTTP_GRACEFUL_SHUTDOWN_TIMEOUT_SECS",
            d.graceful_shutdown_timeout_secs,
        ),
    )
    timeouts = parser.add_argument_group("timeouts (0 disables)")
    timeouts.add_argument(
        "--backend-stream-timeout-secs",
        type=int,
        default=d.backend_stream_timeout_secs,
        help=_env_help(
            "end a request whose engine sends nothing for this long (the HTTP layer waits twice "
            "this)",
            "DYN_HTTP_BACKEND_STREAM_TIMEOUT_SECS",
            d.backend_stream_timeout_secs,
        ),
    )
    timeouts.add_argument(
        "--first-token-timeout-secs",
        type=int,
        default=d.first_token_timeout_secs,
        help=_env_help(
            "end a request with no first token within this long (504 before any byte was sent)",
            "DYN_HTTP_FIRST_TOKEN_TIMEOUT_SECS",
            d.first_token_timeout_secs,
        ),
    )
    timeouts.add_argument(
        "--request-timeout-secs",
        type=int,
        default=d.request_timeout_secs,
        help=_env_help(
            "end any request running longer than this",
            "DYN_HTTP_REQUEST_TIMEOUT_SECS",
            d.request_timeout_secs,
        ),
    )
    ops = parser.add_argument_group("metrics and logging")
    ops.add_argument(
        "--metrics-prefix",
        default=d.metrics_prefix,
        help=_env_help(
            "prefix of the frontend's metric names (the mocker's are always dynamo_mocker_*)",
            "DYN_METRICS_PREFIX",
            "dynamo_frontend",
        ),
    )
    ops.add_argument(
        "--log-level",
        default=d.log_level,
        choices=("debug", "info", "warning", "error"),
        help=_env_help("log level", "DYN_LOG", d.log_level),
    )


def add_engine_arguments(parser: argparse.ArgumentParser, d: Config) -> None:
    """The engine choice, the served model, and every engine's own flags."""
    engine = parser.add_argument_group("engine")
    engine.add_argument(
        "--engine",
        choices=ENGINES,
        default=d.engine,
        help=_env_help(
            "in-process engine: mocker simulates a vLLM-like engine (batching, KV cache, prefix "
            "caching, preemption) in scaled real time; echo streams the prompt back",
            "DYN_ENGINE",
            d.engine,
        ),
    )
    engine.add_argument(
        "--model-name",
        default=d.model_name,
        help=_env_help("name the model is served under", "DYN_MODEL_NAME", "the engine's name"),
    )
    engine.add_argument(
        "--context-length",
        type=int,
        default=d.context_length,
        help=_env_help(
            "the model's context window in tokens (prompt + completion); longer requests get "
            "400 context_length_exceeded",
            "DYN_CONTEXT_LENGTH",
            "mocker 8192 capped by its KV cache, echo unlimited"
            if d.context_length is None
            else d.context_length,
        ),
    )
    mocker = parser.add_argument_group(
        "mocker engine (--engine mocker)",
        "Dynamo's mocker flags. Each scheduler pass takes the modelled prefill + decode time, "
        "divided by the speedup ratios.",
    )
    mocker.add_argument(
        "--num-gpu-blocks-override",
        dest="num_gpu_blocks",
        metavar="N",
        type=int,
        default=d.mocker_num_gpu_blocks,
        help=_env_help(
            "KV cache size in blocks", "DYN_MOCKER_NUM_GPU_BLOCKS", d.mocker_num_gpu_blocks
        ),
    )
    mocker.add_argument(
        "--block-size",
        metavar="TOKENS",
        type=int,
        default=d.mocker_block_size,
        help=_env_help("tokens per KV block", "DYN_MOCKER_BLOCK_SIZE", d.mocker_block_size),
    )
    mocker.add_argument(
        "--max-num-seqs",
        metavar="N",
        type=int,
        default=d.mocker_max_num_seqs,
        help=_env_help(
            "most requests in the running batch", "DYN_MOCKER_MAX_NUM_SEQS", d.mocker_max_num_seqs
        ),
    )
    mocker.add_argument(
        "--max-num-batched-tokens",
        metavar="N",
        type=int,
        default=d.mocker_max_num_batched_tokens,
        help=_env_help(
            "most tokens computed in one pass (a decode counts 1, a prefill chunk its length)",
            "DYN_MOCKER_MAX_NUM_BATCHED_TOKENS",
            d.mocker_max_num_batched_tokens,
        ),
    )
    mocker.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=d.mocker_enable_prefix_caching,
        help=_env_help(
            "reuse KV blocks of a shared prompt prefix (--no-enable-prefix-caching turns it off)",
            "DYN_MOCKER_ENABLE_PREFIX_CACHING=1|0",
            "on" if d.mocker_enable_prefix_caching else "off",
        ),
    )
    mocker.add_argument(
        "--speedup-ratio",
        metavar="X",
        type=float,
        default=d.mocker_speedup_ratio,
        help=_env_help(
            "run the simulation X times faster than the modelled GPU",
            "DYN_MOCKER_SPEEDUP_RATIO",
            d.mocker_speedup_ratio,
        ),
    )
    mocker.add_argument(
        "--decode-speedup-ratio",
        metavar="X",
        type=float,
        default=d.mocker_decode_speedup_ratio,
        help=_env_help(
            "additionally speed up the decode part of each pass X times",
            "DYN_MOCKER_DECODE_SPEEDUP_RATIO",
            d.mocker_decode_speedup_ratio,
        ),
    )
    mocker.add_argument(
        "--tokenizer",
        metavar="PATH",
        default=d.mocker_tokenizer,
        help=_env_help(
            "a Hugging Face tokenizer.json to tokenize prompts and render output with (without "
            "one, a deterministic word tokenizer)",
            "DYN_MOCKER_TOKENIZER",
            d.mocker_tokenizer,
        ),
    )
    mocker.add_argument(
        "--seed",
        type=int,
        default=d.mocker_seed,
        help=_env_help(
            "seed of the deterministic next-token function (a request's own seed wins)",
            "DYN_MOCKER_SEED",
            d.mocker_seed,
        ),
    )
    echo = parser.add_argument_group("echo engine (--engine echo)")
    echo.add_argument(
        "--token-echo-delay-ms",
        type=float,
        default=d.token_echo_delay_ms,
        help=_env_help("delay before each token", "DYN_TOKEN_ECHO_DELAY_MS", d.token_echo_delay_ms),
    )


def build_parser(defaults: Config) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynamo-llm",
        description="An OpenAI-compatible LLM serving frontend that gets the request lifecycle "
        "right: a client hang-up reaches the engine at once, nothing leaks, every request is "
        "counted once.",
    )
    parser.add_argument("--version", action="version", version=f"dynamo-llm {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}"
    )
    serve = sub.add_parser(
        "serve",
        help="run the frontend: an in-process engine (the mocker by default) or remote workers",
        description="Run the OpenAI-compatible frontend (/v1/chat/completions, /v1/completions, "
        "/v1/models, /health, /live, /metrics) in front of an in-process engine: the simulated "
        "vLLM-like mocker unless --engine says otherwise. With --upstream or --upstream-file it "
        "routes every request to remote OpenAI-compatible workers instead.",
    )
    worker = sub.add_parser(
        "worker",
        help="serve one engine as a standalone OpenAI-compatible worker",
        description="Serve one engine (the mocker by default) over the OpenAI API (chat, "
        "completions, models, health, metrics, with vLLM's return_token_ids and token-id "
        "prompts), so it can stand in for a vLLM server behind any router. With the mocker, "
        "/metrics also carries its scheduler state (dynamo_mocker_*).",
    )
    for command in (serve, worker):
        add_engine_arguments(command, defaults)
        add_http_arguments(command, defaults)
    add_router_arguments(serve, defaults)
    return parser


def add_router_arguments(parser: argparse.ArgumentParser, d: Config) -> None:
    """Remote workers and how requests are routed to them (``serve`` only)."""
    group = parser.add_argument_group(
        "remote workers (router)",
        "With --upstream or --upstream-file the frontend routes every request to an "
        "OpenAI-compatible worker (dynamo-llm worker, vLLM, SGLang, llama.cpp, TGI, Ollama) "
        "instead of running an in-process engine.",
    )
    group.add_argument(
        "--upstream",
        metavar="URL",
        action="append",
        default=list(d.upstreams),
        help=_env_help(
            "a worker's base URL (repeatable); its models are read from its /v1/models",
            "DYN_UPSTREAMS=url1,url2",
            "none",
        ),
    )
    group.add_argument(
        "--upstream-file",
        metavar="PATH",
        default=d.upstream_file,
        help=_env_help(
            "YAML or JSON mapping each model to a list of worker URLs; reloaded when it changes",
            "DYN_UPSTREAM_FILE",
            d.upstream_file,
        ),
    )
    group.add_argument(
        "--router-mode",
        choices=[m.value for m in RouterMode],
        default=d.router_mode,
        help=_env_help(
            "how a worker is chosen: round-robin, random, power-of-two (two random, fewer in "
            "flight wins), least-loaded, kv (prefix-aware), direct (X-Worker-Instance-Id header)",
            "DYN_ROUTER_MODE",
            d.router_mode,
        ),
    )
    group.add_argument(
        "--max-inflight-per-worker",
        metavar="N",
        type=int,
        default=d.max_inflight_per_worker,
        help=_env_help(
            "a worker with N requests in flight is busy; when all are, 503 all_workers_busy",
            "DYN_MAX_INFLIGHT_PER_WORKER",
            "no limit",
        ),
    )
    group.add_argument(
        "--router-kv-overlap-score-weight",
        metavar="W",
        type=float,
        default=d.router_kv_overlap_score_weight,
        help=_env_help(
            "kv mode: weight of the blocks a worker would have to prefill against its load",
            "DYN_ROUTER_KV_OVERLAP_SCORE_WEIGHT",
            d.router_kv_overlap_score_weight,
        ),
    )
    group.add_argument(
        "--router-temperature",
        metavar="T",
        type=float,
        default=d.router_temperature,
        help=_env_help(
            "kv mode: 0 always takes the best score; higher samples among good workers",
            "DYN_ROUTER_TEMPERATURE",
            d.router_temperature,
        ),
    )
    group.add_argument(
        "--worker-connect-timeout-secs",
        metavar="S",
        type=float,
        default=d.worker_connect_timeout_secs,
        help=_env_help(
            "connecting to a worker taking longer marks it down",
            "DYN_WORKER_CONNECT_TIMEOUT_SECS",
            d.worker_connect_timeout_secs,
        ),
    )
    group.add_argument(
        "--migration-limit",
        metavar="N",
        type=int,
        default=d.migration_limit,
        help=_env_help(
            "a request whose worker fails (unreachable, dropped, shutting down) moves to another "
            "worker at most N times, continuing where it stopped; 0 turns migration off",
            "DYN_MIGRATION_LIMIT",
            d.migration_limit,
        ),
    )


def config_from_args(args: argparse.Namespace, base: Config) -> Config:
    return base.replace(
        http_host=args.http_host,
        http_port=args.http_port,
        http_interface=args.http_interface,
        engine=args.engine,
        model_name=args.model_name,
        context_length=args.context_length,
        token_echo_delay_ms=args.token_echo_delay_ms,
        mocker_num_gpu_blocks=args.num_gpu_blocks,
        mocker_block_size=args.block_size,
        mocker_max_num_seqs=args.max_num_seqs,
        mocker_max_num_batched_tokens=args.max_num_batched_tokens,
        mocker_enable_prefix_caching=args.enable_prefix_caching,
        mocker_speedup_ratio=args.speedup_ratio,
        mocker_decode_speedup_ratio=args.decode_speedup_ratio,
        mocker_tokenizer=args.tokenizer,
        mocker_seed=args.seed,
        backend_stream_timeout_secs=args.backend_stream_timeout_secs or None,
        first_token_timeout_secs=args.first_token_timeout_secs or None,
        request_timeout_secs=args.request_timeout_secs or None,
        body_limit_mb=args.body_limit_mb,
        graceful_shutdown_timeout_secs=args.graceful_shutdown_timeout_secs,
        metrics_prefix=args.metrics_prefix,
        log_level=args.log_level,
        **_router_settings(args),
    )


def _router_settings(args: argparse.Namespace) -> dict[str, object]:
    if not hasattr(args, "router_mode"):  # the worker command does not route
        return {}
    return {
        "upstreams": tuple(args.upstream),
        "upstream_file": args.upstream_file,
        "router_mode": args.router_mode,
        "max_inflight_per_worker": args.max_inflight_per_worker or None,
        "router_kv_overlap_score_weight": args.router_kv_overlap_score_weight,
        "router_temperature": args.router_temperature,
        "worker_connect_timeout_secs": args.worker_connect_timeout_secs,
        "migration_limit": max(0, args.migration_limit),
    }


def parse_config(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[str, Config]:
    """The command and its configuration: the environment, then the flags over it."""
    base = Config.from_env(environ)
    args = build_parser(base).parse_args(argv)
    return args.command, config_from_args(args, base)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    command, config = parse_config(sys.argv[1:] if argv is None else argv, env)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if command == "serve" and config.routed:
            app = build_routed_app(config, SystemClock())
        else:
            app = build_app(config, SystemClock(), control_routes=command == "worker")
    except ValueError as exc:
        print(f"dynamo-llm {command}: error: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve_until_signalled(app, config, command))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
