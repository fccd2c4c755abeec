"""A frontend in front of remote workers: the router, its workers, and their discovery.

``dynamo-llm serve --upstream URL`` (or ``--upstream-file PATH``, or ``--discovery-backend
etcd``) builds the same app as with an in-process engine, but its models are whatever the
workers serve, and each is served by the :class:`~dynamo_llm.router.engine.Router`.
:class:`Fleet` owns the pieces and their lifetime: the pooled HTTP session, the
:class:`~dynamo_llm.router.WorkerSet` (quarantine and probes), the discovery backend
(static, file or etcd, :mod:`dynamo_llm.discovery`); it starts and stops with the app. It
keeps the app's model list in line with discovery (a model appears once a worker serves it) and
``model_ready{model}`` in line with quarantine (1 while at least one of its workers is
available).

A model with a tokenizer (``--tokenizer [MODEL=]FOLDER``, :mod:`dynamo_llm.tokenization`) has
every request's prompt tokenized as its engine does, whatever the router mode: the ids are the
precise ``kv`` keys, are checked against the model's context window before dispatch
(``--context-length``, else the smallest its workers registered in etcd, the largest of those
over its workers: a request that fits one of them goes), and give ``input_sequence_tokens``. In
``kv`` mode a model without one is tokenized as the mocker workers do (a bare ``--tokenizer
tokenizer.json``, else the word tokenizer, and the mocker's ChatML template), for those workers'
KV events: so precise routing over mocker workers wants the workers' own ``tokenizer.json``
here, not a folder whose chat template the mocker does not apply.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from .config import Config
from .discovery.base import Discovery
from .discovery.etcd import EtcdDiscovery
from .discovery.etcd_client import EtcdClient
from .discovery.static import (
    StaticDiscovery,
    check_no_credentials,
    normalise_url,
    parse_upstream_file,
)
from .engines.base import EngineRequest
from .engines.mocker.prompt import prompt_of
from .engines.mocker.tokens import MockTokenizer, load_tokenizer
from .errors import DynamoError, InvalidRequest
from .http.app import App, ServedModel, create_app
from .metrics import Metrics
from .router import AttemptLimits, KvIndex, Router, RouterMode, RoutingPolicy, Worker, WorkerSet
from .router.kv_blocks import KvBlockIndex
from .router.kv_events import KvEventIntake
from .router.liveness import IdleChecker
from .router.policies import PreciseOverlap
from .router.scraper import EngineReport, LoadScraper
from .runtime.clock import Clock
from .runtime.tasks import Periodic
from .tokenization import ModelTokenizer
from .transport import WorkerClient, make_session
from .transport.auth import WorkerKeys
from .transport.scrape import scrape_engine_load

log = logging.getLogger("dynamo_llm.fleet")

MODELS_WITHIN = 5.0
KV_FOLLOW_INTERVAL = 0.5
"""How often the KV event subscribers are matched to the fleet (seconds)."""


class Fleet:
    """Everything between the app and the remote workers, started and stopped with the app."""

    def __init__(self, config: Config, app: App, clock: Clock, metrics: Metrics) -> None:
        self.config = config
        self.app = app
        self.clock = clock
        self.metrics = metrics
        self.kv_index = KvIndex()
        self.policy = RoutingPolicy(
            RouterMode(config.router_mode),
            kv_index=self.kv_index,
            overlap_weight=config.router_kv_overlap_score_weight,
            temperature=config.router_temperature,
        )
        self.workers = WorkerSet(
            clock=clock,
            probe=self._probe,
            metrics=metrics,
            max_inflight=config.max_inflight_per_worker,
            kv_index=self.kv_index,
        )
        self.worker_keys = WorkerKeys()
        """The keys of the workers of ``--upstream-file`` that have their own."""
        self._session: aiohttp.ClientSession | None = None
        self._client: WorkerClient | None = None
        self.router: Router | None = None
        self.discovery: Discovery | None = None
        self.idle_checker: IdleChecker | None = None
        self.scraper: LoadScraper | None = None
        # kv mode: the workers' own KV events, where they publish them (issue 13).
        self.kv_intake: KvEventIntake | None = None
        self._kv_follower: Periodic | None = None
        paths = config.tokenizer_paths
        for path in paths.values():
            if not Path(path).exists():
                raise ValueError(f"--tokenizer {path}: no such folder or file")
        self.tokenizers = {
            model: ModelTokenizer.load(path) for model, path in paths.items() if Path(path).is_dir()
        }
        """The model tokenizers by model (None: every model without its own)."""
        self._mocker_tokenizer: MockTokenizer | None = None
        if self.policy.mode is RouterMode.KV:
            self.kv_intake = KvEventIntake(KvBlockIndex(), metrics=metrics, clock=clock)
            files = [path for path in paths.values() if not Path(path).is_dir()]
            self._mocker_tokenizer = load_tokenizer(files[0] if files else None)
        self.workers.on_change(self._availability_changed)

    async def start(self) -> None:
        config = self.config
        self._session = make_session(
            config.worker_connect_timeout_secs,
            api_key=config.upstream_api_key,
            worker_keys=self.worker_keys,
        )
        self._client = WorkerClient(
            self._session, self.worker_keys, max_connections=config.worker_max_connections
        )
        self.router = Router(
            self.workers,
            self.policy,
            self._client,
            self.clock,
            metrics=self.metrics,
            limits=AttemptLimits(
                inactivity=config.backend_stream_timeout_secs,
                first_token=config.first_token_timeout_secs,
            ),
            migration_limit=config.migration_limit,
        )
        if config.discovery == "etcd":
            self.discovery = EtcdDiscovery(
                self.workers,
                EtcdClient(config.etcd_endpoints),
                config.namespace,
                self.clock,
                on_models=self._models_changed,
            )
        else:
            self.discovery = StaticDiscovery(
                self.workers,
                self._fetch_models,
                self.clock,
                urls=config.upstreams,
                path=config.upstream_file,
                on_models=self._models_changed,
                forbid_credentials=_UPSTREAM_KEY if config.upstream_api_key else None,
                on_api_keys=self.worker_keys.replace,
            )
        self.app.waiting_for = self.discovery.pending
        self.app.discovery = self.discovery.status
        await self.discovery.start()
        if self.tokenizers:
            self.router.prompt_ids = self._prompt_ids
            self.router.context_length = self._context_length
        if self.kv_intake is not None:
            self.router.kv_predictor = self._predict_kv
            self._kv_follower = Periodic(
                self._follow_kv_events,
                self.clock,
                KV_FOLLOW_INTERVAL,
                name="kv-events",
                immediately=True,
            )
            self._kv_follower.start()
        if config.worker_idle_probe_interval_secs:
            self.idle_checker = IdleChecker(
                self.workers, self._check_idle, self.clock, config.worker_idle_probe_interval_secs
            )
            self.idle_checker.start()
        if config.worker_metrics_interval_secs:
            self.scraper = LoadScraper(
                self.workers,
                self._scrape,
                self.clock,
                config.worker_metrics_interval_secs,
                metrics=self.metrics,
            )
            self.scraper.start()

    async def aclose(self) -> None:
        if self._kv_follower is not None:
            await self._kv_follower.aclose()
        if self.kv_intake is not None:
            await self.kv_intake.aclose()
        if self.scraper is not None:
            await self.scraper.aclose()
        if self.idle_checker is not None:
            await self.idle_checker.aclose()
        if self.discovery is not None:
            await self.discovery.aclose()
        if self.router is not None:
            await self.router.aclose()
        else:
            await self.workers.aclose()
        if self._client is not None:
            await self._client.aclose()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _follow_kv_events(self) -> None:
        assert self.kv_intake is not None
        await self.kv_intake.reconcile((w.id, w.kv_events) for w in self.workers)

    def _tokenizer_of(self, model: str) -> ModelTokenizer | None:
        tokenizers = self.tokenizers
        return tokenizers.get(model) or tokenizers.get(None)

    async def _prompt_ids(self, request: EngineRequest) -> list[int] | None:
        tokenizer = self._tokenizer_of(request.model)
        return None if tokenizer is None else await tokenizer.prompt_ids(request)

    def _context_length(self, model: str) -> int | None:
        if self.config.context_length is not None:
            return self.config.context_length
        lengths = [w.context_length for w in self.workers.workers_for(model)]
        if not lengths or None in lengths:
            return None
        return max(n for n in lengths if n is not None)

    async def _predict_kv(
        self, request: EngineRequest, token_ids: list[int] | None, worker_ids: Sequence[str]
    ) -> PreciseOverlap | None:
        """The request's token ids against the workers' KV events; None when no worker's
        events flow or the prompt does not tokenize.

        The ids are the model tokenizer's (``token_ids``); a model without one is tokenized as
        the mocker workers do, a long prompt without holding the loop (``aencode``).
        """
        assert self.kv_intake is not None
        if not self.kv_intake.precise_workers():
            return None
        if token_ids is None:
            tokenizer = self._mocker_tokenizer
            if tokenizer is None or self._tokenizer_of(request.model) is not None:
                return None  # the model's own tokenizer could not say: nothing to guess with
            try:
                prompt = prompt_of(tokenizer, request)
            except InvalidRequest:
                return None
            token_ids = await tokenizer.aencode(prompt) if isinstance(prompt, str) else prompt
        return self.kv_intake.predict(token_ids, worker_ids)

    async def _fetch_models(self, url: str) -> tuple[frozenset[str], str]:
        assert self._client is not None
        models, owner = await self._client.list_models(url, within=MODELS_WITHIN)
        return frozenset(models), owner

    async def _check_idle(self, worker: Worker) -> DynamoError | None:
        assert self._client is not None
        within = min(self.config.worker_probe_timeout_secs, MODELS_WITHIN)
        return await self._client.check_reachable(worker.url, within=within)

    async def _scrape(self, worker: Worker) -> EngineReport | None:
        assert self._session is not None
        url = worker.metrics_url or worker.url.rstrip("/") + "/metrics"
        within = self.config.worker_probe_timeout_secs
        return await scrape_engine_load(self._session, url, within=within)

    async def _probe(self, worker: Worker) -> bool:
        """Whether a quarantined (or suspect) worker generates again; see transport.probe."""
        if self._client is None:
            return False
        # Any model the worker serves will do: the probe asks its engine for one token.
        model = min(worker.models) if worker.models else None
        result = await self._client.probe(
            worker.url,
            within=self.config.worker_probe_timeout_secs,
            model=model,
            first=worker.probe_path,
        )
        if result.path is not None:
            worker.probe_path = result.path
        log.log(
            logging.INFO if result.ok else logging.WARNING,
            "probe of worker %s %s: %s",
            worker.id,
            "passed" if result.ok else "failed",
            result.summary,
        )
        return result.ok

    def _models_changed(self, models: frozenset[str]) -> None:
        assert self.router is not None
        for name in set(self.app.models) - models:
            log.info("model %s: no worker serves it any more", name)
            self.app.remove_model(name)
        for name in models - set(self.app.models):
            log.info("model %s: served by %d worker(s)", name, len(self.workers.workers_for(name)))
            self.app.add_model(self._served(name))
        self._availability_changed(models)

    def _served(self, name: str) -> ServedModel:
        assert self.router is not None
        workers = self.workers

        intake = self.kv_intake

        def describe() -> dict[str, Any]:
            described = [w.describe() for w in workers.workers_for(name)]
            if intake is not None:
                for w in described:
                    w["kv_mode"] = intake.mode(w["id"])
            return {"workers": described}

        return ServedModel(
            name,
            self.router,
            owned_by="dynamo-llm",
            is_ready=lambda: workers.has_available(name),
            describe=describe,
            engine_enforces_first_token=True,
        )

    def _availability_changed(self, models: frozenset[str]) -> None:
        for name in models:
            if name in self.app.models:
                ready = self.workers.has_available(name)
                self.metrics.model_ready.labels(name).set(1 if ready else 0)


def check_discovery(config: Config) -> None:
    """Raise ``ValueError`` when the discovery flags contradict each other."""
    backend = config.discovery
    if backend == "etcd" and (config.upstreams or config.upstream_file):
        raise ValueError(
            "--discovery-backend etcd finds the workers in etcd: leave out --upstream and "
            "--upstream-file"
        )
    if backend == "static" and not config.upstreams:
        raise ValueError("--discovery-backend static needs --upstream URL")
    if backend == "file" and not config.upstream_file:
        raise ValueError("--discovery-backend file needs --upstream-file PATH")


_UPSTREAM_KEY = "--upstream-api-key (DYN_UPSTREAM_API_KEY)"


def check_upstream_credentials(config: Config) -> None:
    """Refuse an upstream key together with credentials in a worker URL (ValueError).

    Both would be the request's ``Authorization`` header (aiohttp refuses to send the two), so
    every request to that worker would fail; the operator hears it at start-up instead, with
    the worker named redacted. A worker in ``--upstream-file`` is checked as the file is now
    (and again whenever it is reloaded: such a version is refused, the last good one kept); a
    file that cannot be read or is malformed now is a start-up error too.
    """
    urls = [normalise_url(url) for url in config.upstreams]
    if config.upstream_file is not None:
        try:
            mapping = parse_upstream_file(Path(config.upstream_file).read_text()).models
        except (OSError, ValueError) as exc:
            raise ValueError(f"upstream file {config.upstream_file}: {_reason(exc)}") from None
        urls += [url for file_urls in mapping.values() for url in file_urls]
    if config.upstream_api_key:
        check_no_credentials(urls, _UPSTREAM_KEY)


def _reason(exc: OSError | ValueError) -> str:
    if isinstance(exc, OSError):
        return f"cannot read it ({exc.strerror or type(exc).__name__})"
    return str(exc)


def build_routed_app(config: Config, clock: Clock) -> App:
    """The app for ``serve --upstream/--upstream-file/--discovery-backend etcd``: models come
    from the workers.

    Raises ValueError for a configuration that cannot work (contradictory discovery flags,
    :func:`check_upstream_credentials`).
    """
    check_discovery(config)
    check_upstream_credentials(config)
    metrics = Metrics(prefix=config.metrics_prefix)
    app = create_app(config, [], metrics, clock)
    fleet = Fleet(config, app, clock, metrics)
    app.add_lifecycle(fleet.start, fleet.aclose)
    return app
