"""Reading a worker's response body in whole buffers: ``StreamReader.readany`` without its cost
per HTTP chunk.

A worker writes each event as its own HTTP chunk, and aiohttp's reader keeps each chunk as its
own buffer: ``readany()`` then hands them out joined, but takes them one by one, and for each one
asks the connection to resume reading (which runs the parser on nothing and re-arms the read
timer), about seven Python calls per streamed token. :func:`read_any` returns the same bytes in
one step: everything buffered, joined, with the reader's accounting updated as aiohttp's own
``_read_nowait_chunk`` does it, and reading resumed only if it was paused.

It reads the reader's private fields, so it is tied to the aiohttp version the project pins
(``aiohttp==3.14.5`` in ``pyproject.toml``); :data:`SUPPORTED` is False when the fields are not
there, and :func:`read_any` is then plain ``readany()``. ``tests/unit/transport`` checks both
against each other.
"""

from __future__ import annotations

import aiohttp

__all__ = ["SUPPORTED", "read_any"]

_FIELDS = (
    "_buffer",
    "_buffer_offset",
    "_cursor",
    "_eof",
    "_exception",
    "_http_chunk_splits",
    "_low_water",
    "_low_water_chunks",
    "_protocol",
    "_size",
    "_wait",
)
SUPPORTED = all(hasattr(aiohttp.StreamReader, name) for name in _FIELDS)


async def read_any(content: aiohttp.StreamReader, limit: int = 65536) -> bytes:
    """What ``content.readany()`` returns (b"" at the end of the body), in one step, but
    stopping after the chunk that reaches ``limit`` bytes."""
    if not SUPPORTED or content._buffer_offset:
        return await content.readany()
    if content._exception is not None:
        raise content._exception
    buffer = content._buffer
    while not buffer and not content._eof:
        await content._wait("readany")
    if not buffer:
        return b""
    if len(buffer) == 1:
        data = buffer.popleft()
    elif content._size <= limit:
        data = b"".join(buffer)
        buffer.clear()
    else:
        # At most about ``limit`` bytes: a stream held back for a slow client is handed on in
        # pieces small enough for its buffer to be watched between them.
        parts = [buffer.popleft()]
        size = len(parts[0])
        while buffer and size < limit:
            part = buffer.popleft()
            parts.append(part)
            size += len(part)
        data = b"".join(parts)
    size = len(data)
    content._size -= size
    cursor = content._cursor = content._cursor + size
    splits = content._http_chunk_splits
    if splits is not None:
        while splits and splits[0] < cursor:
            splits.popleft()
    protocol = content._protocol
    if (
        protocol._reading_paused
        and content._size < content._low_water
        and (splits is None or len(splits) < content._low_water_chunks)
    ):
        protocol.resume_reading()
    return data
