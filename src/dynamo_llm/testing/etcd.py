"""A real ``etcd`` server as a child process, on ports the OS chose, for tests and benchmarks.

:class:`EtcdServer` runs the ``etcd`` binary (Debian's ``etcd-server`` package) with a data
directory of its own on two loopback ports the OS chose (bound to port 0 and released just
before etcd starts: etcd cannot listen on port 0 itself, since its JSON gateway dials its own
gRPC listener at the configured address), and waits for its log line ``serving insecure
client requests on 127.0.0.1:PORT``. :meth:`EtcdServer.kill` SIGKILLs it and
:meth:`EtcdServer.restart` starts it again on the same port and data directory, as an
operator's restart would.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path
from types import TracebackType

__all__ = ["EtcdServer", "etcd_binary"]

_SERVING = re.compile(r"serving insecure client requests on (?P<addr>[\d.]+:\d+)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def etcd_binary() -> str | None:
    """The path of the ``etcd`` binary, or None when it is not installed."""
    return shutil.which("etcd")


class EtcdServer:
    """One single-node etcd; use as a context manager or call :meth:`stop`."""

    def __init__(self, data_dir: Path, *, binary: str | None = None) -> None:
        found = binary or etcd_binary()
        if found is None:
            raise FileNotFoundError("etcd is not installed (apt-get install etcd-server)")
        self.binary = found
        self.data_dir = Path(data_dir)
        self.port = 0
        self.peer_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        with self._lock:
            return "".join(self._lines)

    def start(self, timeout: float = 20.0) -> str:
        """Start etcd (on the port it had, if it ran before) and return its client URL."""
        if not self.port:
            self.port, self.peer_port = _free_port(), _free_port()
        client = f"http://127.0.0.1:{self.port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        args = [
            self.binary,
            "--name",
            "test",
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"test={peer}",
            "--log-level",
            "info",
        ]
        self._ready.clear()
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._reader = threading.Thread(target=self._read, args=(self.proc,), name="etcd-log")
        self._reader.start()
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"etcd did not start within {timeout}s:\n{self.log[-3000:]}")
        return self.url

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        with proc.stderr:
            for raw in proc.stderr:
                line = raw.decode(errors="replace")
                with self._lock:
                    self._lines.append(line)
                if _SERVING.search(line) is not None:
                    self._ready.set()
        self._ready.set()

    def kill(self) -> None:
        """SIGKILL etcd (its data directory stays, for :meth:`restart`)."""
        self._end(signal.SIGKILL)

    def restart(self, timeout: float = 20.0) -> str:
        self.kill()
        return self.start(timeout)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def _end(self, sig: int) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join()
            self._reader = None

    def __enter__(self) -> EtcdServer:
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
