"""The test helper: a bad worker as a child process of the test, started, asked for its record,
killed and restarted on the same port."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from .behaviours import BEHAVIOURS, Options

__all__ = ["BadWorker", "spawn_bad_worker"]


class BadWorker:
    """A running bad worker process: its ``url``, ``proc``, record, and controls."""

    def __init__(self, options: Options, port: int = 0) -> None:
        self.options = options
        self.port = port
        self.url = ""
        self.proc: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self, *, ready_within: float = 30.0) -> None:
        # A bound, not a wait: a worker is ready in about a second, but a loaded 2-core CI
        # machine starting several Python processes at once has been seen to take over 10 s.
        o = self.options
        args = [
            sys.executable,
            "-m",
            "dynamo_llm.testing.bad_workers",
            "--behaviour",
            o.behaviour,
            "--port",
            str(self.port),
            "--tokens",
            str(o.tokens),
            "--gap",
            str(o.gap),
            "--model",
            o.model,
            "--owned-by",
            o.owned_by,
        ]
        if o.foreign_ids:
            args.append("--foreign-ids")
        self.proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(ready_within):
                line = await self.proc.stdout.readline()
        except BaseException:
            await self.kill()
            raise
        text = line.decode().strip()
        if not text.startswith("listening on "):
            await self.kill()
            raise RuntimeError(f"bad worker {o.behaviour} did not start: {text!r}")
        self.url = text.removeprefix("listening on ")
        self.port = int(self.url.rsplit(":", 1)[1])

    async def record(
        self, wait: str | None = None, *, arrived: str | None = None, within: float = 5.0
    ) -> dict[str, Any]:
        """``GET /_record``, after waiting (at most ``within`` s) for request ``wait`` to end or
        for request ``arrived`` to arrive."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        query = {"within": str(within)}
        if wait is not None:
            query["wait"] = wait
        if arrived is not None:
            query["arrived"] = arrived
        async with self._session.get(self.url + "/_record", params=query) as resp:
            resp.raise_for_status()
            result: dict[str, Any] = await resp.json()
            return result

    async def request_record(self, request_id: str, *, within: float = 5.0) -> dict[str, Any]:
        """The record of one request, once it has ended."""
        record = await self.record(request_id, within=within)
        for seen in record["requests"]:
            if seen["id"] == request_id:
                return dict(seen)
        raise LookupError(f"the worker never saw request {request_id}")

    async def kill(self) -> None:
        """SIGKILL the process (if it still runs) and reap it."""
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.communicate()

    async def restart(self) -> None:
        """Kill it if it runs, and start it again on the same port (the same URL)."""
        await self.kill()
        await self.start()

    async def aclose(self) -> None:
        try:
            await self.kill()
        finally:
            if self._session is not None:
                await self._session.close()
                self._session = None


@contextlib.asynccontextmanager
async def spawn_bad_worker(
    behaviour: str,
    *,
    tokens: int = 5,
    gap: float = 0.0,
    model: str = "bad-model",
    foreign_ids: bool = False,
    owned_by: str = "bad",
) -> AsyncIterator[BadWorker]:
    """Run a bad worker process for the body of the ``async with``; it is killed and reaped after.

    ::

        async with spawn_bad_worker("zombie", tokens=5) as worker:
            ...  # worker.url, await worker.record(), await worker.kill(), await worker.restart()
    """
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"unknown behaviour {behaviour!r}; one of {', '.join(BEHAVIOURS)}")
    worker = BadWorker(Options(behaviour, tokens, gap, model, foreign_ids, owned_by))
    await worker.start()
    try:
        yield worker
    finally:
        await worker.aclose()
