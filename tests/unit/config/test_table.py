"""The options table: every option is one row, and a flag and its variable mean the same.

The table is :class:`~dynamo_llm.config.Config` (one field per option); ``Config.from_env``, the
``serve`` and ``worker`` flags and their ``--help`` are generated from it. These tests walk the
whole table, so a new row is covered by adding it; a small table of its own checks the shapes
the real one does not use yet (a flag without a variable, a variable without a flag).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import pytest

from dynamo_llm.cli import CHOICES, build_parser, parse_config
from dynamo_llm.config import OPTIONS, Config, Option
from dynamo_llm.config.options import BOOL, CHOICE, FLOAT, INT, LIST, PROCESSES, TEXT

README = Path(__file__).resolve().parents[3] / "README.md"


def test_every_config_field_is_one_row_with_its_own_flag_and_variable() -> None:
    assert [row.field for row in OPTIONS] == [f.name for f in dataclasses.fields(Config)]
    flags = [row.flag for row in OPTIONS]
    variables = [row.env for row in OPTIONS]
    assert len(set(flags)) == len(flags)
    assert len(set(variables)) == len(variables)
    for row in OPTIONS:
        assert row.default == getattr(Config(), row.field)
        assert row.help and row.commands


def sample(row: Option, which: int) -> tuple[str, object]:
    """A value for ``row`` as text, and what it parses to; ``which`` picks one of two."""
    if row.kind is INT or row.kind is PROCESSES:
        return str(7 + which), 7 + which
    if row.kind is FLOAT:
        return str(2.5 + which), 2.5 + which
    if row.kind is BOOL:
        value = not row.default if which else row.default
        return ("1" if value else "0"), value
    if row.kind is LIST:
        return f"http://w{which}:1", (f"http://w{which}:1",)
    if row.kind is CHOICE:
        choice = (row.choices or CHOICES[row.field])[which]
        return choice, choice
    assert row.kind is TEXT
    return f"text-{which}", f"text-{which}"


def flag_argv(row: Option, text: str) -> list[str]:
    assert row.flag is not None
    if row.kind is BOOL:
        return [row.flag if text == "1" else f"--no-{row.flag.removeprefix('--')}"]
    return [f"{row.flag}={text}"]


@pytest.mark.parametrize("row", OPTIONS, ids=lambda row: row.field)
def test_a_flag_wins_over_its_variable_which_wins_over_the_default(row: Option) -> None:
    assert row.env is not None
    command = row.commands[0]
    env_text, env_value = sample(row, 0)
    flag_text, flag_value = sample(row, 1)
    assert getattr(parse_config([command], {})[1], row.field) == row.default
    assert getattr(parse_config([command], {row.env: env_text})[1], row.field) == env_value
    _, config = parse_config([command, *flag_argv(row, flag_text)], {row.env: env_text})
    if row.kind is LIST:  # a repeated flag adds to the variable's list
        assert getattr(config, row.field) == (*env_value, *flag_value)  # type: ignore[misc]
    else:
        assert getattr(config, row.field) == flag_value


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_help_names_each_rows_flag_variable_and_default(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser(Config()).parse_args([command, "--help"])
    flat = " ".join(capsys.readouterr().out.split()).replace("- ", "-")
    for row in OPTIONS:
        if command not in row.commands:
            assert f"{row.flag} " not in flat
            continue
        assert f"{row.flag} " in flat
        assert f"env {row.env}" in flat
    assert "[env DYN_HTTP_PORT; default 8000]" in flat
    assert "[env DYN_HTTP_BACKEND_STREAM_TIMEOUT_SECS; default off]" in flat
    assert "[env DYN_MOCKER_ENABLE_PREFIX_CACHING=1|0; default on]" in flat


def test_help_shows_the_default_the_environment_put_in_force(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        build_parser(Config.from_env({"DYN_HTTP_PORT": "9001"})).parse_args(["worker", "--help"])
    assert "default 9001" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    ("field", "text", "value"),
    [
        ("backend_stream_timeout_secs", "0", None),
        ("backend_stream_timeout_secs", "-5", None),
        ("request_timeout_secs", "30", 30),
        ("body_limit_mb", "0", 4),
        ("max_inflight_per_worker", "0", None),
        ("migration_limit", "-2", 0),
        ("num_workers", "auto", len(os.sched_getaffinity(0))),
        ("num_workers", " 3 ", 3),
        ("http_read_timeout_secs", "0", 30.0),
        ("http_read_timeout_secs", "-1", 30.0),
    ],
)
def test_a_flag_and_its_variable_mean_the_same(field: str, text: str, value: object) -> None:
    row = next(r for r in OPTIONS if r.field == field)
    assert row.flag is not None and row.env is not None
    assert getattr(Config.from_env({row.env: text}), field) == value
    assert getattr(parse_config(["serve", f"{row.flag}={text}"], {})[1], field) == value


def test_an_unparsable_variable_is_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="dynamo_llm.config"):
        config = Config.from_env(
            {"DYN_HTTP_PORT": "eighty", "DYN_HTTP_REQUEST_TIMEOUT_SECS": "soon", "DYN_LOG": "DEBUG"}
        )
    assert config.http_port == 8000
    assert config.request_timeout_secs is None
    assert config.log_level == "debug"
    assert "ignoring DYN_HTTP_PORT='eighty': not an integer" in caplog.text


def test_a_number_of_workers_below_one_is_not_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert Config.from_env({"DYN_HTTP_NUM_WORKERS": "0"}).num_workers == 1  # ignored: default
    with pytest.raises(SystemExit):
        parse_config(["serve", "--num-workers", "0"], {})
    assert "--num-workers" in capsys.readouterr().err


def test_an_unparsable_flag_is_an_error_that_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["serve", "--http-port", "eighty"], {})
    assert exit_info.value.code == 2
    assert "--http-port: invalid int value: 'eighty'" in capsys.readouterr().err


def test_the_readme_configuration_table_names_every_option() -> None:
    readme = README.read_text()
    for row in OPTIONS:
        assert f"`{row.env}`" in readme, row.env
        flag = (row.flag or "").removeprefix("--")
        assert f"`--{flag}`" in readme or f"`--[no-]{flag}`" in readme, row.flag
