"""The error classes: each carries its outcome label, and every error renders one exact body."""

import pytest

from dynamo_llm import errors
from dynamo_llm.errors import InvalidRequest, render_error
from dynamo_llm.metrics import Outcome
from dynamo_llm.protocols import decode_chat_request
from tests.unit.protocols.helpers import chat


def test_every_error_class_carries_an_outcome() -> None:
    classes = [errors.DynamoError]
    while classes:
        cls = classes.pop()
        assert isinstance(cls.error_type, Outcome), cls.__name__
        assert cls.error_type is not Outcome.SUCCESS, cls.__name__
        classes += cls.__subclasses__()


def test_render_error_bytes_are_exact() -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_chat_request(chat(temperature=3.5))
    assert render_error(info.value) == (
        b'{"error":{"message":"Validation: temperature must be between 0 and 2, got 3.5",'
        b'"type":"invalid_request_error","param":"temperature","code":"invalid_value"}}'
    )
