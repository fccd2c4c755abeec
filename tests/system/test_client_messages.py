"""What a client reads when a worker fails is in our words (issue 10, problem 5): never a
library's class name or repr. Over loopback, against the worker client, with a scripted worker
that cuts its body (the case that used to read ``Response payload is not completed:
<TransferEncodingError: 400, message='Not enough data to satisfy transfer length header.'>``)."""

import asyncio
import re

import msgspec
import pytest

from dynamo_llm.engines.endpoints import COMPLETIONS
from dynamo_llm.errors import DynamoError, WorkerDisconnected
from dynamo_llm.protocols.completions import decode_completion_request
from dynamo_llm.runtime import EngineContext
from dynamo_llm.testing.health_workers import scripted_worker, worker_client

SAFETY_NET = 10.0
LIBRARY_TEXT = re.compile(r"<|>|Error\b|aiohttp|payload|transfer length|ClientPayload", re.I)


@pytest.mark.parametrize("behaviour", ["cut", "drop"])
async def test_a_worker_that_cuts_its_body_is_described_in_our_words(behaviour: str) -> None:
    body = {"model": "m", "prompt": "a prompt", "stream": True}
    params = decode_completion_request(msgspec.json.encode(body))
    request = COMPLETIONS.request(params, "a prompt", id="r1", model="m", max_tokens=None)
    async with (
        asyncio.timeout(SAFETY_NET) as net,
        worker_client() as client,
        scripted_worker(model="m", default=behaviour) as worker,
    ):
        with pytest.raises(DynamoError) as caught:
            stream = await client.open_stream(worker.url, request, EngineContext(request.id))
            async for _ in stream:
                pass
    assert not net.expired()
    assert isinstance(caught.value, WorkerDisconnected)
    message = caught.value.message
    assert message.startswith("The worker")
    assert not LIBRARY_TEXT.search(message), message
