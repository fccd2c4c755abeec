"""One attempt: a request dispatched to one chosen worker, timed, and its outcome reported.

The :class:`~.engine.Router` chooses the worker and takes its in-flight slot; an
:class:`Attempt` does the rest for that one worker:

1. it opens the request on the worker through the
   :class:`~dynamo_llm.transport.WorkerClient` under an *attempt context*, a child of the
   request's context, so a hang-up, a timeout or a shutdown reaches the worker as a closed
   connection (or a graceful stop, for our own workers), while the attempt's own limits end only
   the attempt. The attempt context is named by the attempt's *upstream id*, a fresh UUID4, which
   is the id the worker knows the attempt by: an id any engine accepts (``llama_cpp.server``
   refuses any other), never reused by a fan-out sibling or a migration's next attempt; the
   dispatch is logged (debug) with the client's id beside it;
2. it relays the worker's outputs, timing them with a :class:`~dynamo_llm.runtime.watchdog.
   Watchdog` at the raw ``DYN_HTTP_BACKEND_STREAM_TIMEOUT_SECS`` (the HTTP layer's net is twice
   that) and the first-token limit; the clock starts at dispatch, so a worker that never even
   sends its headers is silent too. Until its first item the attempt waits under the
   first-token limit (under the inactivity limit when there is none): that wait is the engine's
   queue and prefill, and a migration's replay prefills the prompt and everything generated so
   far, far longer than a pause between tokens. The verdict is a
   :class:`~dynamo_llm.errors.WorkerSilent`, which a migrating request survives like a dropped
   stream. A unary request to one of our own workers that does not migrate, while neither
   limit is set, is asked of the worker as unary and its answer is the one output
   (:meth:`~dynamo_llm.transport.WorkerClient.open_answer`): a whole answer has no events
   before its end to time, and its first token comes with it;
3. a streamed request to a worker whose events pack several tokens (:data:`PACKS_TOKENS`: vLLM)
   asks it for token ids too (``return_token_ids``), so that each relayed output counts the
   tokens it holds, not its events, and the time between two events is shared by their tokens
   (``inter_token_latency``) as it comes, not corrected from the usage at the end; the relay
   strips the ids from the bytes the client gets, unless it asked for them (then they are only
   counted);
4. it reports the outcome to the worker set: a fault that quarantines (connect failure, dropped
   stream, stream ended without its terminal item, silence past the limit; the watchdog's
   verdict wins over the error it caused) goes to ``report_down``; a clean end to
   ``report_ok``. Client cancellations, 4xx answers and slow-but-live streams never count
   against a worker.

What the attempt holds (the in-flight slot, the context's link, the watchdog's timer and the
upstream stream) is given back exactly once: at once when opening fails, otherwise by the relay's
``finally`` or by ``aclose()`` of a stream that was never iterated.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..engines.base import EngineOutput, EngineRequest, OwnedStream, aclose_stream
from ..errors import AllWorkersBusy, Cancelled, DynamoError, WorkerSilent
from ..metrics import Metrics
from ..runtime.clock import Clock
from ..runtime.context import EngineContext
from ..runtime.ids import new_request_id
from ..runtime.watchdog import Watchdog
from .membership import Worker, WorkerSet
from .replay_buffer import strip_token_ids
from .slot import InflightSlot

if TYPE_CHECKING:
    from ..transport import WorkerClient

__all__ = ["PACKS_TOKENS", "Attempt", "AttemptLimits"]

PACKS_TOKENS = frozenset({"vllm"})
"""The owners (``/v1/models``' ``owned_by``) whose stream events may each hold several tokens:
vLLM sends what it generated since its last event in one. The relay counts events, so a streamed
request to such a worker asks it for token ids and counts them (see :class:`Attempt`)."""

log = logging.getLogger("dynamo_llm.router")


@dataclass(frozen=True, slots=True)
class AttemptLimits:
    """Per-attempt time limits, in seconds (None: off)."""

    inactivity: float | None = None
    first_token: float | None = None


class Attempt:
    """One request on one worker, from its dispatch to the end of its stream."""

    __slots__ = (
        "_clock",
        "_ctx",
        "_dog",
        "_limits",
        "_metrics",
        "_observe",
        "_released",
        "_slot",
        "_started",
        "_stream",
        "_unpack",
        "_workers",
        "context",
        "upstream_id",
        "worker",
    )

    def __init__(
        self,
        worker: Worker,
        slot: InflightSlot[Worker],
        ctx: EngineContext,
        *,
        workers: WorkerSet,
        clock: Clock,
        limits: AttemptLimits,
        metrics: Metrics | None = None,
        observe: Callable[[EngineOutput], None] | None = None,
    ) -> None:
        """``observe`` sees (and may amend) each output before it is relayed."""
        self.worker = worker
        self.upstream_id = new_request_id()
        """The id the worker knows this attempt by (``X-Request-Id``, a graceful stop): the
        attempt context's own id."""
        self.context = EngineContext(self.upstream_id)
        self._ctx = ctx
        self._slot = slot
        self._workers = workers
        self._clock = clock
        self._limits = limits
        self._metrics = metrics
        self._observe = observe
        self._dog = Watchdog(
            clock,
            self.context,
            inactivity=limits.inactivity,
            first_token=limits.first_token,
            deadline=None,
            error=WorkerSilent,
        )
        self._stream: AsyncIterator[EngineOutput] | None = None
        self._unpack: str | None = None
        """Relayed bytes hold token ids: ``"strip"`` (count them and take them out) or
        ``"count"`` (the client asked for them too); None: they hold none to count."""
        self._started = 0.0
        self._released = False

    async def open(
        self,
        client: WorkerClient,
        request: EngineRequest,
        *,
        migrating: bool = False,
        replay: bool = False,
    ) -> OwnedStream:
        """Send ``request`` to the worker; the stream of its outputs once it answered.

        ``migrating``: the request may migrate, so its outputs must say what was generated
        (token ids, text). ``replay``: it is a migration's replay, whose outputs the frontend
        renders itself (it may run on another endpoint than the client's).

        When opening fails, everything is given back and the worker reported before the error
        propagates (the watchdog's :class:`WorkerSilent` in place of the error it caused).
        """
        worker, dog = self.worker, self._dog
        self._ctx.link_child(self.context)
        self._started = self._clock.now()
        dog.start()
        log.debug("request %s: to %s as upstream id %s", request.id, worker.id, self.upstream_id)
        try:
            # Migrating: token ids for a replay. The worker's own bytes still reach the client
            # while nothing has migrated (the migration state keeps them for a replay and strips
            # the ids the client did not ask for). A replay's outputs the frontend renders
            # itself, whichever worker or endpoint produced them.
            open_stream = functools.partial(
                client.open_stream,
                worker.url,
                request,
                self.context,
                first_token_timeout=self._limits.first_token,
                is_ours=worker.is_ours,
            )
            stream: AsyncIterator[EngineOutput]
            if migrating or replay:
                stream = await open_stream(track_tokens=True, relay=not replay)
            elif self._takes_whole(request):
                stream = await client.open_answer(
                    worker.url, request, self.context, is_ours=worker.is_ours
                )
            elif request.params.stream and worker.owner in PACKS_TOKENS:
                asked = request.params.return_token_ids
                self._unpack = "count" if asked else "strip"
                stream = await open_stream(track_tokens=not asked)
            else:
                stream = await open_stream()
        except BaseException as exc:
            self._give_back()
            if isinstance(exc, AllWorkersBusy):
                # The frontend's own connection bound (--worker-max-connections): the worker was
                # never asked, so neither its timers' verdict nor the wait is held against it.
                if self._ctx.is_stopped:
                    raise Cancelled(f"Context id {self._ctx.id} is stopped or killed") from exc
                raise
            if dog.expired is not None:
                # Our timer killed the attempt while it waited for the worker's headers.
                self._workers.report_down(worker.id, dog.expired)
                raise dog.expired from exc
            if isinstance(exc, DynamoError):
                self._workers.report_down(worker.id, exc)
            raise
        self._stream = stream
        return OwnedStream(self._relay(stream), self.aclose)

    def _takes_whole(self, request: EngineRequest) -> bool:
        """Whether a unary request's answer may come whole: from one of our own workers, and no
        silence limit times its events (a whole answer has none before its end, so a first-token
        or inactivity limit would cut a long but live generation and quarantine its worker)."""
        limits = self._limits
        return (
            # Only ours: real engines keep generating a unary answer after a client's hang-up.
            self.worker.is_ours
            and not request.params.stream
            and limits.inactivity is None
            and limits.first_token is None
        )

    async def aclose(self) -> None:
        """Give back what the attempt holds, and close the upstream stream. Idempotent."""
        if self._give_back() and self._stream is not None:
            await aclose_stream(self._stream)

    def _give_back(self) -> bool:
        if self._released:
            return False
        self._released = True
        self._dog.cancel()
        self._slot.release()
        self._ctx.unlink_child(self.context)
        return True

    async def _relay(
        self, stream: AsyncIterator[EngineOutput]
    ) -> AsyncGenerator[EngineOutput, None]:
        worker, dog, observe = self.worker, self._dog, self._observe
        now = self._clock.now
        unpack, strip = self._unpack is not None, self._unpack == "strip"
        try:
            waiting_first = True
            async for out in stream:
                t = dog.last_item = now()  # Watchdog.touch, inlined on the per-item path
                if unpack and out.raw:
                    stripped, extra = strip_token_ids(out.raw)
                    if out.token_ids is None:
                        # The relay counted events; the ids say how many tokens they held (a
                        # parsed output, the stream's first, counted its ids already).
                        out.num_tokens += extra
                    if strip:
                        out.raw = stripped
                if waiting_first and out.num_tokens > 0:
                    waiting_first = False
                    self._observe_ttft(t - self._started)
                if observe is not None:
                    observe(out)
                yield out
            if dog.expired is not None:
                raise dog.expired
            if not self.context.is_stopped:
                self._workers.report_ok(worker.id)
        except DynamoError as exc:
            error = dog.expired or exc
            self._workers.report_down(worker.id, error)
            if error is exc:
                raise
            raise error from exc
        finally:
            await self.aclose()

    def _observe_ttft(self, seconds: float) -> None:
        self.worker.last_ttft = seconds
        if self._metrics is not None:
            self._metrics.worker_time_to_first_token_seconds.labels(self.worker.id).observe(seconds)
