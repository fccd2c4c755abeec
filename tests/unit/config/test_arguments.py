"""Flags and variables generated from rows: a small table of its own, one row of each kind
(both, flag only, variable only, serve only, a choice given by the caller)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import pytest

from dynamo_llm.config import SERVE, Group, add_arguments, option
from dynamo_llm.config import config_from_args as apply_args
from dynamo_llm.config.options import BOOL, CHOICE, INT, LIST, TEXT

GROUP = Group("a group")


@dataclass(frozen=True)
class Small:
    both: int = option(1, "--both", "X_BOTH", INT, "both", group=GROUP)
    flag_only: bool = option(False, "--flag-only", None, BOOL, "flag only", group=GROUP)
    env_only: str = option("a", None, "X_ENV_ONLY", TEXT, "variable only", group=GROUP)
    items: tuple[str, ...] = option(
        (), "--item", "X_ITEMS", LIST, "serve only", group=GROUP, commands=SERVE, metavar="URL"
    )
    mode: str = option("x", "--mode", "X_MODE", CHOICE, "a choice given by the caller", group=GROUP)


def parse_small(command: str, argv: list[str], base: Small) -> Small:
    parser = argparse.ArgumentParser()
    add_arguments(parser, command, base, {"mode": ("x", "y")})
    return apply_args(parser.parse_args(argv), base, command)


def test_a_flag_without_a_variable_and_a_variable_without_a_flag() -> None:
    from dynamo_llm.config.options import read_environment

    base = Small(**read_environment(Small, {"X_ENV_ONLY": "b", "X_BOTH": "2", "X_ITEMS": "u,v"}))
    assert base == Small(both=2, env_only="b", items=("u", "v"))
    assert parse_small("worker", [], base) == base
    assert parse_small("worker", ["--flag-only", "--mode", "y"], base) == dataclasses.replace(
        base, flag_only=True, mode="y"
    )
    assert parse_small("serve", ["--item", "w"], base).items == ("u", "v", "w")
    with pytest.raises(SystemExit):
        parse_small("worker", ["--item", "w"], base)  # a serve-only flag
    with pytest.raises(SystemExit):
        parse_small("worker", ["--env-only", "c"], base)


def test_a_choice_option_whose_choices_nobody_gave_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="no choices given for 'mode'"):
        add_arguments(argparse.ArgumentParser(), "worker", Small(), {})
