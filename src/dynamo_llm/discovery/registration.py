"""Registration: one worker's key in etcd, held under a lease for as long as it should get work.

:meth:`Registration.start` grants a lease of ``ttl`` seconds, writes the worker's
:class:`~.instance.Instance` under ``v1/instances/<namespace>/backend/generate/<lease id>``
bound to it, and keeps the lease alive at a third of the TTL (as Dynamo does), so a worker that
dies leaves etcd within one TTL. When etcd cannot be reached the worker keeps serving and tries
again; when etcd says the lease is gone (it expired while etcd was unreachable, or etcd lost
its data) the worker registers again under a new lease, which the frontends' watch sees as a
new instance.

:meth:`Registration.withdraw` deletes the key first and then revokes the lease, so frontends
stop choosing the worker at once; a worker shutting down withdraws *before* it drains.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..runtime.clock import Clock
from ..runtime.tasks import cancel_and_wait
from .etcd_client import EtcdClient, EtcdError
from .instance import Instance, instance_key

__all__ = ["Registration"]

log = logging.getLogger("dynamo_llm.discovery")

RETRY_INITIAL = 0.25


class Registration:
    """Holds one instance key under a lease while started; ``describe(id)`` is its value."""

    def __init__(
        self,
        client: EtcdClient,
        namespace: str,
        describe: Callable[[str], Instance],
        *,
        ttl: int,
        clock: Clock,
    ) -> None:
        if ttl < 1:
            raise ValueError("the lease TTL must be at least 1 s")
        self._client = client
        self._namespace = namespace
        self._describe = describe
        self._ttl = ttl
        self._clock = clock
        self._lease: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._registered = asyncio.Event()

    @property
    def instance_id(self) -> str | None:
        """The id the worker is registered under now (the lease id in hex), None when not."""
        return None if self._lease is None else f"{self._lease:x}"

    @property
    def key(self) -> str | None:
        iid = self.instance_id
        return None if iid is None else instance_key(self._namespace, iid)

    async def wait_registered(self) -> None:
        await self._registered.wait()

    def start(self) -> None:
        """Register (retrying until etcd answers) and keep the lease alive, in a task."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="etcd registration"
            )

    async def withdraw(self) -> None:
        """Stop keeping the lease; delete the key, then revoke the lease (each best effort)."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        lease, key = self._lease, self.key
        self._lease = None
        self._registered.clear()
        if lease is None or key is None:
            return
        try:
            await self._client.delete(key)
            log.info("withdrew instance %x from etcd (key %s)", lease, key)
        except EtcdError as exc:
            log.warning("could not delete %s from etcd (%s); its lease will expire", key, exc)
        try:
            await self._client.revoke(lease)
        except EtcdError as exc:
            log.debug("could not revoke lease %x: %s", lease, exc)

    async def aclose(self) -> None:
        """Withdraw, and close the etcd client."""
        try:
            await self.withdraw()
        finally:
            await self._client.aclose()

    async def _run(self) -> None:
        interval = self._ttl / 3
        retry = RETRY_INITIAL
        failing = False
        while True:
            if self._lease is None:
                try:
                    await self._register()
                except EtcdError as exc:
                    if not failing:
                        log.warning("cannot register in etcd yet (%s); retrying", exc)
                    failing = True
                    await self._clock.sleep(retry)
                    retry = min(retry * 2, interval)
                    continue
                failing, retry = False, RETRY_INITIAL
            await self._clock.sleep(interval)
            try:
                left = await self._client.keepalive(self._lease or 0)
            except EtcdError as exc:
                if not failing:
                    log.warning("cannot refresh the etcd lease (%s); still serving", exc)
                failing = True
                continue
            if failing:
                log.info("etcd reachable again")
                failing = False
            if left <= 0:
                log.warning("etcd lease %x expired; registering again", self._lease or 0)
                self._lease = None
                self._registered.clear()

    async def _register(self) -> None:
        lease = await self._client.grant(self._ttl)
        iid = f"{lease.id:x}"
        instance = self._describe(iid)
        key = instance_key(self._namespace, iid)
        await self._client.put(key, instance.encode(), lease=lease.id)
        self._lease = lease.id
        self._registered.set()
        log.info(
            "registered in etcd as instance %s (%s, models %s, lease TTL %d s)",
            iid,
            instance.url,
            ", ".join(instance.models) or "none",
            lease.ttl,
        )
