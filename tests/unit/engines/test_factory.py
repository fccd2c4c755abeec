"""The engine factory: the in-process engine the config names, its context window within the KV
cache."""

from __future__ import annotations

import pytest

from dynamo_llm.config import Config
from dynamo_llm.engines.echo import EchoEngine
from dynamo_llm.engines.factory import build_engine
from dynamo_llm.engines.mocker import MockerEngine
from dynamo_llm.runtime.clock import SystemClock


def test_the_factory_builds_the_engine_the_config_names() -> None:
    clock = SystemClock()
    mocker = build_engine(Config(), clock)
    assert isinstance(mocker, MockerEngine)
    assert mocker.context_length == 8192
    small = build_engine(
        Config(context_length=100_000, mocker_num_gpu_blocks=10, mocker_block_size=16), clock
    )
    assert isinstance(small, MockerEngine)
    assert small.context_length == 160  # never larger than the KV cache
    echo = build_engine(Config(engine="echo", context_length=50), clock)
    assert isinstance(echo, EchoEngine)
    assert echo.context_length == 50
    with pytest.raises(ValueError, match="unknown engine"):
        build_engine(Config(engine="gpt"), clock)
