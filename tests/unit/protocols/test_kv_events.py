"""vLLM's KV event batches: our encoding, and both forms vLLM releases write, decode alike."""

from __future__ import annotations

import msgspec
import pytest

from dynamo_llm.protocols.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
    decode_batch,
    decode_sequence,
    encode_batch,
    encode_sequence,
)


def test_a_batch_round_trips_in_the_array_form() -> None:
    events: list[KvEvent] = [
        BlockStored([1, 2], None, [1, 2, 3, 4], 2),
        BlockRemoved([7]),
        AllBlocksCleared(),
    ]
    raw = msgspec.msgpack.decode(encode_batch(1.5, events))
    assert raw[0] == 1.5 and raw[2] == 0
    assert raw[1][0] == ["BlockStored", [1, 2], None, [1, 2, 3, 4], 2, None, "GPU", None]
    assert raw[1][1] == ["BlockRemoved", [7], "GPU"]
    assert raw[1][2] == ["AllBlocksCleared"]
    assert decode_batch(encode_batch(1.5, events)).events == events


def test_the_map_form_of_newer_releases_decodes_and_unknown_fields_are_ignored() -> None:
    payload = msgspec.msgpack.encode(
        {
            "ts": 2.0,
            "events": [
                {
                    "type": "BlockStored",
                    "block_hashes": [b"\x01" * 32],
                    "parent_block_hash": None,
                    "token_ids": [5, 6],
                    "block_size": 2,
                    "lora_id": None,
                    "medium": "GPU",
                    "extra_keys": [None],
                    "group_idx": 0,
                },
                {"type": "SomethingNew", "x": 1},
                {"type": "BlockRemoved", "block_hashes": [b"\x01" * 32], "medium": "GPU"},
            ],
            "data_parallel_rank": 0,
        }
    )
    batch = decode_batch(payload)
    assert batch.events == [
        BlockStored([b"\x01" * 32], None, [5, 6], 2),
        BlockRemoved([b"\x01" * 32]),
    ]


@pytest.mark.parametrize("payload", [b"\xc1", msgspec.msgpack.encode([1]), b"\x93\x01\x02\x03"])
def test_what_is_not_a_batch_is_refused(payload: bytes) -> None:
    with pytest.raises(ValueError):
        decode_batch(payload)


def test_sequences_are_8_byte_big_endian_signed() -> None:
    assert encode_sequence(1) == b"\x00" * 7 + b"\x01"
    assert decode_sequence(encode_sequence(-1)) == -1
    with pytest.raises(ValueError):
        decode_sequence(b"\x01")
