"""etcd discovery: the frontend's worker set follows the keys workers hold in etcd.

Workers register under ``v1/instances/<namespace>/backend/generate/`` (:mod:`.registration`,
:mod:`.instance`). The frontend **lists** that prefix, reconciles its worker set with what it
found, and **watches** from the list's revision on, applying each put and delete as it comes:
a worker whose key is deleted (it withdrew) or whose lease expired (it died) leaves routing at
once; requests already on it finish or fail as they would anyway.

The watch can miss nothing for good. When it breaks (etcd restarted, the connection dropped),
or its revision was compacted, the frontend lists again and reconciles **by instance id**: an
instance that is no longer listed is dropped even though its delete event was never seen, and
one listed but unknown is added. Beside a live watch it lists and reconciles every
``reconcile_interval`` (10 s) too, so a watch that went silent without breaking (a hung etcd,
a partition that drops packets) is found out and repaired within that.

While etcd cannot be reached the frontend keeps routing to the last set it knew, says so in its
log and in ``/health`` (``discovery.state: unreachable``), and tries again with a back-off
(0.25 s doubling to ``retry_max``).

Several instances may name the same URL (a worker restarted before its old lease expired): the
worker (known by its URL, as with static discovery) serves the union of their models and leaves
the set when the last of them goes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping

from ..protocols.models import OURS
from ..router import Worker, WorkerSet
from ..router.kv_blocks import KvEventSource
from ..runtime.clock import Clock
from ..runtime.tasks import cancel_and_wait
from ..runtime.urls import redact_url
from .base import ModelsCallback, ModelsPublisher
from .etcd_client import EtcdClient, EtcdError, KeyValue, WatchCompacted, WatchEvent
from .instance import Instance, decode_instance, instances_prefix
from .static import normalise_url

__all__ = ["EtcdDiscovery"]

log = logging.getLogger("dynamo_llm.discovery")

RETRY_INITIAL = 0.25
RETRY_MAX = 5.0
RECONCILE_INTERVAL = 10.0


class EtcdDiscovery:
    """Keeps a :class:`WorkerSet` equal to the instances registered in etcd (see the module)."""

    def __init__(
        self,
        workers: WorkerSet,
        client: EtcdClient,
        namespace: str,
        clock: Clock,
        *,
        on_models: ModelsCallback | None = None,
        retry_max: float = RETRY_MAX,
        reconcile_interval: float = RECONCILE_INTERVAL,
    ) -> None:
        self.workers = workers
        self.client = client
        self.namespace = namespace
        self.prefix = instances_prefix(namespace)
        self._clock = clock
        self._retry_max = retry_max
        self._reconcile_interval = reconcile_interval
        self.instances: dict[str, Instance] = {}
        self._models = ModelsPublisher(workers, on_models)
        self._connected = False
        self._ever_connected = False
        self._error: str | None = None
        self._warned = False  # the loss of etcd was logged (once per outage)
        self._revision = 0
        self._task: asyncio.Task[None] | None = None
        self.resyncs = 0
        """How many times the prefix was listed and reconciled (for tests and the log)."""

    # --- the Discovery interface ---------------------------------------------------------------

    def models(self) -> frozenset[str]:
        return self._models.models

    def pending(self) -> list[str]:
        return [] if self._ever_connected else [f"etcd at {redact_url(self.client.endpoint)}"]

    def status(self) -> Mapping[str, object]:
        return {
            "backend": "etcd",
            "state": "connected" if self._connected else "unreachable",
            "endpoint": redact_url(self.client.endpoint),
            "namespace": self.namespace,
            "instances": len(self.instances),
            **({"error": self._error} if self._error and not self._connected else {}),
        }

    @property
    def connected(self) -> bool:
        return self._connected

    async def start(self) -> None:
        """List once (a failure is logged, not raised: the watch task keeps trying)."""
        try:
            await self._resync()
        except EtcdError as exc:
            self._lost(exc)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="etcd discovery")

    async def aclose(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        await self.client.aclose()

    # --- list, watch, reconcile ---------------------------------------------------------------

    async def _run(self) -> None:
        retry = RETRY_INITIAL
        while True:
            if not self._connected:
                try:
                    await self._resync()
                except EtcdError as exc:
                    self._lost(exc)
                    await self._clock.sleep(retry)
                    retry = min(retry * 2, self._retry_max)
                    continue
            retry = RETRY_INITIAL
            try:
                await self._watch_and_check()
            except WatchCompacted as exc:
                log.warning("etcd watch: %s; listing again", exc)
                self._connected = False
                continue
            except EtcdError as exc:
                self._lost(exc)
            await self._clock.sleep(RETRY_INITIAL)

    async def _watch_and_check(self) -> None:
        """Apply the watch's events and, beside them, list and reconcile every
        ``reconcile_interval``; returns or raises as soon as either ends."""
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(self._watch(), name="etcd watch"),
            loop.create_task(self._check(), name="etcd reconcile"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                await cancel_and_wait(task)
        for task in done:
            task.result()  # raises the EtcdError that ended it

    async def _watch(self) -> None:
        async for batch in self.client.watch(self.prefix, self._revision + 1):
            self._apply(batch)
        raise EtcdError("the watch stream ended")

    async def _check(self) -> None:
        # A watch that went silent (etcd hung, a partition that drops packets rather than
        # connections) would otherwise look connected for good; a listing bounds that, and
        # repairs anything the watch missed, within one interval.
        while True:
            await self._clock.sleep(self._reconcile_interval)
            await self._resync()

    async def _resync(self) -> None:
        revision, kvs = await self.client.range_prefix(self.prefix)
        self.resyncs += 1
        self._reconcile(kvs)
        self._revision = revision
        was = self._connected
        self._connected = True
        self._warned = False
        self._error = None
        if not was:
            log.info(
                "etcd %s: %d instance(s) under %s at revision %d%s",
                redact_url(self.client.endpoint),
                len(self.instances),
                self.prefix,
                revision,
                " (reconnected)" if self._ever_connected else "",
            )
        self._ever_connected = True

    def _lost(self, exc: BaseException) -> None:
        self._error = str(exc) or type(exc).__name__
        if not self._warned:
            self._warned = True
            log.warning(
                "etcd unreachable (%s); routing to the last known %d worker(s), retrying",
                self._error,
                len(self.workers),
            )
        self._connected = False

    def _reconcile(self, kvs: Iterable[KeyValue]) -> None:
        found: dict[str, Instance] = {}
        for kv in kvs:
            instance = self._decode(kv.key, kv.value)
            if instance is not None:
                found[kv.key.removeprefix(self.prefix)] = instance
        for iid in set(self.instances) - set(found):
            log.info("instance %s is no longer registered", iid)
            self._drop(iid)
        for iid, instance in found.items():
            if self.instances.get(iid) != instance:
                self._put(iid, instance)
        self._publish()

    def _apply(self, batch: list[WatchEvent]) -> None:
        for event in batch:
            iid = event.key.removeprefix(self.prefix)
            self._revision = max(self._revision, event.revision)
            if event.value is None:
                log.info("instance %s withdrew or its lease expired", iid)
                self._drop(iid)
            else:
                instance = self._decode(event.key, event.value)
                if instance is not None:
                    self._put(iid, instance)
        self._publish()

    def _decode(self, key: str, value: bytes) -> Instance | None:
        try:
            return decode_instance(value)
        except ValueError as exc:
            log.warning("etcd key %s: %s; ignored", key, exc)
            return None

    def _put(self, iid: str, instance: Instance) -> None:
        old = self.instances.get(iid)
        self.instances[iid] = instance
        if old is not None and normalise_url(old.url) != normalise_url(instance.url):
            self._refresh(normalise_url(old.url))
        self._refresh(normalise_url(instance.url))

    def _drop(self, iid: str) -> None:
        instance = self.instances.pop(iid, None)
        if instance is not None:
            self._refresh(normalise_url(instance.url))

    def _refresh(self, url: str) -> None:
        """Make the worker at ``url`` match the instances that name it."""
        mine = [i for i in self.instances.values() if normalise_url(i.url) == url]
        if not mine:
            self.workers.remove(redact_url(url))
            return
        models = frozenset(m for i in mine for m in i.models)
        owners = {i.owned_by for i in mine}
        owner = OURS if OURS in owners else owners.pop() if len(owners) == 1 else ""
        worker = self.workers.add(Worker(url, models, owner=owner))
        worker.instance_ids = tuple(sorted(iid for iid, i in self.instances.items() if i in mine))
        metrics = next((i.metrics_url for i in mine if i.metrics_url), None)
        worker.metrics_url = metrics
        lengths = [i.context_length for i in mine if i.context_length]
        worker.context_length = min(lengths) if lengths else None
        events = next((i for i in mine if i.kv_events_endpoint), None)
        worker.kv_events = (
            KvEventSource(
                events.kv_events_endpoint, events.kv_events_replay_endpoint, events.kv_block_size
            )
            if events is not None and events.kv_events_endpoint
            else None
        )

    def _publish(self) -> None:
        self._models.publish()
