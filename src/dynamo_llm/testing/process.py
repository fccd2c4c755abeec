"""``dynamo-llm serve`` / ``worker`` as a child process, for tests and benchmarks.

:class:`ServerProcess` starts ``python -m dynamo_llm <args>``, drains its stderr on a reader
thread (so the child can never block on a full pipe) and learns its URL from the readiness line
(``dynamo-llm <command>: serving <models> on http://host:port ...``), so ``--http-port 0`` works:
the port the OS chose is read, never guessed. Waiting is on an event set by the reader, not on
sleeps; every wait has a deadline and, when it passes, the error carries the child's log.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from types import TracebackType

READY_LINE = re.compile(
    r"dynamo-llm (?P<command>\w+): serving (?P<models>.+?) on (?P<url>http://\S+)"
)
"""The readiness line ``serve`` and ``worker`` print to stderr once they accept connections."""


# ``python -m dynamo_llm`` pinned to the CPUs in argv[1] before anything starts, so every thread
# the server ever starts (granian's included) inherits the affinity.
_PINNED_MAIN = (
    "import os, runpy, sys; "
    "os.sched_setaffinity(0, {int(c) for c in sys.argv.pop(1).split(',')}); "
    "runpy.run_module('dynamo_llm', run_name='__main__', alter_sys=True)"
)


class ServerProcess:
    """One ``python -m dynamo_llm`` child; use as a context manager or call :meth:`stop`."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cpus: set[int] | None = None,
    ) -> None:
        """Start ``python -m dynamo_llm *args``; ``cpus`` pins it (Linux) to those cores."""
        if cpus is None:
            self.args = [sys.executable, "-m", "dynamo_llm", *args]
        else:
            cpu_list = ",".join(str(c) for c in sorted(cpus))
            self.args = [sys.executable, "-c", _PINNED_MAIN, cpu_list, *args]
        self.url: str | None = None
        self.returncode: int | None = None
        self._lines: list[str] = []
        self._ready = threading.Event()
        self._lock = threading.Lock()
        child_env = dict(os.environ if env is None else env)
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=child_env,
        )
        self._reader = threading.Thread(target=self._read, name="server-process-stderr")
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> str:
        """Everything the child wrote to stderr so far."""
        with self._lock:
            return "".join(self._lines)

    def _read(self) -> None:
        stream = self.proc.stderr
        assert stream is not None
        with stream:
            for raw in stream:
                line = raw.decode(errors="replace")
                with self._lock:
                    self._lines.append(line)
                if self.url is None:
                    match = READY_LINE.search(line)
                    if match is not None:
                        self.url = match.group("url")
                        self._ready.set()
        self._ready.set()  # EOF: the child exited; wake any waiter so it can report that

    def wait_ready(self, timeout: float = 20.0) -> str:
        """The child's base URL, once it accepts connections; raises if it exits or times out."""
        if not self._ready.wait(timeout):
            raise TimeoutError(f"{self.args} not ready within {timeout}s; its log:\n{self.log}")
        if self.url is None:
            code = self.proc.wait()
            raise RuntimeError(f"{self.args} exited with {code} before it was ready:\n{self.log}")
        return self.url

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` (SIGTERM: graceful), wait up to ``timeout``, then SIGKILL. The exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join()
        self.returncode = self.proc.returncode
        return self.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
