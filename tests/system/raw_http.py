"""HTTP/1.1 over a raw socket: for the tests that pick the exact moment a client hangs up, or
send what no HTTP client library would (hostile headers, a body a byte at a time)."""

import asyncio

from dynamo_llm.testing import Frontend


def raw_post(path: str, body: bytes, *headers: bytes, close: bool = False) -> bytes:
    """A JSON POST as bytes; ``headers`` are whole header lines (``b"Name: value"``)."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n".encode()
        + b"".join(header + b"\r\n" for header in headers)
        + (b"Connection: close\r\n" if close else b"")
        + b"\r\n"
        + body
    )


async def raw_exchange(fe: Frontend, data: bytes) -> bytes:
    """Send ``data`` on a fresh socket and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", fe.server.port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


def status_of(response: bytes) -> int:
    status_line = response.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 "), response[:200]
    return int(status_line.split()[1])


async def read_events(reader: asyncio.StreamReader, count: int) -> None:
    """Read until ``count`` SSE data lines have arrived; the stream must not end before."""
    seen = 0
    while seen < count:
        line = await reader.readline()
        assert line, "the server closed the stream early"
        if line.startswith(b"data: "):
            assert line != b"data: [DONE]\n"
            seen += 1
