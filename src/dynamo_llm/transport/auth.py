"""Per-worker API keys: the ``Authorization`` a request to one worker carries.

``--upstream-api-key`` goes to every worker: it is the aiohttp session's default header
(:func:`~.client.make_session`), which the generation pool copies (:class:`~.pool.Pool`). A
worker of ``--upstream-file`` may have a key of its own; :class:`WorkerKeys` holds those, by
worker base URL, and a request to a URL under one of them carries ``Authorization: Bearer <key>``
instead: a generation request through :meth:`~.pool.Pool.request_head`, which asks
:meth:`WorkerKeys.key_for` (remembered per URL), and everything the session sends (probes, model
lists, graceful stops, scrapes) through :meth:`WorkerKeys.middleware`, an aiohttp client
middleware. Discovery replaces the whole table whenever the file is reloaded. With no
per-worker key either costs one emptiness check. A key is never shown: :class:`WorkerKeys` has
no ``repr`` of its contents.
"""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp
from aiohttp import hdrs
from yarl import URL

__all__ = ["WorkerKeys"]


class WorkerKeys:
    """The keys of the workers that have their own, by base URL (no credentials, no slash at
    the end); a request goes to a worker when its URL is the base URL or under it."""

    __slots__ = ("_found", "_keys")

    def __init__(self, keys: Mapping[str, str] | None = None) -> None:
        self._keys: dict[str, str] = {}
        self._found: dict[str, str | None] = {}
        self.replace(keys or {})

    def __repr__(self) -> str:
        return f"WorkerKeys({len(self._keys)} worker(s))"

    def __len__(self) -> int:
        """How many workers have a key of their own (0: the middleware has nothing to do)."""
        return len(self._keys)

    def replace(self, keys: Mapping[str, str]) -> None:
        """Make ``keys`` the whole table (the previous one is dropped)."""
        # Spelled as aiohttp spells a request's URL (host lower-cased, default port dropped).
        self._keys = {str(URL(base)).rstrip("/"): key for base, key in keys.items()}
        self._found = {}

    def key_for(self, url: str) -> str | None:
        """The key of the worker ``url`` goes to (the longest base URL it is under), or None.

        Remembered per URL until the table is replaced: generation asks it on every request,
        for one of a few URLs per worker (its base and an endpoint's path).
        """
        if not self._keys:
            return None
        found = self._found
        try:
            return found[url]
        except KeyError:
            pass
        if len(found) >= MAX_REMEMBERED:
            found.clear()
        key = found[url] = self._lookup(url)
        return key

    def _lookup(self, url: str) -> str | None:
        under = [
            base
            for base in self._keys
            if url.startswith(base) and (len(url) == len(base) or url[len(base)] in "/?")
        ]
        return self._keys[max(under, key=len)] if under else None

    async def middleware(
        self, request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        if self._keys:
            # Not remembered: a stop's URL names its request.
            key = self._lookup(str(request.url))
            if key is not None:
                request.headers[hdrs.AUTHORIZATION] = f"Bearer {key}"
        return await handler(request)


MAX_REMEMBERED = 4096
"""How many URLs' keys :meth:`WorkerKeys.key_for` remembers before it starts over."""
