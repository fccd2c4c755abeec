"""Static discovery: workers named by flags (``--upstream``) and a file (``--upstream-file``).

- ``--upstream URL`` (repeatable) names a worker whose models are learned from its
  ``GET /v1/models``. A worker that cannot be reached yet is asked again every
  ``retry_interval`` seconds until it answers; it serves no model until then.
- ``--upstream-file PATH`` is YAML or JSON mapping each model to its workers' URLs::

      llama-3-8b:
        - http://10.0.0.1:8000
        - http://10.0.0.2:8000
      qwen-7b: [http://10.0.0.3:8000]
      mistral-7b:
        - url: http://10.0.0.4:8000
          api_key: sk-worker-4  # this worker's own key, instead of --upstream-api-key

  A worker given as ``{url, api_key}`` is sent its ``api_key`` as ``Authorization: Bearer`` on
  every request (whichever model it is listed under, and if it is also an ``--upstream``),
  instead of ``--upstream-api-key``; the key is never shown (``/health``, ``/metrics``, logs
  show the worker's redacted URL). A worker given two different keys, or a key and
  credentials in its URL, makes the file malformed. The keys go to ``on_api_keys({url: key})``
  whenever the file is loaded.

  A worker mapping may also say where the worker publishes its KV cache events (vLLM's ZMQ
  format, followed in ``--router-mode kv``)::

      llama-3-8b:
        - url: http://10.0.0.1:8000
          kv_events_endpoint: tcp://10.0.0.1:5557
          kv_events_replay_endpoint: tcp://10.0.0.1:5558   # optional
          kv_block_size: 16                                # optional: the events carry it

  The file is checked every ``reload_interval`` seconds and reloaded when it changes: new
  workers are added, missing ones removed (their requests in flight finish), and a file that
  does not parse is logged and ignored, keeping the last good set.

A worker whose ``/v1/models`` says ``owned_by: dynamo-llm`` is one of ours, so a graceful stop
can be passed to it across the wire; whatever owner its models name is kept on the worker
(``Worker.owner``: ``vllm`` is asked for token ids, to count the tokens of its packed events).
Every change of the model set is reported to ``on_models(models)``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import clip
from ..router import Worker, WorkerSet
from ..router.kv_blocks import KvEventSource
from ..runtime.clock import Clock
from ..runtime.tasks import cancel_and_wait
from ..runtime.urls import has_credentials, redact_url
from .base import ModelFetcher, ModelsCallback, ModelsPublisher

log = logging.getLogger("dynamo_llm.discovery")

KeysCallback = Callable[[dict[str, str]], None]


def normalise_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    return url.removesuffix("/v1")


def check_no_credentials(urls: Iterable[str], why: str) -> None:
    """Raise ValueError naming (redacted) the first of ``urls`` that carries credentials."""
    for url in urls:
        if has_credentials(url):
            raise ValueError(
                f"worker {redact_url(url)} has credentials in its URL, which cannot go with "
                f"{why}: a request carries one Authorization header; use one or the other"
            )


@dataclass(frozen=True, slots=True)
class UpstreamFile:
    """What an upstream file says: each model's worker URLs, and the workers' own keys."""

    models: dict[str, list[str]]
    api_keys: dict[str, str] = field(default_factory=dict, repr=False)
    """``{url: key}`` for the workers given an ``api_key``."""
    kv_events: dict[str, KvEventSource] = field(default_factory=dict)
    """``{url: source}`` for the workers given a ``kv_events_endpoint``."""


def parse_upstream_file(text: str) -> UpstreamFile:
    """The workers of YAML or JSON text; raises ValueError when malformed.

    No message quotes a key: a YAML error is described by its place and problem only (the
    parser's own message would show the offending line).
    """
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = ", ".join(filter(None, (exc.context, exc.problem)))
        raise ValueError(f"not YAML or JSON{where}: {what}") from None
    except yaml.YAMLError:
        raise ValueError("not YAML or JSON") from None
    if data is None:
        return UpstreamFile({})
    if not isinstance(data, Mapping):
        raise ValueError("the file must map each model name to a list of worker URLs")
    out: dict[str, list[str]] = {}
    keys: dict[str, str] = {}
    sources: dict[str, KvEventSource] = {}
    for model, entry in data.items():
        if not isinstance(model, str) or not model:
            raise ValueError(f"model names must be non-empty strings, got {model!r}")
        items = [entry] if isinstance(entry, str) else entry
        if not isinstance(items, list):
            raise ValueError(f"model {model!r}: expected a list of worker URLs")
        out[model] = [_worker_entry(model, item, keys, sources) for item in items]
    return UpstreamFile(out, keys, sources)


def _worker_entry(
    model: str, item: object, keys: dict[str, str], sources: dict[str, KvEventSource]
) -> str:
    """The normalised URL of one worker entry (a URL, or a mapping with ``url``); its key, if
    any, goes into ``keys``, its KV event endpoints into ``sources``."""
    if isinstance(item, str) and item:
        return normalise_url(item)
    shape = f"model {model!r}: a worker is a URL or {{url: URL, api_key: KEY}}"
    if not isinstance(item, Mapping):
        raise ValueError(shape)
    url, key = item.get("url"), item.get("api_key")
    unknown = sorted(str(name) for name in item if name not in _WORKER_FIELDS)
    if unknown or not (isinstance(url, str) and url) or not (key is None or isinstance(key, str)):
        raise ValueError(shape + (f" (unknown field {clip(unknown[0], 64)})" if unknown else ""))
    url = normalise_url(url)
    source = _kv_event_source(model, item)
    if source is not None:
        sources[url] = source
    if key:
        if has_credentials(url):
            raise ValueError(
                f"worker {redact_url(url)} has both an api_key and credentials in its URL: "
                "a request carries one Authorization header; use one or the other"
            )
        if keys.setdefault(url, key) != key:
            raise ValueError(f"worker {redact_url(url)} is given two different api_key values")
    return url


_WORKER_FIELDS = (
    "url",
    "api_key",
    "kv_events_endpoint",
    "kv_events_replay_endpoint",
    "kv_block_size",
)


def _kv_event_source(model: str, item: Mapping[object, object]) -> KvEventSource | None:
    endpoint = item.get("kv_events_endpoint")
    replay = item.get("kv_events_replay_endpoint")
    block_size = item.get("kv_block_size")
    if endpoint is None:
        return None
    if not isinstance(endpoint, str) or not (replay is None or isinstance(replay, str)):
        raise ValueError(f"model {model!r}: KV event endpoints must be strings")
    if block_size is not None and (type(block_size) is not int or block_size < 1):
        raise ValueError(f"model {model!r}: kv_block_size must be a positive integer")
    return KvEventSource(endpoint, replay, block_size)


class StaticDiscovery:
    """Keeps a :class:`WorkerSet` in line with the flags and the upstream file."""

    def __init__(
        self,
        workers: WorkerSet,
        fetch_models: ModelFetcher,
        clock: Clock,
        *,
        urls: Iterable[str] = (),
        path: str | os.PathLike[str] | None = None,
        on_models: ModelsCallback | None = None,
        reload_interval: float = 1.0,
        retry_interval: float = 2.0,
        forbid_credentials: str | None = None,
        on_api_keys: KeysCallback | None = None,
    ) -> None:
        """``forbid_credentials``, when given, says why a worker URL may not carry credentials
        (an upstream key is set): a file version with such a URL is refused like a malformed
        one (the flags are checked before the app is built: :func:`check_no_credentials`)."""
        self.workers = workers
        self._fetch = fetch_models
        self._clock = clock
        self._urls = [normalise_url(u) for u in urls]
        self._path = Path(path) if path is not None else None
        self._reload_interval = reload_interval
        self._retry_interval = retry_interval
        self._forbid_credentials = forbid_credentials
        self._on_api_keys = on_api_keys
        self._file_workers: dict[str, frozenset[str]] = {}  # url -> models, from the file
        self._pending: set[str] = set()  # --upstream workers whose models are not known yet
        self._file_stamp: tuple[float, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self._models = ModelsPublisher(workers, on_models)

    def models(self) -> frozenset[str]:
        return self._models.models

    def pending(self) -> list[str]:
        """The ``--upstream`` workers that have not told their models yet (URLs redacted)."""
        return [redact_url(url) for url in sorted(self._pending)]

    def status(self) -> Mapping[str, object]:
        backend = "static" if self._urls else "file"
        return {"backend": backend, **({"file": str(self._path)} if self._path else {})}

    async def start(self) -> None:
        """Load the file, ask every ``--upstream`` worker for its models once, then keep watch."""
        if self._path is not None:
            self._reload_file(force=True)
        self._pending = set(self._urls)
        await self._learn_pending()
        if self._pending:
            log.info(
                "waiting for %d worker(s) to answer /v1/models (their models are served once "
                "they do; /health says loading until then): %s",
                len(self._pending),
                ", ".join(self.pending()),
            )
        self._publish()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def aclose(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def _watch(self) -> None:
        since_retry = 0.0
        while True:
            await self._clock.sleep(self._reload_interval)
            changed = self._path is not None and self._reload_file()
            since_retry += self._reload_interval
            if self._pending and since_retry >= self._retry_interval:
                since_retry = 0.0
                changed = await self._learn_pending() or changed
            if changed:
                self._publish()

    async def _learn_pending(self) -> bool:
        learned = False
        for url in sorted(self._pending):
            try:
                models, owner = await self._fetch(url)
            except Exception as exc:  # unreachable, or not an OpenAI server: try again later
                log.warning(
                    "worker %s: cannot list its models yet (%s)", redact_url(url), _describe(exc)
                )
                continue
            self._pending.discard(url)
            extra = self._file_workers.get(url, frozenset())
            self.workers.add(Worker(url, models | extra, owner=owner))
            log.info(
                "worker %s serves %s", redact_url(url), ", ".join(sorted(models)) or "no model"
            )
            learned = True
        return learned

    def _reload_file(self, *, force: bool = False) -> bool:
        assert self._path is not None
        try:
            stat = self._path.stat()
        except OSError as exc:
            if force:
                raise ValueError(f"cannot read upstream file {self._path}: {exc}") from None
            return False
        stamp = (stat.st_mtime, stat.st_size)
        if stamp == self._file_stamp and not force:
            return False
        self._file_stamp = stamp
        try:
            upstream = parse_upstream_file(self._path.read_text())
            mapping = upstream.models
            if self._forbid_credentials is not None:
                check_no_credentials(
                    (url for urls in mapping.values() for url in urls), self._forbid_credentials
                )
        except (OSError, ValueError) as exc:
            if force:
                raise ValueError(f"upstream file {self._path}: {exc}") from None
            log.error("upstream file %s: %s; keeping the previous workers", self._path, exc)
            return False
        if self._on_api_keys is not None:
            self._on_api_keys(upstream.api_keys)
        wanted: dict[str, set[str]] = {}
        for model, urls in mapping.items():
            for url in urls:
                wanted.setdefault(url, set()).add(model)
        for url in set(self._file_workers) - set(wanted):
            if url not in self._urls:
                self.workers.remove(redact_url(url))
                log.info("worker %s removed (no longer in %s)", redact_url(url), self._path)
        for url, models in wanted.items():
            existing = self.workers.get(redact_url(url))
            merged = frozenset(models) | (
                existing.models if url in self._urls and existing else frozenset()
            )
            worker = self.workers.add(Worker(url, merged, owner=existing.owner if existing else ""))
            worker.kv_events = upstream.kv_events.get(url)
        self._file_workers = {url: frozenset(m) for url, m in wanted.items()}
        log.info(
            "upstream file %s: %d model(s), %d worker(s)", self._path, len(mapping), len(wanted)
        )
        return True

    def _publish(self) -> None:
        self._models.publish()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
