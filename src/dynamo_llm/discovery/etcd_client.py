"""A small asyncio etcd v3 client over etcd's own JSON gateway (``/v3/...``), on aiohttp.

etcd serves its gRPC API as JSON over HTTP too (the grpc-gateway built into every etcd 3.x
server): a ``POST /v3/kv/range`` with ``{"key": <base64>, "range_end": <base64>}`` is the
``Range`` call. Keys and values are base64 and 64-bit integers are JSON strings. This client
uses only what discovery needs:

=========================  ========================  ==========================================
method                     gateway path              what for
=========================  ========================  ==========================================
:meth:`range_prefix`       ``/v3/kv/range``          list a prefix, with the store's revision
:meth:`put`                ``/v3/kv/put``            write a key, bound to a lease
:meth:`delete`             ``/v3/kv/deleterange``    withdraw a key
:meth:`grant`              ``/v3/lease/grant``       a lease with a TTL
:meth:`keepalive`          ``/v3/lease/keepalive``   refresh it (one message per call)
:meth:`revoke`             ``/v3/lease/revoke``      end it (its keys go with it)
:meth:`watch`              ``/v3/watch``             a stream of changes from a revision
:meth:`compact`            ``/v3/kv/compaction``     drop history (operators; tests)
=========================  ========================  ==========================================

The ``/v3/`` prefix is served from etcd 3.4 on (3.3 had only ``/v3beta/``, which 3.5 dropped),
so it is what works with Debian's 3.4 and every newer server.

Errors (one tree): :class:`EtcdError` is the base; :class:`EtcdUnavailable` means no endpoint
answered (a refused connection, a timeout, a 5xx), :class:`WatchCompacted` that a watch asked
for a revision etcd has compacted away (the caller lists again). Several endpoints may be
given (a cluster): a call that cannot reach one tries the next, and the one that answered is
used first next time.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

__all__ = [
    "EtcdClient",
    "EtcdError",
    "EtcdUnavailable",
    "KeyValue",
    "Lease",
    "WatchCompacted",
    "WatchEvent",
    "prefix_range_end",
]

log = logging.getLogger("dynamo_llm.discovery")

API = "/v3"
DEFAULT_ENDPOINT = "http://127.0.0.1:2379"


class EtcdError(Exception):
    """Something went wrong talking to etcd."""


class EtcdUnavailable(EtcdError):
    """No etcd endpoint could be reached or answered (connection refused, timeout, 5xx)."""


class WatchCompacted(EtcdError):
    """The watch's start revision was compacted: list again, then watch from there."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted up to {compact_revision}")
        self.compact_revision = compact_revision


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A change of one key: a put (``value`` set) or a delete (``value`` None)."""

    key: str
    value: bytes | None
    revision: int

    @property
    def is_delete(self) -> bool:
        return self.value is None


@dataclass(frozen=True, slots=True)
class Lease:
    id: int
    ttl: int


def prefix_range_end(prefix: str) -> bytes:
    """The ``range_end`` that makes a range cover every key starting with ``prefix``."""
    end = bytearray(prefix.encode())
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _int(value: Any) -> int:
    return int(value) if value is not None else 0


class EtcdClient:
    """Calls etcd's JSON gateway at ``endpoints`` (``http://host:2379``); owns its session."""

    def __init__(self, endpoints: Sequence[str], *, request_timeout: float = 3.0) -> None:
        urls = [e.strip().rstrip("/") for e in endpoints if e.strip()]
        if not urls:
            raise ValueError("no etcd endpoint given")
        self.endpoints = [
            u if u.startswith(("http://", "https://")) else "http://" + u for u in urls
        ]
        self._current = 0
        self._timeout = request_timeout
        self._session: aiohttp.ClientSession | None = None

    @property
    def endpoint(self) -> str:
        """The endpoint tried first (the last one that answered)."""
        return self.endpoints[self._current]

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Its own session: the workers' carries their API key, which etcd must not see.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._timeout),
                trust_env=False,
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        data = msgspec.json.encode(body)
        last: BaseException | None = None
        for step in range(len(self.endpoints)):
            index = (self._current + step) % len(self.endpoints)
            url = self.endpoints[index] + API + path
            try:
                async with self._http().post(
                    url, data=data, timeout=aiohttp.ClientTimeout(total=self._timeout)
                ) as resp:
                    raw = await resp.read()
                    status = resp.status
            except (TimeoutError, aiohttp.ClientError) as exc:
                last = exc
                continue
            if status >= 500:
                last = EtcdError(f"{url}: HTTP {status}: {raw[:200]!r}")
                continue
            self._current = index
            try:
                answer = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                raise EtcdError(f"{url}: not JSON: {raw[:200]!r}") from None
            if status >= 400 or not isinstance(answer, dict):
                raise EtcdError(f"{url}: HTTP {status}: {raw[:200]!r}")
            return answer
        raise EtcdUnavailable(_describe(last)) from last

    async def range_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """Every key under ``prefix``, and the store's revision at that moment."""
        answer = await self._call(
            "/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_range_end(prefix))}
        )
        revision = _int(answer.get("header", {}).get("revision"))
        kvs = [
            KeyValue(
                _unb64(kv.get("key")).decode(errors="replace"),
                _unb64(kv.get("value")),
                _int(kv.get("mod_revision")),
                _int(kv.get("lease")),
            )
            for kv in answer.get("kvs", ())
        ]
        return revision, kvs

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write ``key``; returns the revision of the write."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        answer = await self._call("/kv/put", body)
        return _int(answer.get("header", {}).get("revision"))

    async def delete(self, key: str) -> int:
        """Delete ``key``; returns how many keys went (0 or 1)."""
        answer = await self._call("/kv/deleterange", {"key": _b64(key)})
        return _int(answer.get("deleted"))

    async def grant(self, ttl: int) -> Lease:
        answer = await self._call("/lease/grant", {"TTL": str(ttl)})
        if answer.get("error"):
            raise EtcdError(f"lease grant refused: {answer['error']}")
        return Lease(_int(answer.get("ID")), _int(answer.get("TTL")))

    async def keepalive(self, lease_id: int) -> int:
        """Refresh the lease; its TTL now, 0 when it has expired (or never existed)."""
        answer = await self._call("/lease/keepalive", {"ID": str(lease_id)})
        result = answer.get("result", answer)
        return _int(result.get("TTL")) if isinstance(result, dict) else 0

    async def revoke(self, lease_id: int) -> None:
        await self._call("/lease/revoke", {"ID": str(lease_id)})

    async def compact(self, revision: int) -> None:
        """Drop the history before ``revision``: a watch from an older one is refused."""
        await self._call("/kv/compaction", {"revision": str(revision), "physical": True})

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """The changes under ``prefix`` from ``start_revision`` on, a batch per etcd message.

        Ends (or raises :class:`EtcdUnavailable`) when the connection to etcd is lost; raises
        :class:`WatchCompacted` when ``start_revision`` is gone. The caller lists again in
        either case, so a missed event is never missed for good.
        """
        body = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": _b64(prefix_range_end(prefix)),
                "start_revision": str(start_revision),
            }
        }
        url = self.endpoint + API + "/watch"
        try:
            async with self._http().post(url, data=msgspec.json.encode(body)) as resp:
                if resp.status != 200:
                    raise EtcdUnavailable(f"{url}: HTTP {resp.status}")
                async for message in _json_lines(resp):
                    batch = _watch_batch(message)
                    if batch:
                        yield batch
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise EtcdUnavailable(_describe(exc)) from exc


async def _json_lines(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The gateway's stream: one JSON object per line."""
    buffer = b""
    async for chunk in resp.content.iter_any():
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line, buffer = buffer[:end].strip(), buffer[end + 1 :]
            if line:
                message = msgspec.json.decode(line)
                if isinstance(message, dict):
                    yield message


def _watch_batch(message: dict[str, Any]) -> list[WatchEvent]:
    if "error" in message:
        raise EtcdUnavailable(f"watch failed: {message['error']}")
    result = message.get("result", {})
    compacted = _int(result.get("compact_revision"))
    if compacted:
        raise WatchCompacted(compacted)
    if result.get("canceled"):
        raise EtcdUnavailable(f"watch cancelled: {result.get('cancel_reason', '')}")
    events = []
    for event in result.get("events", ()):
        kv = event.get("kv", {})
        key = _unb64(kv.get("key")).decode(errors="replace")
        revision = _int(kv.get("mod_revision"))
        if event.get("type") == "DELETE":
            events.append(WatchEvent(key, None, revision))
        else:
            events.append(WatchEvent(key, _unb64(kv.get("value")), revision))
    return events


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no endpoint"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
