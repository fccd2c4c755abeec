"""The body sent upstream: the client's request as it came, with the attempt's changes applied."""

import msgspec

from dynamo_llm.engines.endpoints import CHAT
from dynamo_llm.protocols.chat import ChatCompletionRequest, ChatMessage
from dynamo_llm.transport import (
    upstream_body,
)

SERVED = "served-model"


def test_upstream_body_forces_streaming_and_applies_the_attempts_changes() -> None:
    params = ChatCompletionRequest(
        model=SERVED,
        messages=[ChatMessage("user", "hi")],
        n=3,
        max_completion_tokens=50,
        temperature=0.5,
    )
    request = CHAT.request(params, id="r1", model=SERVED, max_tokens=20)
    body = msgspec.json.decode(upstream_body(request, model="worker-name", return_token_ids=True))
    assert body == {
        "model": "worker-name",
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 20,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.5,
        "return_token_ids": True,
    }
