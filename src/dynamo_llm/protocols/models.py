"""``/v1/models``: reading a worker's model list."""

from __future__ import annotations

import msgspec

__all__ = ["decode_model_list"]


class _ModelCard(msgspec.Struct):
    id: str
    owned_by: str = ""


class _ModelList(msgspec.Struct):
    data: list[_ModelCard]


_decode_models = msgspec.json.Decoder(_ModelList).decode


def decode_model_list(body: bytes) -> tuple[list[str], bool]:
    """The model ids of a ``/v1/models`` body (in its order), and whether every card says
    ``owned_by: dynamo-llm`` (the worker is one of ours). Raises ``msgspec.MsgspecError``."""
    listing = _decode_models(body)
    ours = bool(listing.data) and all(card.owned_by == "dynamo-llm" for card in listing.data)
    return [card.id for card in listing.data], ours
