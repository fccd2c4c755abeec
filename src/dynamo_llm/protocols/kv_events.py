"""vLLM's KV cache events on the wire: what an engine says it stored, evicted or cleared.

An engine publishes on a ZMQ PUB socket, one multipart message per batch::

    [topic, sequence (8-byte big-endian signed), payload]

the payload being a msgpack ``KVEventBatch``: ``[ts, events, data_parallel_rank]``, each event
a tagged array whose first element is its class name (vLLM's ``msgspec`` structs with
``array_like=True, tag=True``)::

    ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
     lora_name]
    ["BlockRemoved", block_hashes, medium]
    ["AllBlocksCleared"]

Missed batches are asked for on the engine's ROUTER socket: the subscriber (a DEALER) sends
``[b"", start_sequence]`` and receives ``[b"", sequence, payload]`` for every batch still
buffered from ``start_sequence`` on, then ``[b"", -1, b""]``. vLLM 0.32 puts the topic before
the sequence (``[b"", topic, sequence, payload]``, then ``[b"", b"", -1, b""]``); the
subscriber reads both, the mocker sends the first.

:func:`decode_batch` also reads the map form newer vLLM releases write (the same structs
without ``array_like``: ``{"type": "BlockStored", "block_hashes": ...}``) and ignores fields it
does not know, so a newer engine's extra fields do not break the intake. Block hashes are kept
as the engine sent them (an int, or bytes from vLLM's sha256 hashing): they only name blocks;
the frontend keys its index from the token ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import msgspec

__all__ = [
    "END_OF_REPLAY",
    "AllBlocksCleared",
    "BlockHash",
    "BlockRemoved",
    "BlockStored",
    "KvEvent",
    "KvEventBatch",
    "decode_batch",
    "decode_sequence",
    "encode_batch",
    "encode_sequence",
]

BlockHash = int | bytes
END_OF_REPLAY = -1


class BlockStored(msgspec.Struct, array_like=True, tag=True, frozen=True, gc=False):
    """Full blocks the engine cached: ``token_ids`` holds ``block_size`` ids per block."""

    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = "GPU"
    lora_name: str | None = None


class BlockRemoved(msgspec.Struct, array_like=True, tag=True, frozen=True, gc=False):
    """Blocks the engine evicted."""

    block_hashes: list[BlockHash]
    medium: str | None = "GPU"


class AllBlocksCleared(msgspec.Struct, array_like=True, tag=True, frozen=True, gc=False):
    """The engine's cache is empty (a reset, or a restart)."""


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KvEventBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[KvEvent]
    data_parallel_rank: int | None = 0


_encoder = msgspec.msgpack.Encoder()
_raw = msgspec.msgpack.Decoder()


def encode_batch(ts: float, events: Sequence[KvEvent], data_parallel_rank: int = 0) -> bytes:
    return _encoder.encode(KvEventBatch(ts, list(events), data_parallel_rank))


def encode_sequence(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=True)


def decode_sequence(frame: bytes) -> int:
    """The sequence number in an 8-byte frame; raises ``ValueError`` otherwise."""
    if len(frame) != 8:
        raise ValueError(f"a sequence frame has 8 bytes, not {len(frame)}")
    return int.from_bytes(frame, "big", signed=True)


class DecodedBatch(NamedTuple):
    ts: float
    events: list[KvEvent]


def decode_batch(payload: bytes) -> DecodedBatch:
    """The events of a ``KVEventBatch`` payload (array or map form); unknown event kinds are
    skipped. Raises ``ValueError`` when the payload is not a batch."""
    try:
        data = _raw.decode(payload)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not msgpack: {exc}") from None
    if isinstance(data, Mapping):
        ts, raw_events = data.get("ts"), data.get("events")
    elif isinstance(data, list) and len(data) >= 2:
        ts, raw_events = data[0], data[1]
    else:
        raise ValueError("not a KVEventBatch")
    if not isinstance(ts, int | float) or not isinstance(raw_events, list):
        raise ValueError("not a KVEventBatch")
    events: list[KvEvent] = []
    for raw in raw_events:
        event = _decode_event(raw)
        if event is not None:
            events.append(event)
    return DecodedBatch(float(ts), events)


def _decode_event(raw: Any) -> KvEvent | None:
    if isinstance(raw, list) and raw and isinstance(raw[0], str):
        kind, fields = raw[0], raw[1:]
        names = _FIELDS.get(kind)
        if names is None:
            return None
        values = dict(zip(names, fields, strict=False))
    elif isinstance(raw, Mapping):
        tag = raw.get("type")
        if not isinstance(tag, str) or tag not in _FIELDS:
            return None
        kind = tag
        values = {k: raw[k] for k in _FIELDS[kind] if k in raw}
    else:
        raise ValueError(f"not a KV event: {raw!r:.80}")
    try:
        if kind == "BlockStored":
            return BlockStored(
                _hashes(values["block_hashes"]),
                _hash_or_none(values.get("parent_block_hash")),
                _ints(values["token_ids"]),
                int(values["block_size"]),
            )
        if kind == "BlockRemoved":
            return BlockRemoved(_hashes(values["block_hashes"]))
        return AllBlocksCleared()
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed {kind} event: {exc}") from None


_FIELDS: dict[str, tuple[str, ...]] = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size"),
    "BlockRemoved": ("block_hashes",),
    "AllBlocksCleared": (),
}


def _hash_or_none(value: Any) -> BlockHash | None:
    if value is None or isinstance(value, int | bytes):
        return value
    raise TypeError(f"a block hash is an int or bytes, not {type(value).__name__}")


def _hashes(value: Any) -> list[BlockHash]:
    if not isinstance(value, list) or not all(isinstance(h, int | bytes) for h in value):
        raise TypeError("block_hashes must be a list of ints or bytes")
    return value


def _ints(value: Any) -> list[int]:
    if not isinstance(value, list) or not all(type(t) is int for t in value):
        raise TypeError("token_ids must be a list of ints")
    return value
