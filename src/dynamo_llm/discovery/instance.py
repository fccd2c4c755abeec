"""What a worker registers in etcd, and under which key (Dynamo's layout).

A worker is one key under its namespace, bound to its lease::

    v1/instances/{namespace}/backend/generate/{instance_id}

as Dynamo names an endpoint's instances (``v1/instances/<namespace>/<component>/<endpoint>/``,
component ``backend`` and endpoint ``generate`` being what Dynamo's workers serve); the
instance id is the lease id in hex, as in Dynamo, so the key, the lease and the worker are one
thing. The value is the JSON :class:`Instance`: the worker's URL, the model names it serves,
its context length and KV block size when known, where its Prometheus metrics and its KV
event sockets are, and whether
it is a ``dynamo-llm worker`` (which understands a graceful stop).
"""

from __future__ import annotations

import msgspec

from ..protocols.models import OURS

__all__ = [
    "COMPONENT",
    "ENDPOINT",
    "Instance",
    "decode_instance",
    "instance_key",
    "instances_prefix",
]

COMPONENT = "backend"
ENDPOINT = "generate"


class Instance(msgspec.Struct, frozen=True, kw_only=True):
    """One registered worker, as stored in its key."""

    instance_id: str
    url: str
    models: tuple[str, ...]
    namespace: str = "dynamo"
    context_length: int | None = None
    kv_block_size: int | None = None
    metrics_url: str | None = None
    kv_events_endpoint: str | None = None
    """The ZMQ PUB endpoint of the worker's KV cache events (vLLM's format), when it has one."""
    kv_events_replay_endpoint: str | None = None
    """The ZMQ ROUTER endpoint that replays missed KV event batches."""
    owned_by: str = "unknown"
    """``dynamo-llm`` for our own worker; the engine's name (``vllm``, ...) for a sidecar's."""

    @property
    def is_ours(self) -> bool:
        return self.owned_by == OURS

    def encode(self) -> bytes:
        return msgspec.json.encode(self)


def instances_prefix(namespace: str) -> str:
    """The prefix under which every worker of ``namespace`` registers (ends with ``/``)."""
    return f"v1/instances/{namespace}/{COMPONENT}/{ENDPOINT}/"


def instance_key(namespace: str, instance_id: str) -> str:
    return instances_prefix(namespace) + instance_id


def decode_instance(value: bytes) -> Instance:
    """The :class:`Instance` in a key's value; raises ``ValueError`` when it is not one."""
    try:
        return msgspec.json.decode(value, type=Instance)
    except msgspec.MsgspecError as exc:
        raise ValueError(f"not an instance record: {exc}") from None
