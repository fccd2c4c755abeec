"""How much of a streamed response its client has not taken yet, from the kernel (granian).

granian's response stream is an unbounded channel: ``send_bytes`` never waits, so a client that
stops reading would have everything the engine makes buffered for it. The kernel knows better.
On the connection's TCP socket, ``tcpi_bytes_acked`` (``TCP_INFO``) plus the send queue
(``SIOCOUTQ``) is everything granian has written to it; what we sent since minus what it wrote
since is what waits in granian's channel, and the send queue is what waits in the kernel. Their
sum is :meth:`UnreadMeter.unread`.

granian's sockets live in this process. The connection's socket is found by the client's
address the first time a stream asks (only streams that grew large do): a scan of
``/proc/self/fd`` that looks at each socket once (its inode is remembered), spaced so that
scanning takes at most 2 % of the time (a stream that misses is looked for again at its next
check); the socket found is duplicated, so that it stays the same socket
for as long as the stream watches it, and the duplicate is closed when the stream ends. A
stream whose socket cannot be found (a Unix socket, HTTP/2, a miss within the rescan interval)
is simply not watched: :func:`open_meter` returns None.

The estimate errs low by what already waited in granian's channel when the meter was opened
(usually at the stream's first check, after :data:`~dynamo_llm.http.stream.CHECK_EVERY` bytes,
so by at most that; later after a miss), and counts the response headers and chunk framing as
taken.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import struct
import termios
import time

__all__ = ["UnreadMeter", "open_meter"]

log = logging.getLogger("dynamo_llm.http")

RESCAN_AFTER = 0.05
"""The least time between two scans of ``/proc/self/fd``; they are also spaced by 50 times what
the last one took, so scanning never takes more than 2 % of the loop (with 10 000 connections a
scan takes ~15 ms: a ``readlink`` each; only sockets it has not seen are asked their peer)."""
SCAN_SHARE = 50
_TCP_INFO_SIZE = 232
_BYTES_ACKED = struct.Struct("<Q")  # tcpi_bytes_acked, at offset 120 of struct tcp_info
_BYTES_ACKED_AT = 120
_INT = struct.Struct("i")


class UnreadMeter:
    """One connection's socket (a duplicate), and what the stream had sent when it was opened."""

    __slots__ = ("_base", "_sock")

    def __init__(self, sock: socket.socket, sent: int) -> None:
        self._sock = sock
        self._base = sent - self._written()

    def _written(self) -> int:
        """Every byte granian has written to the socket: acknowledged, or still queued."""
        sock = self._sock
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
        acked: int = _BYTES_ACKED.unpack_from(info, _BYTES_ACKED_AT)[0]
        queued: int = _INT.unpack(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        return acked + queued

    def unread(self, sent: int) -> int:
        """Bytes of the ``sent`` so far that the client has not taken: in granian's channel or
        in our socket's send queue."""
        sock = self._sock
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
        acked: int = _BYTES_ACKED.unpack_from(info, _BYTES_ACKED_AT)[0]
        return sent - self._base - acked

    def close(self) -> None:
        self._sock.close()


class _SocketIndex:
    """The TCP sockets of this process by peer address, refreshed by a scan when one is missing."""

    def __init__(self) -> None:
        self._peers: dict[int, tuple[str, int] | None] = {}  # inode -> peer (None: not TCP)
        self._fds: dict[tuple[str, int], tuple[int, int]] = {}  # peer -> (fd, inode)
        self._scanned = -RESCAN_AFTER
        self._scan_cost = 0.0

    def find(self, peer: tuple[str, int]) -> socket.socket | None:
        found = self._fds.get(peer)
        sock = _duplicate(*found) if found is not None else None
        if sock is not None and _peer_of(sock) == peer:
            return sock
        if sock is not None:
            sock.close()
        now = time.monotonic()
        if now - self._scanned < max(RESCAN_AFTER, SCAN_SHARE * self._scan_cost):
            return None
        self._scan()
        self._scanned = time.monotonic()
        self._scan_cost = self._scanned - now
        found = self._fds.get(peer)
        return _duplicate(*found) if found is not None else None

    def _scan(self) -> None:
        fds: dict[tuple[str, int], tuple[int, int]] = {}
        peers: dict[int, tuple[str, int] | None] = {}
        names: list[str] = []
        with contextlib.suppress(OSError):
            names = os.listdir("/proc/self/fd")
        for name in names:
            try:
                target = os.readlink(f"/proc/self/fd/{name}")
            except OSError:
                continue
            if not target.startswith("socket:["):
                continue
            inode = int(target[8:-1])
            peer = self._peers[inode] if inode in self._peers else _peer_of_fd(int(name))
            peers[inode] = peer
            if peer is not None:
                fds[peer] = (int(name), inode)
        self._peers, self._fds = peers, fds


def _peer_of_fd(fd: int) -> tuple[str, int] | None:
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
            return None
        return _peer_of(sock)
    finally:
        sock.detach()  # the fd is granian's: never close it


def _peer_of(sock: socket.socket) -> tuple[str, int] | None:
    try:
        address = sock.getpeername()
    except OSError:
        return None
    return (str(address[0]), int(address[1]))


def _duplicate(fd: int, inode: int) -> socket.socket | None:
    try:
        dup = os.dup(fd)
    except OSError:
        return None
    try:
        if os.fstat(dup).st_ino != inode:
            os.close(dup)
            return None
        return socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return None


_index = _SocketIndex()


def open_meter(client: str, sent: int) -> UnreadMeter | None:
    """A meter on the connection of the client at ``client`` (``"host:port"``, as granian gives
    it), or None when its socket is not found; ``sent`` is what the stream has sent so far."""
    host, _, port = client.rpartition(":")
    try:
        peer = (host.strip("[]"), int(port))
    except ValueError:
        return None
    sock = _index.find(peer)
    if sock is None:
        return None
    try:
        return UnreadMeter(sock, sent)
    except OSError:
        sock.close()
        return None
