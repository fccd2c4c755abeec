"""``dynamo-llm register``: a sidecar that registers a third-party engine in etcd.

vLLM, SGLang and llama.cpp do not speak to etcd, so a sidecar does it for them::

    dynamo-llm register --upstream http://127.0.0.1:8001 --discovery-backend etcd

Every ``--register-probe-interval-secs`` it probes the engine as a frontend would before letting
a quarantined worker back (:mod:`dynamo_llm.transport.probe`: a 1-token completion, bounded by
``--worker-probe-timeout-secs``). While the probe passes, the engine is registered under a lease
(:class:`~dynamo_llm.discovery.registration.Registration`) with the model names its
``/v1/models`` lists when it registers (or ``--model-name``, a name the engine must accept);
the first probe that fails withdraws the key, so an engine that stops answering (crashed, hung,
SIGSTOPped) leaves every frontend's routing within about one probe timeout, and a probe that
passes again registers it again. On SIGTERM the sidecar withdraws the key and exits; the
engine is left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

from .config import Config
from .discovery.etcd_client import EtcdClient
from .discovery.instance import Instance
from .discovery.registration import Registration
from .discovery.static import normalise_url
from .errors import DynamoError
from .runtime.clock import Clock, SystemClock
from .runtime.urls import redact_url
from .transport import WorkerClient, make_session

__all__ = ["Sidecar", "run_sidecar"]

log = logging.getLogger("dynamo_llm.register")


class Sidecar:
    """Keeps one engine registered exactly while it passes its probe."""

    def __init__(self, config: Config, client: WorkerClient, url: str, clock: Clock) -> None:
        self.config = config
        self.client = client
        self.url = url
        self.clock = clock
        self.registration: Registration | None = None
        self._models: tuple[str, ...] = (config.model_name,) if config.model_name else ()
        self._owner = ""
        self._probe_path: str | None = None
        self._passing: bool | None = None

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self.step()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.config.register_probe_interval_secs)
        finally:
            await self.withdraw()

    async def step(self) -> None:
        """Probe once; register or withdraw accordingly."""
        ok = await self._probe()
        if ok and self.registration is None:
            self.registration = self._registration()
            self.registration.start()
        elif not ok:
            await self.withdraw()

    async def withdraw(self) -> None:
        if self.registration is not None:
            registration, self.registration = self.registration, None
            await registration.aclose()
        if not self.config.model_name:
            self._models = ()  # listed again before it next registers: it may have changed

    async def _probe(self) -> bool:
        within = self.config.worker_probe_timeout_secs
        if not self._models:
            try:
                models, self._owner = await self.client.list_models(self.url, within=within)
            except DynamoError as exc:
                self._report(False, f"cannot list its models: {exc.message}")
                return False
            self._models = tuple(models)
            if not self._models:
                self._report(False, "its /v1/models lists no model")
                return False
        result = await self.client.probe(
            self.url, within=within, model=self._models[0], first=self._probe_path
        )
        if result.path is not None:
            self._probe_path = result.path
        self._report(result.ok, result.summary)
        return result.ok

    def _report(self, ok: bool, summary: str) -> None:
        if ok != self._passing:
            log.log(
                logging.INFO if ok else logging.WARNING,
                "engine %s %s its probe (%s)%s",
                redact_url(self.url),
                "passes" if ok else "fails",
                summary,
                "; registering it" if ok else "; it is not registered",
            )
        self._passing = ok

    def _registration(self) -> Registration:
        config, url, models = self.config, self.url, self._models

        def describe(instance_id: str) -> Instance:
            return Instance(
                instance_id=instance_id,
                url=url,
                models=models,
                namespace=config.namespace,
                metrics_url=url + "/metrics",
                owned_by=self._owner or "engine",
            )

        return Registration(
            EtcdClient(config.etcd_endpoints),
            config.namespace,
            describe,
            ttl=config.discovery_lease_ttl_secs,
            clock=self.clock,
        )


async def run_sidecar(config: Config, stop: asyncio.Event) -> int:
    """``dynamo-llm register`` until ``stop`` is set; the exit code."""
    if config.discovery_backend != "etcd":
        print("dynamo-llm register: error: needs --discovery-backend etcd", file=sys.stderr)
        return 2
    if len(config.upstreams) != 1:
        print("dynamo-llm register: error: needs one --upstream URL", file=sys.stderr)
        return 2
    url = normalise_url(config.upstreams[0])
    session = make_session(config.worker_connect_timeout_secs, api_key=config.upstream_api_key)
    try:
        sidecar = Sidecar(config, WorkerClient(session), url, SystemClock())
        print(
            f"dynamo-llm register: watching {redact_url(url)} for etcd "
            f"{', '.join(config.etcd_endpoints)} (namespace {config.namespace})",
            file=sys.stderr,
            flush=True,
        )
        await sidecar.run(stop)
    finally:
        await session.close()
    return 0
