"""Command line: ``dynamo-llm serve``, ``worker`` and ``register`` (also ``python -m dynamo_llm``).

- ``serve`` runs the OpenAI-compatible frontend with an in-process engine: the mocker unless
  ``--engine`` (``DYN_ENGINE``) says otherwise, so the bare command answers like a deployment.
  With ``--upstream`` or ``--upstream-file`` it routes to remote workers instead
  (:func:`~dynamo_llm.fleet.build_routed_app`).
- ``worker`` serves one engine over the same OpenAI API, from the same app and server
  (:func:`~dynamo_llm.worker.build_app`), so it can stand in for a vLLM server behind any router.
  With ``--discovery-backend etcd`` it registers itself in etcd once it serves, and withdraws
  before it drains on SIGTERM.
- ``register`` is a sidecar that registers a third-party engine in etcd while it passes the
  generation probe (:mod:`dynamo_llm.register`).

The flags are generated from the options table (:mod:`dynamo_llm.config`): both commands take
the engine, HTTP, timeout and logging flags, only ``serve`` the router's. Every flag can also be
set through its environment variable (named in ``--help``); a flag wins over the variable. This
module is the only reader of ``os.environ``. It wires the commands, sets up logging, and serves
the app until SIGTERM or SIGINT.

The listening socket is bound first, without ``SO_REUSEPORT``: a port in use is an error at
once (exit 1). ``serve --num-workers N`` hands it to :mod:`dynamo_llm.supervisor`, which forks N
processes that each serve it exactly as a single process does.

Startup prints one readiness line to stderr, whatever the log level, once connections are
accepted: ``dynamo-llm <command>: serving <models> on http://<host>:<port>`` (with N processes,
once all of them serve). With ``--http-port 0`` it is how a supervisor or a test learns the
port the OS chose.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import resource
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence

from . import __version__
from .config import Config, add_arguments, config_from_args
from .engines.factory import ENGINES
from .fleet import build_routed_app
from .http.app import App
from .http.server import INTERFACES, HttpServer, listen_socket
from .register import run_sidecar
from .router.policies import RouterMode
from .runtime import loop as event_loop
from .runtime.clock import SystemClock
from .supervisor import Supervisor
from .worker import advertised_url, build_app, build_registration

log = logging.getLogger("dynamo_llm")

COMMANDS = {
    "serve": (
        "run the frontend: an in-process engine (the mocker by default) or remote workers",
        "Run the OpenAI-compatible frontend (/v1/chat/completions, /v1/completions, "
        "/v1/models, /health, /live, /metrics) in front of an in-process engine: the simulated "
        "vLLM-like mocker unless --engine says otherwise. With --upstream or --upstream-file it "
        "routes every request to remote OpenAI-compatible workers instead.",
    ),
    "worker": (
        "serve one engine as a standalone OpenAI-compatible worker",
        "Serve one engine (the mocker by default) over the OpenAI API (chat, "
        "completions, models, health, metrics, with vLLM's return_token_ids and token-id "
        "prompts), so it can stand in for a vLLM server behind any router. With the mocker, "
        "/metrics also carries its scheduler state (dynamo_mocker_*). With "
        "--discovery-backend etcd it registers itself in etcd under a lease.",
    ),
    "register": (
        "register a third-party engine (vLLM, SGLang, llama.cpp) in etcd as a sidecar",
        "Register the OpenAI-compatible engine at --upstream in etcd (--discovery-backend etcd) "
        "under the model names its /v1/models lists (or --model-name), holding the lease only "
        "while the engine passes the generation probe (a 1-token completion) and withdrawing it "
        "when the engine stops answering. Serves no HTTP itself.",
    ),
}
"""Each command's one-line summary and its ``--help`` description."""

CHOICES: dict[str, Sequence[str]] = {
    "engine": ENGINES,
    "http_interface": INTERFACES,
    "router_mode": tuple(mode.value for mode in RouterMode),
}
"""The values of the choice options whose values the layers below own, by field."""

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_KILL_WAIT = 5.0
"""After the grace period, how long the requests still running get to end once stopped."""


def build_parser(defaults: Config) -> argparse.ArgumentParser:
    """The ``dynamo-llm`` parser; every flag defaults to its value in ``defaults``."""
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
    for command, (summary, description) in COMMANDS.items():
        add_arguments(
            sub.add_parser(command, help=summary, description=description),
            command,
            defaults,
            CHOICES,
        )
    return parser


def parse_config(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[str, Config]:
    """The command and its configuration: the environment, then the flags over it."""
    base = Config.from_env(environ)
    args = build_parser(base).parse_args(argv)
    return args.command, config_from_args(args, base, args.command)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    command, config = parse_config(sys.argv[1:] if argv is None else argv, env)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if command == "register":
        return event_loop.run(run_until_signalled(run_sidecar, config), config.event_loop)
    raise_open_file_limit()
    try:
        sock = listen_socket(config.http_host, config.http_port)
    except OSError as exc:
        print(f"dynamo-llm {command}: error: cannot listen: {exc.strerror}", file=sys.stderr)
        return 1
    with sock:
        if command == "serve" and config.num_workers > 1:
            supervisor = Supervisor(
                functools.partial(_serve, config, command),
                sock,
                config.num_workers,
                stop_within=config.graceful_shutdown_timeout_secs + _KILL_WAIT,
                announce=_print_ready,
            )
            return supervisor.run()
        return _serve(config, command, sock)


def _serve(
    config: Config,
    command: str,
    sock: socket.socket,
    metrics_directory: str | None = None,
    announce: Callable[[str], None] | None = None,
) -> int:
    routed = command == "serve" and config.routed
    try:
        if routed:
            app = build_routed_app(config, SystemClock())
        else:
            app = build_app(config, SystemClock(), control_routes=command == "worker")
    except ValueError as exc:
        print(f"dynamo-llm {command}: error: {exc}", file=sys.stderr)
        return 2
    if metrics_directory is not None:
        app.metrics.share(metrics_directory)
    engine = "router" if routed else config.engine
    event_loop.run(
        serve_until_signalled(app, config, command, engine, sock=sock, announce=announce),
        config.event_loop,
    )
    return 0


def _print_ready(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def raise_open_file_limit() -> None:
    """Lift the soft limit on open files to the hard one: every connection is a descriptor,
    and the usual soft limit (1 024) would cap the frontend far below what memory allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)


async def serve_until_signalled(
    app: App,
    config: Config,
    command: str,
    engine: str,
    *,
    sock: socket.socket | None = None,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Serve ``app`` (on ``sock`` when given) until SIGTERM or SIGINT, then drain and stop.

    On the signal ``/live`` turns 503, requests in flight get
    ``graceful_shutdown_timeout_secs`` to finish, the rest are killed, and the server and the
    engines are closed. ``engine`` is what the readiness line says serves the models; the line
    goes to ``announce`` (by default, printed to stderr).
    """
    server = HttpServer(
        app,
        config.http_host,
        config.http_port,
        interface=config.http_interface,
        http2=config.http2,
        sock=sock,
        read_timeout=config.http_read_timeout_secs,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in _SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    threads_before = _native_thread_ids()
    try:
        try:
            await server.start()
            models = ", ".join(app.models) or "no model yet"
            waiting = app.waiting_for()
            pending = f"; waiting for {len(waiting)} worker(s)" if waiting else ""
            workers = config.num_workers if command == "serve" else 1
            processes = f", {workers} processes" if workers > 1 else ""
            (announce or _print_ready)(
                f"dynamo-llm {command}: serving {models} on {server.base_url} "
                f"(engine {engine}, {config.http_interface}, version {__version__}"
                f"{processes}{pending})"
            )
            registration = None
            if command == "worker" and config.discovery_backend == "etcd":
                url = advertised_url(config, server.base_url, server.port)
                registration = build_registration(app, config, url, app.clock)
                registration.start()
            try:
                await stop.wait()
                log.info("shutdown requested")
            finally:
                if registration is not None:
                    # The key goes first, so frontends stop choosing this worker; then drain.
                    await registration.aclose()
            await app.shutdown(kill_wait=_KILL_WAIT)
        finally:
            await server.stop()
            await _wait_for_server_threads(threads_before, limit=1.0)
    finally:
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)
    log.info("stopped")


async def run_until_signalled(
    run: Callable[[Config, asyncio.Event], Awaitable[int]], config: Config
) -> int:
    """``run(config, stop)`` with ``stop`` set on SIGTERM or SIGINT; its exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in _SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        return await run(config, stop)
    finally:
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)


def _native_thread_ids() -> set[int]:
    try:
        return {int(tid) for tid in os.listdir("/proc/self/task")}
    except OSError:  # not Linux: nothing to wait for
        return set()


async def _wait_for_server_threads(before: set[int], limit: float) -> None:
    """Wait (bounded) until the threads the server started have exited.

    granian's embedded server returns from ``serve()`` while its Rust runtime threads are still
    winding down; if the interpreter finalises under one of them, the thread panics and the
    process may abort with status 134 instead of exiting 0 (granian issue #693). Those threads
    are the native threads that appeared since ``before`` and are not Python threads; they are
    normally gone within a few milliseconds. After a client hung up mid-stream granian keeps one
    of them parked (in a futex wait, not touching Python) for good, which is why the wait is
    bounded: exiting under that one is harmless.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while True:
        python_threads = {t.native_id for t in threading.enumerate()}
        if not (_native_thread_ids() - before - python_threads):
            return
        if loop.time() >= deadline:
            log.info("an HTTP server thread is still parked after %gs; exiting anyway", limit)
            return
        await asyncio.sleep(0.005)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
