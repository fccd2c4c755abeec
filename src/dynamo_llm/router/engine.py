"""The router as an engine: each request goes to one worker of its model (SPEC §8).

:class:`Router` implements the engine protocol, so the HTTP layer treats a fleet of remote
workers exactly like an in-process engine. Per request it:

1. chooses a worker with the routing policy over a snapshot of the model's workers, on the
   request's route key, and takes its in-flight slot in the same step (:mod:`.choice`);
2. runs one :class:`~.attempt.Attempt` on it: the request is opened on the worker under an
   attempt context linked to the request's, its outputs are relayed under the attempt's
   watchdog, and the outcome is reported (a quarantining fault takes the worker out of
   rotation; a clean end resets its failure count). A dispatch that could not connect (refused,
   or the worker left the set meanwhile) is tried on another worker whatever the migration
   limit: nothing was generated, so it is not a migration;
3. for a request that may migrate (``DYN_MIGRATION_LIMIT``, :mod:`.migration`), reads the
   attempt's outputs through a :class:`~.migration.MigrationState` and, when the attempt fails
   with a migratable error (a worker gone silent included), continues the request on another
   worker with the replay. ``model_migration_total`` counts a ``new_request`` when nothing was
   generated yet and an ``ongoing_request`` otherwise; each migration keeps the request's
   context alive (``keep_alive()``), so the HTTP layer's net does not fire before the new
   attempt's own limits. A request continued as text whose first worker never said the
   prompt's size gets it from a 1-token request before its usage goes out (:mod:`.migration`).

Whatever the attempt holds (the in-flight slot, the attempt context's link, the upstream
connection) is given back by the attempt, exactly once, whichever way it ends.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, ClassVar

from ..engines.base import (
    EngineOutput,
    EngineRequest,
    OwnedStream,
    check_context_length,
)
from ..errors import (
    AllWorkersBusy,
    Cancelled,
    DynamoError,
    NoWorkersAvailable,
    WorkerUnreachable,
)
from ..metrics import Metrics
from ..runtime.clock import Clock
from ..runtime.context import EngineContext
from .attempt import Attempt, AttemptLimits
from .choice import KvPredictor, RouteKey, acquire_worker, route_key
from .membership import Worker, WorkerSet
from .migration import MigrationState, migration_budget
from .policies import RoutingPolicy

if TYPE_CHECKING:
    from ..transport import WorkerClient

log = logging.getLogger("dynamo_llm.router")


PromptTokenizer = Callable[[EngineRequest], Awaitable[list[int] | None]]
"""The request's prompt token ids as its model's engine computes them, or None (unknown)."""


class _CurrentAttempt:
    """The attempt a migrating request is reading; closing it gives back what it holds."""

    __slots__ = ("stream", "worker")

    def __init__(self, worker: Worker, stream: OwnedStream) -> None:
        self.worker = worker
        self.stream = stream

    async def aclose(self) -> None:
        await self.stream.aclose()


class _Observer:
    """What the router adds to a request's outputs as they pass (an attempt's relay, a
    migration's loop): the prompt's size (the frontend's count) on its first output with a
    token when the worker put none on it or before, so ``input_sequence_tokens`` is recorded
    once, at the first token, whether the worker reports usage or not (an output without
    tokens, a relayed chat's role chunk, is not recorded as the first token); and, for a
    precise prediction (given ``metrics``), the count of the cached tokens the engine reports."""

    __slots__ = ("_metrics", "_prompt_tokens")

    def __init__(self, prompt_tokens: int | None, metrics: Metrics | None) -> None:
        self._prompt_tokens = prompt_tokens
        self._metrics = metrics

    def __call__(self, out: EngineOutput) -> None:
        prompt_tokens = self._prompt_tokens
        if prompt_tokens is not None:
            if out.prompt_tokens is not None:
                self._prompt_tokens = None
            elif out.num_tokens > 0:
                self._prompt_tokens = None
                out.prompt_tokens = prompt_tokens
        metrics = self._metrics
        if metrics is not None:
            usage = out.usage
            if usage is not None and usage.cached_tokens:
                metrics.router_kv_reported_cached_tokens_total.labels().inc(usage.cached_tokens)


class Router:
    """An engine that serves every model of a :class:`WorkerSet` through its workers.

    It passes each request on as the client's JSON, so fields the frontend does not know reach
    the worker (``forwards_unknown_fields``).
    """

    forwards_unknown_fields: ClassVar[bool] = True

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
        self.kv_predictor: KvPredictor | None = None
        """Set by the fleet when workers' KV events are followed (``kv`` mode)."""
        self.prompt_ids: PromptTokenizer | None = None
        """Set by the fleet when a model has a tokenizer (``--tokenizer``)."""
        self.context_length: Callable[[str], int | None] = _unknown
        """A model's context window, where known: checked before dispatch against the ids."""
        self._closed = False

    async def generate(
        self, request: EngineRequest, ctx: EngineContext
    ) -> AsyncIterator[EngineOutput]:
        ids = await self.prompt_ids(request) if self.prompt_ids is not None else None
        if ids is not None:
            check_context_length(
                request.endpoint, len(ids), request.max_tokens, self.context_length(request.model)
            )
        key = await route_key(request, ids, self.policy, self.workers, self.kv_predictor)
        exclude: set[str] = set()
        budget = migration_budget(request, self.migration_limit)
        prompt_tokens = None if ids is None else len(ids)
        if not budget:
            _worker, stream = await self._attempt(
                request, ctx, key, exclude, prompt_tokens=prompt_tokens, count_reported=True
            )
            return stream
        state = MigrationState(request, budget)
        current = _CurrentAttempt(*await self._dispatch(state, request, ctx, key, exclude))
        stamp = None if prompt_tokens is None else _Observer(prompt_tokens, None)
        migrated = self._migrate(state, ctx, key, exclude, current, stamp=stamp)
        return OwnedStream(migrated, current.aclose)

    async def _dispatch(
        self,
        state: MigrationState,
        request: EngineRequest,
        ctx: EngineContext,
        key: RouteKey,
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
                    request,
                    ctx,
                    key,
                    exclude,
                    migrating=True,
                    replay=request is not state.request,
                    migration_type=migration_type,
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
        key: RouteKey,
        exclude: set[str],
        current: _CurrentAttempt,
        *,
        stamp: _Observer | None,
    ) -> AsyncGenerator[EngineOutput, None]:
        def observe(item: EngineOutput) -> EngineOutput:
            out = state.observe(item)
            if stamp is not None:
                stamp(out)
            return out

        try:
            while True:
                try:
                    last: EngineOutput | None = None
                    async for item in current.stream:
                        if item.usage is not None and state.lacks_prompt_count:
                            last = item  # the usage comes last: the stream ends after it
                            continue
                        yield observe(item)
                    if last is not None:
                        # Counted once the replay's attempt is over, so its silence limit
                        # cannot fire while the count runs.
                        await self._count_prompt(state, ctx, key, exclude)
                        yield observe(last)
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
                    # Nothing generated yet (a worker silent before its first token): the
                    # request starts over elsewhere, a new request as far as the count goes.
                    kind = "ongoing_request" if state.generated else "new_request"
                    current.worker, current.stream = await self._dispatch(
                        state, replay, ctx, key, exclude, migration_type=kind, cause=exc
                    )
        finally:
            await current.aclose()

    async def _count_prompt(
        self, state: MigrationState, ctx: EngineContext, key: RouteKey, exclude: set[str]
    ) -> None:
        """Ask a worker for the original prompt's size when the replay's usage needs it and the
        first attempt never said it (see :mod:`.migration`); on failure it stays unknown."""
        request = state.prompt_count_request()
        if request is None:
            return
        try:
            _worker, stream = await self._attempt(request, ctx, key, set(exclude))
            try:
                async for out in stream:
                    if out.usage is not None and out.usage.prompt_tokens is not None:
                        state.count_prompt(out.usage.prompt_tokens)
            finally:
                await stream.aclose()
        except DynamoError as exc:
            log.info(
                "request %s: the prompt could not be counted (%s); its usage leaves it out",
                request.id,
                exc.code,
            )

    async def _attempt(
        self,
        request: EngineRequest,
        ctx: EngineContext,
        key: RouteKey,
        exclude: set[str],
        *,
        migrating: bool = False,
        replay: bool = False,
        migration_type: str | None = None,
        prompt_tokens: int | None = None,
        count_reported: bool = False,
    ) -> tuple[Worker, OwnedStream]:
        """One attempt on one worker; the worker is added to ``exclude`` if opening fails.

        ``prompt_tokens`` (the frontend's count) and ``count_reported`` (count the cached
        tokens the engine reports where a precise prediction chose the worker) are seen to by
        an :class:`_Observer` of the attempt's outputs.

        A dispatch whose connection could not even be made (:class:`WorkerUnreachable`: the
        connection was refused or timed out) is tried on another worker whatever the migration
        limit says: nothing was sent, so nothing was generated, and it is not a migration. With
        no other worker left the client gets that first failure.
        """
        refused: WorkerUnreachable | None = None
        while True:
            try:
                worker, slot = acquire_worker(
                    self.workers, self.policy, request, key, exclude, metrics=self.metrics
                )
            except (NoWorkersAvailable, AllWorkersBusy) as exc:
                if refused is not None:
                    raise refused from exc
                raise
            if migration_type is not None:
                # Counted once a worker took the replay: a migration actually attempted.
                if self.metrics is not None:
                    self.metrics.model_migration_total.labels(request.model, migration_type).inc()
                migration_type = None
                # The request is alive though nothing reached the client for a while: the HTTP
                # layer's silence limits start over, so that the new attempt's own limits (the
                # same length as the old one's) fire first.
                ctx.keep_alive()
            reported = count_reported and key.predicted(worker.id) is not None
            attempt = Attempt(
                worker,
                slot,
                ctx,
                workers=self.workers,
                clock=self.clock,
                limits=self.limits,
                metrics=self.metrics,
                observe=(
                    _Observer(prompt_tokens, self.metrics if reported else None)
                    if prompt_tokens is not None or reported
                    else None
                ),
            )
            try:
                stream = await attempt.open(
                    self.client, request, migrating=migrating, replay=replay
                )
            except DynamoError as exc:
                exclude.add(worker.id)
                if isinstance(exc, WorkerUnreachable) and not ctx.is_stopped:
                    # Refused, or the worker left the set while we were connecting: the
                    # attempt has reported it down; choose another.
                    log.info(
                        "request %s: could not connect to %s (%s); trying another worker",
                        request.id,
                        worker.id,
                        exc.message,
                    )
                    refused = refused or exc
                    continue
                raise
            return worker, stream

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self.workers.aclose()


def _unknown(model: str) -> int | None:
    return None
