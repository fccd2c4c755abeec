"""The router as an engine: each request goes to one worker of its model (SPEC §8).

:class:`Router` implements the engine protocol, so the HTTP layer treats a fleet of remote
workers exactly like an in-process engine. Per request it:

1. chooses a worker with the routing policy over a snapshot of the model's workers (no worker
   available: 503 ``no_workers_available``; all at their in-flight limit: 503
   ``all_workers_busy``) and takes its in-flight slot in the same step, so the choice and the
   count agree; a worker that vanished between the two is re-chosen once;
2. opens the attempt on the worker through the :class:`~dynamo_llm.transport.WorkerClient`,
   under an *attempt context* linked to the request's, so a hang-up, a timeout or a shutdown
   reaches the worker as a closed connection (or a graceful stop, for our own workers);
3. relays the worker's outputs, timing the attempt with a :class:`~dynamo_llm.runtime.watchdog.
   Watchdog` at the raw ``DYN_HTTP_BACKEND_STREAM_TIMEOUT_SECS`` (the HTTP layer's net is twice
   that) and the first-token limit;
4. reports the outcome: a fault that quarantines (connect failure, dropped stream, stream ended
   without its terminal item, silence past the limit) takes the worker out of rotation; a clean
   end resets its failure count. Client cancellations, 4xx answers and slow-but-live streams
   never count against a worker.

The in-flight slot, the attempt context's link and the upstream connection are all released in
one ``finally``, whichever way the attempt ends.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..engines.base import EngineOutput, EngineRequest, OwnedStream, aclose_stream
from ..engines.echo import content_text
from ..errors import (
    AllWorkersBusy,
    Cancelled,
    DynamoError,
    NoWorkersAvailable,
    WorkerResponseTimeout,
    WorkerUnreachable,
)
from ..metrics import Metrics
from ..runtime.clock import Clock
from ..runtime.context import EngineContext
from ..runtime.watchdog import Watchdog
from .kv_index import block_hashes
from .migration import MigrationState, migration_budget
from .policies import RoutingPolicy
from .workers import InflightSlot, UnknownWorker, Worker, WorkerSet

if TYPE_CHECKING:
    from ..transport import WorkerClient

log = logging.getLogger("dynamo_llm.router")


@dataclass(frozen=True, slots=True)
class AttemptLimits:
    """Per-attempt time limits, in seconds (None: off)."""

    inactivity: float | None = None
    first_token: float | None = None


def prompt_text(request: EngineRequest) -> str:
    """The request's prompt as text, for prefix-aware routing."""
    if request.endpoint == "completions":
        prompt = request.prompt
        if isinstance(prompt, list):
            return " ".join(map(str, prompt))
        return prompt or ""
    messages = getattr(request.params, "messages", None) or []
    return "\n".join(
        f"{getattr(m, 'role', '')}: {content_text(getattr(m, 'content', None))}" for m in messages
    )


class _AttemptHold:
    """What one attempt holds, given back exactly once (by the relay's ``finally``, or by
    ``aclose()`` of a stream that was never iterated)."""

    __slots__ = ("_attempt", "_ctx", "_dog", "_released", "_slot", "_stream")

    def __init__(
        self,
        ctx: EngineContext,
        attempt: EngineContext,
        slot: InflightSlot,
        dog: Watchdog,
        stream: AsyncIterator[EngineOutput],
    ) -> None:
        self._ctx = ctx
        self._attempt = attempt
        self._slot = slot
        self._dog = dog
        self._stream = stream
        self._released = False

    async def release(self) -> None:
        if not self._released:
            self._released = True
            self._dog.cancel()
            self._slot.release()
            self._ctx.unlink_child(self._attempt)
            await aclose_stream(self._stream)


class _CurrentAttempt:
    """The attempt a migrating request is reading; closing it gives back what it holds."""

    __slots__ = ("stream", "worker")

    def __init__(self, worker: Worker, stream: OwnedStream) -> None:
        self.worker = worker
        self.stream = stream

    async def aclose(self) -> None:
        await self.stream.aclose()


class Router:
    """An engine that serves every model of a :class:`WorkerSet` through its workers."""

    def __init__(
        self,
        workers: WorkerSet,
        policy: RoutingPolicy,
        client: WorkerClient,
        clock: Clock,
        *,
        metrics: Metrics | None = None,
        limits: AttemptLimits | None = None,
        migration_limit: int = 0,
    ) -> None:
        self.workers = workers
        self.policy = policy
        self.client = client
        self.clock = clock
        self.metrics = metrics
        self.limits = limits or AttemptLimits()
        self.migration_limit = migration_limit
        self._closed = False

    def _acquire(
        self, request: EngineRequest, hashes: list[int], exclude: set[str]
    ) -> tuple[Worker, InflightSlot]:
        for _ in range(2):
            worker = self.workers.select(
                request.model,
                self.policy,
                exclude=tuple(exclude),
                hashes=hashes,
                direct_id=request.worker_id,
            )
            try:
                return worker, self.workers.acquire(worker.id, hashes=hashes)
            except UnknownWorker:
                exclude.add(worker.id)  # vanished since it was chosen: choose once more
        raise NoWorkersAvailable(f"No worker can serve the model `{request.model}`")

    async def generate(
        self, request: EngineRequest, ctx: EngineContext
    ) -> AsyncIterator[EngineOutput]:
        hashes = block_hashes(prompt_text(request)) if self.policy.uses_prefix else []
        exclude: set[str] = set()
        budget = migration_budget(request, self.migration_limit)
        if not budget:
            _worker, stream = await self._attempt(request, ctx, hashes, exclude)
            return stream
        state = MigrationState(request, budget)
        current = _CurrentAttempt(*await self._dispatch(state, request, ctx, hashes, exclude))
        return OwnedStream(self._migrate(state, ctx, hashes, exclude, current), current.aclose)

    async def _dispatch(
        self,
        state: MigrationState,
        request: EngineRequest,
        ctx: EngineContext,
        hashes: list[int],
        exclude: set[str],
        *,
        migration_type: str | None = None,
        cause: DynamoError | None = None,
    ) -> tuple[Worker, OwnedStream]:
        """Open an attempt of a migratable request; a failed dispatch is retried on another
        worker (a ``new_request`` migration) while the budget lasts."""
        while True:
            if ctx.is_stopped:
                raise Cancelled(f"Context id {ctx.id} is stopped or killed") from cause
            try:
                return await self._attempt(
                    request, ctx, hashes, exclude, migrating=True, migration_type=migration_type
                )
            except (NoWorkersAvailable, AllWorkersBusy) as exc:
                if cause is not None:
                    raise cause from exc  # nowhere to go: the client gets the failure itself
                raise
            except DynamoError as exc:
                if not exc.migratable or ctx.is_stopped or not state.take_retry():
                    raise
                log.info("request %s: dispatch failed (%s); migrating", request.id, exc.code)
                migration_type, cause = "new_request", exc

    async def _migrate(
        self,
        state: MigrationState,
        ctx: EngineContext,
        hashes: list[int],
        exclude: set[str],
        current: _CurrentAttempt,
    ) -> AsyncGenerator[EngineOutput, None]:
        observe = state.observe
        try:
            while True:
                try:
                    async for out in current.stream:
                        yield observe(out)
                    return
                except DynamoError as exc:
                    # The attempt has already reported its worker down and given back what it
                    # held (its relay's ``finally``); it must not be chosen again.
                    exclude.add(current.worker.id)
                    replay = state.next_replay() if exc.migratable and not ctx.is_stopped else None
                    if replay is None:
                        raise
                    log.info(
                        "request %s: stream from %s failed (%s) after %d tokens; migrating",
                        state.request.id,
                        current.worker.id,
                        exc.code,
                        state.generated,
                    )
                    await current.aclose()
                    current.worker, current.stream = await self._dispatch(
                        state,
                        replay,
                        ctx,
                        hashes,
                        exclude,
                        migration_type="ongoing_request",
                        cause=exc,
                    )
        finally:
            await current.aclose()

    async def _attempt(
        self,
        request: EngineRequest,
        ctx: EngineContext,
        hashes: list[int],
        exclude: set[str],
        *,
        migrating: bool = False,
        migration_type: str | None = None,
    ) -> tuple[Worker, OwnedStream]:
        """One attempt on one worker; the worker is added to ``exclude`` if opening fails."""
        while True:
            worker, slot = self._acquire(request, hashes, exclude)
            if migration_type is not None:
                # Counted once a worker took the replay: a migration actually attempted.
                if self.metrics is not None:
                    self.metrics.model_migration_total.labels(request.model, migration_type).inc()
                migration_type = None
            attempt = EngineContext(ctx.id)
            ctx.link_child(attempt)
            started = self.clock.now()
            # The attempt's clock starts at dispatch: a worker that never even sends its
            # headers is silent too, and must be quarantined by the inactivity limit alone.
            dog = Watchdog(
                self.clock,
                attempt,
                inactivity=self.limits.inactivity,
                first_token=self.limits.first_token,
                deadline=None,
                error=WorkerResponseTimeout,
            )
            dog.start()
            try:
                if migrating:
                    # Parsed outputs with token ids: what a replay needs, and what the frontend
                    # renders itself whichever worker or endpoint produced them.
                    stream = await self.client.open_stream(
                        worker.url,
                        request,
                        attempt,
                        first_token_timeout=self.limits.first_token,
                        is_ours=worker.is_ours,
                        track_tokens=True,
                        relay=False,
                    )
                else:
                    stream = await self.client.open_stream(
                        worker.url,
                        request,
                        attempt,
                        first_token_timeout=self.limits.first_token,
                        is_ours=worker.is_ours,
                    )
            except BaseException as exc:
                dog.cancel()
                slot.release()
                ctx.unlink_child(attempt)
                if dog.expired is not None:
                    # Our timer killed the attempt while it waited for the worker's headers.
                    self.workers.report_down(worker.id, dog.expired)
                    exclude.add(worker.id)
                    raise dog.expired from exc
                if isinstance(exc, DynamoError):
                    self.workers.report_down(worker.id, exc)
                    if (
                        isinstance(exc, WorkerUnreachable)
                        and worker.id not in self.workers
                        and worker.id not in exclude
                        and not ctx.is_stopped
                    ):
                        # The worker left the set while we were connecting: choose once more.
                        exclude.add(worker.id)
                        continue
                    exclude.add(worker.id)
                raise
            held = _AttemptHold(ctx, attempt, slot, dog, stream)
            relay = self._relay(stream, worker, attempt, dog, held.release, started=started)
            return worker, OwnedStream(relay, held.release)

    async def _relay(
        self,
        stream: AsyncIterator[EngineOutput],
        worker: Worker,
        attempt: EngineContext,
        dog: Watchdog,
        release: Callable[[], Awaitable[None]],
        *,
        started: float,
    ) -> AsyncGenerator[EngineOutput, None]:
        touch = dog.touch
        try:
            waiting_first = True
            async for out in stream:
                touch()
                if waiting_first and out.num_tokens > 0:
                    waiting_first = False
                    self._observe_ttft(worker, self.clock.now() - started)
                yield out
            if dog.expired is not None:
                raise dog.expired
            if not attempt.is_stopped:
                self.workers.report_ok(worker.id)
        except DynamoError as exc:
            error = dog.expired or exc
            self.workers.report_down(worker.id, error)
            if error is exc:
                raise
            raise error from exc
        finally:
            await release()

    def _observe_ttft(self, worker: Worker, seconds: float) -> None:
        worker.last_ttft = seconds
        if self.metrics is not None:
            self.metrics.worker_time_to_first_token_seconds.labels(worker.id).observe(seconds)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self.workers.aclose()
