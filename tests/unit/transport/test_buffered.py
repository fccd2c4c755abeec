"""read_any returns what aiohttp's readany returns, and leaves the reader in the same state."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp.base_protocol import BaseProtocol

from dynamo_llm.transport import buffered
from dynamo_llm.transport.buffered import read_any


class _Transport(asyncio.Transport):
    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Protocol(BaseProtocol):
    """Flow control as aiohttp's response protocol does it, without an HTTP parser."""

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self, resume_parser: bool = True) -> None:
        self._reading_paused = False


def reader(limit: int = 2**16) -> tuple[aiohttp.StreamReader, BaseProtocol]:
    loop = asyncio.get_running_loop()
    protocol = _Protocol(loop)
    protocol.transport = _Transport()  # connected
    content = aiohttp.StreamReader(protocol, limit, loop=loop)
    content.begin_http_chunk_receiving()
    return content, protocol


def feed_chunks(content: aiohttp.StreamReader, *chunks: bytes) -> None:
    for chunk in chunks:
        content.feed_data(chunk)
        content.end_http_chunk_receiving()


def state(content: aiohttp.StreamReader) -> tuple[object, ...]:
    return (content._size, content._cursor, list(content._http_chunk_splits or ()))


def test_the_pinned_aiohttp_has_what_read_any_relies_on() -> None:
    assert buffered.SUPPORTED


async def test_read_any_joins_every_buffered_chunk_like_readany() -> None:
    ours, _ = reader()
    theirs, _ = reader()
    chunks = [b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"]
    feed_chunks(ours, *chunks)
    feed_chunks(theirs, *chunks)
    assert await read_any(ours) == await theirs.readany() == b"".join(chunks)
    assert state(ours) == state(theirs)
    feed_chunks(ours, b"data: 4\n\n")
    feed_chunks(theirs, b"data: 4\n\n")
    assert await read_any(ours) == await theirs.readany() == b"data: 4\n\n"
    assert state(ours) == state(theirs)


async def test_read_any_waits_for_data_and_returns_empty_at_the_end() -> None:
    content, _ = reader()
    pending = asyncio.ensure_future(read_any(content))
    await asyncio.sleep(0)
    assert not pending.done()
    feed_chunks(content, b"data: x\n\n")
    assert await pending == b"data: x\n\n"
    content.feed_eof()
    assert await read_any(content) == b""


async def test_read_any_raises_the_readers_error() -> None:
    content, _ = reader()
    content.set_exception(aiohttp.ClientPayloadError("cut"))
    with pytest.raises(aiohttp.ClientPayloadError):
        await read_any(content)


async def test_read_any_resumes_a_paused_connection_once_drained() -> None:
    content, protocol = reader(limit=16)
    feed_chunks(content, b"x" * 40)  # over the high-water mark: the protocol is paused
    assert protocol._reading_paused
    assert await read_any(content) == b"x" * 40
    assert not protocol._reading_paused


async def test_read_any_stops_after_the_chunk_that_reaches_its_limit() -> None:
    content, _ = reader()
    feed_chunks(content, b"a" * 40, b"b" * 40, b"c" * 40)
    assert await read_any(content, limit=50) == b"a" * 40 + b"b" * 40
    assert await read_any(content, limit=50) == b"c" * 40
