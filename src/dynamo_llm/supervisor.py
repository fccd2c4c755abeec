"""``--num-workers N``: N frontend processes behind the one listening socket the parent owns.

The parent binds the socket (so a port in use fails before anything starts), makes a private
directory for the shared metrics, and forks N children. Each child builds its own app (engines,
router, discovery: each routes with its own counts), shares its metrics through the directory
(:mod:`dynamo_llm.metrics.shared`) and serves the inherited socket with the same server and the
same drain as a single process (:func:`dynamo_llm.cli.serve_until_signalled`); the kernel hands
each new connection to one of the children waiting in ``accept``.

The parent only supervises: once every child is serving it prints the one readiness line; a
child that exits while the parent is not stopping is restarted (its live gauges are dropped from
the totals, its counters stay; no sooner than :data:`RESTART_DELAY` after it started, while the
parent goes on watching the others and its signals), unless it never got as far as serving,
which would fail the same way again: then everything stops and the parent exits with the
child's status. On SIGTERM or
SIGINT the parent passes the signal to every child, each drains its own requests
(``graceful_shutdown_timeout_secs``), and the parent exits 0 once they are all gone.

granian's and uvicorn's process managers are not used: both start each worker by importing the
application in a fresh interpreter, and stop it with the server's own connection drain, so a
worker would not build its app from the parsed configuration, and SIGTERM would skip the app's
drain (``/live`` turning 503, in-flight requests given their grace and then stopped, with their
outcome counted). Forking the parent, which has started no thread and no event loop yet, runs
exactly the single-process path in every child.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from .metrics.shared import forget_process

log = logging.getLogger("dynamo_llm.supervisor")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RESTART_DELAY = 1.0
"""A child that dies within this long of starting is restarted only after this long."""
_PR_SET_PDEATHSIG = 1
STOP_MARGIN = 10.0
"""Seconds a child may take past its drain before it is killed."""

ChildMain = Callable[[socket.socket, str, Callable[[str], None]], int]
"""What a child runs: ``(listening socket, metrics directory, announce) -> exit status``;
it calls ``announce(readiness_line)`` once it serves."""


def _stop_with_parent() -> None:
    """Linux: a SIGTERM (a drain) when the parent dies, so no child outlives it unsupervised."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)


@dataclass(eq=False)
class _Child:
    index: int
    process: BaseProcess
    ready: Connection
    started_at: float = field(default_factory=time.monotonic)
    serving: bool = False
    """It said it serves (its readiness pipe is then closed)."""
    pipe_open: bool = True
    restart_at: float | None = None
    """It exited soon after starting: when (``time.monotonic``) its successor starts."""


class Supervisor:
    """Runs ``workers`` children of ``child_main`` on ``sock`` until SIGTERM or SIGINT."""

    def __init__(
        self,
        child_main: ChildMain,
        sock: socket.socket,
        workers: int,
        *,
        stop_within: float,
        announce: Callable[[str], None],
    ) -> None:
        """``announce(line)`` prints the readiness line a child sent, once all serve;
        ``stop_within`` is how long a child may take to drain after SIGTERM."""
        self._main = child_main
        self._sock = sock
        self._workers = workers
        self._stop_within = stop_within + STOP_MARGIN
        self._announce = announce
        self._context = multiprocessing.get_context("fork")
        self._children: list[_Child] = []
        self._directory = ""
        self._stopping = False
        self._announced = False
        self._wake: tuple[int, int] = (-1, -1)

    def run(self) -> int:
        """Supervise until stopped; the exit status (0, or a child's failed start's)."""
        self._directory = tempfile.mkdtemp(prefix="dynamo-llm-metrics-")
        wake_r, wake_w = self._wake = os.pipe()
        os.set_blocking(wake_w, False)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _SIGNALS}
        old_wakeup = signal.set_wakeup_fd(wake_w)
        try:
            for index in range(self._workers):
                self._children.append(self._spawn(index))
            return self._supervise()
        finally:
            self._stop_all()
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(wake_r)
            os.close(wake_w)
            shutil.rmtree(self._directory, ignore_errors=True)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stopping = True

    def _is_stopping(self) -> bool:
        return self._stopping  # (a call: the signal handler changes it behind mypy's back)

    def _spawn(self, index: int) -> _Child:
        reader, writer = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=self._child,
            args=(writer,),
            name=f"dynamo-llm-worker-{index + 1}",
            daemon=False,
        )
        # Blocked across the fork: a stop that comes meanwhile reaches the child only once it
        # has its own handling (SIG_DFL: it stops at once), never the parent's handler in the
        # child's copy, which would swallow it and leave the child serving.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        writer.close()
        return _Child(index, process, reader)

    def _child(self, ready: Connection) -> None:
        # A fresh process: the parent's signal handling and wake-up pipe are not ours.
        signal.set_wakeup_fd(-1)
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        for fd in self._wake:
            os.close(fd)
        for other in self._children:
            other.ready.close()
        _stop_with_parent()

        def announce(text: str) -> None:
            ready.send(text)
            ready.close()

        sys.exit(self._main(self._sock, self._directory, announce))

    def _supervise(self) -> int:
        wake_r = self._wake[0]
        while not self._stopping:
            running = [c for c in self._children if c.restart_at is None]
            pipes = {c.ready: c for c in running if c.pipe_open}
            sentinels = [c.process.sentinel for c in running]
            due = [c.restart_at for c in self._children if c.restart_at is not None]
            timeout = max(0.0, min(due) - time.monotonic()) if due else None
            for ready in wait([*pipes, *sentinels, wake_r], timeout):
                if ready == wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 512)
                    continue
                if isinstance(ready, Connection) and ready in pipes:
                    self._on_ready(pipes[ready])
            if self._is_stopping():
                break
            for child in running:
                if child.process.exitcode is None and child.process.is_alive():
                    continue
                status = self._on_exit(child)
                if status is not None:
                    return status
            now = time.monotonic()
            for child in list(self._children):
                if child.restart_at is not None and child.restart_at <= now:
                    self._restart(child)
        return 0

    def _on_ready(self, child: _Child) -> None:
        child.pipe_open = False
        try:
            text = child.ready.recv()
        except EOFError:  # it exited before serving: its exit is handled next
            return
        finally:
            child.ready.close()
        child.serving = True
        if not self._announced and all(c.serving for c in self._children):
            self._announced = True
            self._announce(text)

    def _on_exit(self, child: _Child) -> int | None:
        process = child.process
        process.join()
        code = process.exitcode if process.exitcode is not None else 1
        if child.pipe_open:  # it may have said it serves just before it exited
            self._on_ready(child)
        if not child.serving:
            # It failed while starting (bad configuration, say): a restart would fail the same.
            log.error(
                "worker process %d exited with status %d before serving", child.index + 1, code
            )
            return code or 1
        assert process.pid is not None
        forget_process(self._directory, process.pid)
        lived = time.monotonic() - child.started_at
        log.warning(
            "worker process %d (pid %d) exited with status %d after %.1fs; restarting it",
            child.index + 1,
            process.pid,
            code,
            lived,
        )
        if lived < RESTART_DELAY:
            # Later, not by sleeping here: meanwhile a stop or another child's exit is seen.
            child.restart_at = child.started_at + RESTART_DELAY
        else:
            self._restart(child)
        return None

    def _restart(self, child: _Child) -> None:
        self._children[self._children.index(child)] = self._spawn(child.index)

    def _stop_all(self) -> None:
        for child in self._children:
            if child.process.is_alive() and child.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self._stop_within
        for child in self._children:
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.is_alive():
                log.warning("worker process %d did not stop in time: killing it", child.index + 1)
                child.process.kill()
                child.process.join()
