"""The generation connection pool against a tiny loopback server: reuse, the bound, idle
expiry, the request head, a refused connect."""

import asyncio
import base64
import socket
from collections.abc import AsyncIterator

import pytest

from dynamo_llm.runtime.clock import FakeClock
from dynamo_llm.transport.auth import WorkerKeys
from dynamo_llm.transport.h1 import ConnectFailed, Connection
from dynamo_llm.transport.pool import Pool

SAFETY_NET = 10.0
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Server:
    """Answers every request head with ``ANSWER``; counts the connections it accepted."""

    def __init__(self) -> None:
        self.accepted = 0
        self.heads: list[bytes] = []
        self.url = ""
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                writer.write(ANSWER)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> "Server":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async with Server() as s:
        yield s


async def exchange(pool: Pool, url: str) -> Connection:
    endpoint = pool.endpoint(url)
    conn = await pool.acquire(endpoint)
    await conn.request(pool.request_head(endpoint, "/v1/x", b"", 0))
    return conn


async def finish(conn: Connection) -> None:
    while await conn.read_any():
        pass
    conn.release()


async def test_a_connection_read_to_its_end_is_reused(server: Server) -> None:
    pool = Pool(2.0)
    async with asyncio.timeout(SAFETY_NET):
        for _ in range(3):
            await finish(await exchange(pool, server.url))
        assert server.accepted == 1
        assert (pool.open, pool.idle) == (1, 1)
        conn = await exchange(pool, server.url)
        conn.close()  # abandoned: not reused
        assert (pool.open, pool.idle) == (0, 0)
        await finish(await exchange(pool, server.url))
        assert server.accepted == 2
    await pool.aclose()


async def test_the_bound_makes_a_request_wait_for_a_free_connection(server: Server) -> None:
    pool = Pool(2.0, limit=1)
    async with asyncio.timeout(SAFETY_NET):
        first = await exchange(pool, server.url)
        second = asyncio.ensure_future(exchange(pool, server.url))
        while not pool._waiters:  # it queued for the one connection
            await asyncio.sleep(0)
        assert not second.done() and pool.open == 1
        await finish(first)
        await finish(await second)
        assert server.accepted == 1
    await pool.aclose()


async def test_at_the_bound_another_workers_idle_connection_is_closed_to_make_room() -> None:
    clock = FakeClock()  # the keep-alive never runs out: only the pool can free the slot
    pool = Pool(2.0, limit=2, keepalive_timeout=4.0, clock=clock)
    async with Server() as a, Server() as b, asyncio.timeout(SAFETY_NET):
        older, newer = await exchange(pool, a.url), await exchange(pool, a.url)
        await finish(older)
        await clock.advance(1.0)
        await finish(newer)
        assert (pool.open, pool.idle) == (2, 2)
        conn = await exchange(pool, b.url)  # no wait: a's longest idle connection goes
        assert (pool.open, pool.idle, pool.waiting) == (2, 1, 0)
        await finish(conn)
        await finish(await exchange(pool, a.url))  # a's other one is still there, reused
        assert (a.accepted, b.accepted) == (2, 1)
    await pool.aclose()


async def test_an_idle_connection_expires_after_the_keepalive(server: Server) -> None:
    clock = FakeClock()
    pool = Pool(2.0, keepalive_timeout=4.0, clock=clock)
    async with asyncio.timeout(SAFETY_NET):
        await finish(await exchange(pool, server.url))
        await clock.advance(3.9)
        assert (pool.open, pool.idle) == (1, 1)
        await clock.advance(0.1)
        assert (pool.open, pool.idle) == (0, 0)
        await finish(await exchange(pool, server.url))
        assert server.accepted == 2
    await pool.aclose()


class LateClock:
    """Time that moves only when told, and timers that never fire: a loop too busy to run the
    pool's expiry timer on time."""

    def __init__(self) -> None:
        self.time = 0.0

    def now(self) -> float:
        return self.time

    async def sleep(self, seconds: float) -> None:
        raise AssertionError("the pool does not sleep")

    def call_at(self, when: float, callback: object) -> asyncio.Handle:
        return asyncio.get_running_loop().call_soon(lambda: None)


async def test_an_expired_idle_connection_is_never_handed_out(server: Server) -> None:
    clock = LateClock()
    pool = Pool(2.0, keepalive_timeout=4.0, clock=clock)
    async with asyncio.timeout(SAFETY_NET):
        await finish(await exchange(pool, server.url))
        clock.time = 4.0  # idle for the whole keep-alive: the worker may be closing it
        await finish(await exchange(pool, server.url))
        assert server.accepted == 2

        # The same for a request that waited for the bound and was woken by the put-back.
        bounded = Pool(2.0, limit=1, keepalive_timeout=4.0, clock=clock)
        first = await exchange(bounded, server.url)
        second = asyncio.ensure_future(exchange(bounded, server.url))
        while not bounded._waiters:
            await asyncio.sleep(0)
        await finish(first)  # back in the pool, the waiter woken but not yet run
        clock.time += 4.0
        await finish(await second)
        assert server.accepted == 4
        assert (bounded.open, bounded.idle) == (1, 1)
    await pool.aclose()
    await bounded.aclose()


async def test_the_socket_has_the_fixed_receive_buffer_and_no_delay(server: Server) -> None:
    pool = Pool(2.0, receive_buffer=64 * 1024)
    conn = await exchange(pool, server.url)
    assert conn.transport is not None
    sock = conn.transport.get_extra_info("socket")
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * 64 * 1024  # Linux doubles
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    conn.close()
    await pool.aclose()


def test_the_head_carries_the_workers_own_key_else_its_url_credentials_else_the_default() -> None:
    keys = WorkerKeys({"http://keyed:8000": "wk-own"})
    pool = Pool(2.0, authorization="Bearer default", worker_keys=keys)

    def authorization(url: str) -> bytes:
        head = pool.request_head(pool.endpoint(url), "/v1/chat/completions", b"X-A: b\r\n", 7)
        assert head.startswith(b"POST ")
        assert b"\r\nX-A: b\r\n" in head and head.endswith(b"Content-Length: 7\r\n\r\n")
        return next(
            (line for line in head.split(b"\r\n") if line.startswith(b"Authorization: ")), b""
        )

    assert authorization("http://keyed:8000") == b"Authorization: Bearer wk-own"
    basic = base64.b64encode(b"user:p@ss").decode()
    assert (
        authorization("http://user:p%40ss@other:9000/") == f"Authorization: Basic {basic}".encode()
    )
    assert authorization("http://plain:9000") == b"Authorization: Bearer default"
    assert Pool(2.0).request_head(pool.endpoint("http://a"), "/x", b"", 0) == (
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"
    )
    head = pool.request_head(pool.endpoint("http://[::1]:81/api/"), "/x", b"", 0)
    assert head.startswith(b"POST /api/x HTTP/1.1\r\nHost: [::1]:81\r\n")


async def test_a_refused_connect_is_connect_failed_and_holds_no_slot() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        pool = Pool(2.0, limit=1)
        with pytest.raises(ConnectFailed) as info:
            await pool.acquire(pool.endpoint(f"http://127.0.0.1:{port}"))
    assert info.value.reason == "connection refused"
    assert pool.open == 0
    await pool.aclose()


@pytest.mark.parametrize(
    "host",
    [
        "a" * 64 + ".example",  # a label over 63 characters
        "a..b",  # an empty label
        "\u200b.example",  # IDNA maps the zero-width space away: an empty label
        "x" * 5000 + ".example",  # and long: the message shows it bounded
    ],
)
async def test_a_host_that_cannot_be_looked_up_is_connect_failed_naming_it_bounded(
    host: str,
) -> None:
    pool = Pool(2.0, limit=1)
    with pytest.raises(ConnectFailed) as info:
        await pool.acquire(pool.endpoint(f"http://user:secret@{host}:8000"))
    reason = info.value.reason
    assert reason.startswith("the worker's host `") and reason.endswith(
        "` is not a valid host name"
    )
    assert host[:20].encode("ascii", "backslashreplace").decode() in reason
    assert len(reason) < 200 and "secret" not in reason
    reason.encode("ascii")  # what it shows of the host is plain text
    assert pool.open == 0
    await pool.aclose()
