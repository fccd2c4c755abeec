"""``/v1/models``: reading a worker's model list."""

from __future__ import annotations

import msgspec

__all__ = ["OURS", "decode_model_list"]

OURS = "dynamo-llm"
"""The ``owned_by`` of a ``dynamo-llm worker``'s models."""
OWNER_MAX = 64
"""The longest owner name kept (a worker's ``owned_by`` is shown in logs and registrations)."""


class _ModelCard(msgspec.Struct):
    id: str
    owned_by: str = ""


class _ModelList(msgspec.Struct):
    data: list[_ModelCard]


_decode_models = msgspec.json.Decoder(_ModelList).decode


def decode_model_list(body: bytes) -> tuple[list[str], str]:
    """The model ids of a ``/v1/models`` body (in its order), and who serves them: the
    ``owned_by`` every card says (``dynamo-llm``: the worker is one of ours; ``vllm``, ...),
    ``""`` when the cards disagree, say nothing or there are none, or the name is longer than
    :data:`OWNER_MAX`. Raises ``msgspec.MsgspecError``."""
    listing = _decode_models(body)
    owners = {card.owned_by for card in listing.data}
    owner = owners.pop() if len(owners) == 1 else ""
    return [card.id for card in listing.data], owner if len(owner) <= OWNER_MAX else ""
