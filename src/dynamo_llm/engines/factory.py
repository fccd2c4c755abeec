"""Building the in-process engine a :class:`~dynamo_llm.config.Config` names.

``dynamo-llm serve`` and ``dynamo-llm worker`` both go through :func:`build_engine`, so the two
commands can never disagree on what ``--engine mocker`` (the default) or ``--engine echo`` means.
"""

from __future__ import annotations

import dataclasses

from ..config import Config
from ..runtime.clock import Clock
from .base import Engine
from .echo import EchoEngine
from .mocker import MockerConfig, MockerEngine

ENGINES = ("mocker", "echo")
"""Engine names accepted by ``--engine`` / ``DYN_ENGINE``; the first is the default."""


def mocker_config(config: Config) -> MockerConfig:
    """The mocker's parameters from the ``mocker_*`` fields (and ``context_length``)."""
    mocker = MockerConfig(
        num_gpu_blocks=config.mocker_num_gpu_blocks,
        block_size=config.mocker_block_size,
        max_num_seqs=config.mocker_max_num_seqs,
        max_num_batched_tokens=config.mocker_max_num_batched_tokens,
        enable_prefix_caching=config.mocker_enable_prefix_caching,
        speedup_ratio=config.mocker_speedup_ratio,
        decode_speedup_ratio=config.mocker_decode_speedup_ratio,
        seed=config.mocker_seed,
        tokenizer=config.mocker_tokenizer,
    )
    if config.context_length is not None:
        mocker = dataclasses.replace(mocker, context_length=config.context_length)
    return mocker


def build_engine(config: Config, clock: Clock) -> Engine:
    """The engine ``config.engine`` names, on ``clock``.

    Raises ``ValueError`` for an unknown engine, invalid mocker parameters, or a
    ``mocker_tokenizer`` that cannot be loaded.
    """
    if config.engine == "mocker":
        return MockerEngine(mocker_config(config), clock=clock)
    if config.engine == "echo":
        return EchoEngine(
            clock, delay_ms=config.token_echo_delay_ms, context_length=config.context_length
        )
    raise ValueError(f"unknown engine {config.engine!r}; choose one of {', '.join(ENGINES)}")
