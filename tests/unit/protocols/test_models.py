"""decode_model_list: a worker's /v1/models, its model ids and who serves them."""

from __future__ import annotations

import msgspec
import pytest

from dynamo_llm.protocols.models import OWNER_MAX, decode_model_list


def listing(*cards: dict[str, str]) -> bytes:
    return msgspec.json.encode({"object": "list", "data": list(cards)})


@pytest.mark.parametrize(
    ("owners", "owner"),
    [
        (["dynamo-llm", "dynamo-llm"], "dynamo-llm"),
        (["vllm"], "vllm"),
        (["vllm", "sglang"], ""),  # the cards disagree: nobody can say
        ([None], ""),  # llama.cpp's servers may send no owned_by
        (["x" * (OWNER_MAX + 1)], ""),  # too long to keep, show or register
    ],
)
def test_the_owner_is_what_every_card_says(owners: list[str | None], owner: str) -> None:
    cards = [
        {"id": f"m{k}", "object": "model"} | ({} if o is None else {"owned_by": o})
        for k, o in enumerate(owners)
    ]
    ids, said = decode_model_list(listing(*cards))
    assert ids == [f"m{k}" for k in range(len(owners))]
    assert said == owner


def test_no_models_have_no_owner() -> None:
    assert decode_model_list(listing()) == ([], "")


def test_a_listing_that_is_not_one_raises() -> None:
    with pytest.raises(msgspec.MsgspecError):
        decode_model_list(b'{"data": [{"owned_by": "vllm"}]}')
