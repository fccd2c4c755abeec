"""The HTTP/1.1 client connection, fed by hand over a fake transport: framing, reuse,
backpressure and the failure classes."""

import asyncio
from typing import Any, cast

import pytest

from dynamo_llm.transport.h1 import (
    HIGH_WATER,
    LOW_WATER,
    MAX_HEAD,
    BadResponse,
    ClosedUnanswered,
    Connection,
    ConnectionDropped,
)
from dynamo_llm.transport.pool import Pool

CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
EVENTS = [b'data: {"n":%d}\n\n' % i for i in range(20)]


def chunked(parts: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.paused = False
        self.closed = False

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def pause_reading(self) -> None:
        self.paused = True

    def is_paused(self) -> bool:
        return self.paused

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class StubPool:
    """Records what a connection gives back to its pool."""

    def __init__(self) -> None:
        self.pooled: list[Connection] = []
        self.forgotten: list[Connection] = []

    def put_back(self, key: object, conn: Connection) -> None:
        self.pooled.append(conn)

    def forget(self, key: object, conn: Connection) -> None:
        self.forgotten.append(conn)


async def sent(
    pool: StubPool | None = None,
) -> tuple[Connection, FakeTransport, asyncio.Future[None]]:
    """A connection whose request is sent, and the wait for its answer's head."""
    conn = Connection(cast(Pool, pool), "key")
    transport = FakeTransport()
    conn.connection_made(transport)
    task = asyncio.ensure_future(conn.request(b"POST / HTTP/1.1\r\n\r\n"))
    await asyncio.sleep(0)
    return conn, transport, task


async def answered(head: bytes, pool: StubPool | None = None) -> tuple[Connection, FakeTransport]:
    """A connection whose request is sent and whose answer begins with ``head``."""
    conn, transport, task = await sent(pool)
    conn.data_received(head)
    await task
    return conn, transport


async def read_all(conn: Connection) -> bytes:
    parts = []
    while part := await conn.read_any():
        parts.append(part)
    return b"".join(parts)


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7, 11, 64])
async def test_a_chunked_body_cut_anywhere_reads_whole(cut: int) -> None:
    conn, _ = await answered(CHUNKED)
    assert (conn.status, conn.content_type) == (200, "text/event-stream")
    wire = chunked(EVENTS)
    for at in range(0, len(wire), cut):
        conn.data_received(wire[at : at + cut])
    assert await read_all(conn) == b"".join(EVENTS)
    assert conn.is_eof() and conn.keep_alive


async def test_one_read_holding_many_chunks_is_handed_over_at_once() -> None:
    conn, _ = await answered(CHUNKED)
    conn.data_received(chunked(EVENTS)[:-5])
    assert await conn.read_any() == b"".join(EVENTS)
    assert not conn.is_eof()


async def test_a_reader_waiting_is_woken_by_the_next_read() -> None:
    conn, _ = await answered(CHUNKED)
    reader = asyncio.ensure_future(conn.read_any())
    await asyncio.sleep(0)
    assert not reader.done()
    conn.data_received(b"5\r\nhello\r\n")
    assert await reader == b"hello"


async def test_a_read_after_its_reader_was_cancelled_waits_for_the_next_reader() -> None:
    conn, _ = await answered(CHUNKED)
    reader = asyncio.ensure_future(conn.read_any())
    await asyncio.sleep(0)
    reader.cancel()  # its waiter is cancelled now; the reader unwinds on its next step
    conn.data_received(b"5\r\nhello\r\n")
    with pytest.raises(asyncio.CancelledError):
        await reader
    conn.data_received(b"1\r\n!\r\n")
    assert await conn.read_any() == b"hello!"
    again = asyncio.ensure_future(conn.read_any())
    await asyncio.sleep(0)
    conn.data_received(b"3\r\nabc\r\n")
    assert await again == b"abc"


async def test_content_length_and_bytes_after_it_stop_reuse() -> None:
    conn, _ = await answered(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy")
    assert conn.status == 503
    assert await read_all(conn) == b"busy"
    assert conn.keep_alive
    conn.data_received(b"HTTP/1.1 200 OK\r\n\r\n")  # nothing we asked for
    assert not conn.keep_alive


async def test_a_body_until_the_close_ends_cleanly_at_the_close() -> None:
    conn, _ = await answered(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
    conn.data_received(b"data: {}\n\n")
    assert not conn.keep_alive
    conn.connection_lost(None)
    assert await read_all(conn) == b"data: {}\n\n"


async def test_a_reset_during_a_body_until_the_close_is_a_drop() -> None:
    conn, _ = await answered(b"HTTP/1.1 200 OK\r\n\r\n")
    conn.connection_lost(ConnectionResetError())
    with pytest.raises(ConnectionDropped):
        await conn.read_any()


async def test_an_interim_answer_is_skipped() -> None:
    conn, _ = await answered(b"HTTP/1.1 100 Continue\r\n\r\n" + CHUNKED + b"2\r\nok\r\n0\r\n\r\n")
    assert conn.status == 200
    assert await read_all(conn) == b"ok"


async def test_a_close_before_any_byte_is_closed_unanswered_and_after_some_a_drop() -> None:
    conn, _, task = await sent()
    conn.connection_lost(None)
    with pytest.raises(ClosedUnanswered):
        await task

    conn, _transport, task = await sent()
    conn.data_received(b"HTTP/1.1 200 O")
    conn.connection_lost(ConnectionResetError())
    with pytest.raises(ConnectionDropped):
        await task


async def test_a_body_cut_short_is_raised_after_what_came_before_it() -> None:
    conn, _ = await answered(CHUNKED)
    conn.data_received(b"5\r\nhello\r\n3\r\nab")
    conn.connection_lost(None)
    assert await conn.read_any() == b"helloab"
    with pytest.raises(ConnectionDropped):
        await conn.read_any()


@pytest.mark.parametrize(
    "answer",
    [
        b"<html>oops</html>\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
    ],
)
async def test_an_answer_that_is_not_http_is_a_bad_response(answer: bytes) -> None:
    conn, transport, task = await sent()
    conn.data_received(answer)
    with pytest.raises(BadResponse):
        await task
        await read_all(conn)  # when the head itself was fine
    assert transport.closed and conn.closed


async def test_a_head_larger_than_the_bound_is_refused() -> None:
    conn, _transport, task = await sent()
    conn.data_received(b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * MAX_HEAD + b"\r\n")
    with pytest.raises(BadResponse):
        await task


async def test_reading_pauses_past_the_high_water_and_resumes_below_the_low() -> None:
    conn, transport = await answered(CHUNKED)
    piece = b"x" * 8192
    fed = 0
    while not transport.is_paused():
        conn.data_received(b"%x\r\n%s\r\n" % (len(piece), piece))
        fed += len(piece)
    assert fed > HIGH_WATER
    taken = 0
    while transport.is_paused():
        taken += len(await conn.read_any(limit=8192))
    assert fed - taken < LOW_WATER


async def test_release_pools_the_connection_only_once_its_answer_was_read_to_its_end() -> None:
    pool = StubPool()
    conn, transport = await answered(CHUNKED, pool)
    conn.data_received(b"5\r\nhello\r\n")
    conn.release()  # not at its end: what is left of the answer would come before the next
    assert transport.closed and (pool.pooled, pool.forgotten) == ([], [conn])

    conn, transport = await answered(
        CHUNKED.replace(b"OK\r\n", b"OK\r\nConnection: close\r\n"), pool
    )
    conn.data_received(b"0\r\n\r\n")
    assert await read_all(conn) == b""
    conn.release()  # the worker closes it
    assert transport.closed and pool.pooled == []

    conn, transport = await answered(CHUNKED, pool)
    conn.data_received(b"2\r\nok\r\n0\r\n\r\n")
    assert await read_all(conn) == b"ok"
    conn.release()
    assert not transport.closed and pool.pooled == [conn]
    # And it carries the next exchange from a clean start.
    task = asyncio.ensure_future(conn.request(b"POST / HTTP/1.1\r\n\r\n"))
    await asyncio.sleep(0)
    conn.data_received(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy")
    await task
    assert conn.status == 503 and await read_all(conn) == b"busy"
    assert len(transport.written) == 2


async def test_a_cancelled_wait_for_the_head_closes_the_connection() -> None:
    _conn, transport, task = await sent()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert transport.closed
