"""The one interface every discovery backend (``static``, ``file``, ``etcd``) offers the fleet.

A backend keeps a :class:`~dynamo_llm.router.WorkerSet` in line with where the workers are
registered: ``static`` with ``--upstream`` (models from each worker's ``/v1/models``), ``file``
with ``--upstream-file`` (reloaded when it changes), ``etcd`` with the keys workers hold under
a lease (:mod:`.etcd`). It reports every change of the set of models to ``on_models``, says
which configured workers it still waits for (``/health``'s ``waiting_for``), and describes its
own state for ``/health`` (``status``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from ..router import WorkerSet

__all__ = ["BACKENDS", "Discovery", "ModelFetcher", "ModelsCallback", "ModelsPublisher"]

BACKENDS = ("static", "file", "etcd")

ModelFetcher = Callable[[str], Awaitable[tuple[frozenset[str], str]]]
"""``url -> (models, owner)``: a worker's ``/v1/models`` (the owner as
:func:`~dynamo_llm.protocols.models.decode_model_list` says it)."""

ModelsCallback = Callable[[frozenset[str]], None]
"""Called with every model some worker serves, whenever that set changes."""


class Discovery(Protocol):
    """A discovery backend: started with the fleet, closed with it."""

    async def start(self) -> None:
        """Load what is registered now (bounded), then keep watch in a task."""

    async def aclose(self) -> None:
        """Stop watching; the worker set is left as it is."""

    def models(self) -> frozenset[str]: ...

    def pending(self) -> list[str]:
        """What the backend still waits for before it can serve everything configured."""

    def status(self) -> Mapping[str, object]:
        """The backend's state for ``/health`` (``{"backend": ..., ...}``)."""


class ModelsPublisher:
    """The models some worker of ``workers`` serves, told to ``on_models`` when they change."""

    def __init__(self, workers: WorkerSet, on_models: ModelsCallback | None) -> None:
        self._workers = workers
        self._on_models = on_models
        self.models: frozenset[str] = frozenset()

    def publish(self) -> None:
        models = frozenset(self._workers.models())
        if models != self.models:
            self.models = models
            if self._on_models is not None:
                self._on_models(models)
