"""API keys from the flags and from a key file that changes under a running server (on a
FakeClock: the file is looked at once per interval, and at once on a miss)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

from dynamo_llm.http.auth import MISS_LOOKS, ApiKeys, KeyFile, parse_key_file
from dynamo_llm.http.connection import HeaderLookup
from dynamo_llm.runtime.clock import FakeClock
from dynamo_llm.testing import make_request
from tests.helpers import write


def _h(headers: dict[str, str]) -> HeaderLookup:
    return make_request("/v1/models", headers).headers


def _bearer(key: str) -> HeaderLookup:
    return _h({"authorization": f"Bearer {key}"})


def test_a_key_file_ignores_blank_lines_comments_and_surrounding_space() -> None:
    assert parse_key_file("# ops team\n\n  k1  \nk2\n   # old: k0\nk#3\n") == ["k1", "k2", "k#3"]


def test_a_key_is_taken_as_a_bearer_token_or_an_x_api_key_and_nothing_else() -> None:
    keys = ApiKeys(["k1", "k2"])
    assert keys.accepts(_bearer("k1"))
    assert keys.accepts(_h({"authorization": "bearer  k2 "}))
    assert keys.accepts(_h({"x-api-key": "k2"}))
    assert keys.accepts(_h({"authorization": "Bearer wrong", "x-api-key": "k1"}))
    for headers in ({}, {"authorization": "Bearer k3"}, {"authorization": "k1"}):
        assert not keys.accepts(_h(headers)), headers
    assert not keys.accepts(_h({"authorization": "Basic k1"}))
    assert not keys.accepts(_h({"x-api-key": ""}))
    assert not ApiKeys([""]).accepts(_h({"authorization": "Bearer "}))


def test_without_a_key_or_a_file_there_is_no_authentication() -> None:
    assert ApiKeys.configured((), None, FakeClock()) is None
    assert ApiKeys.configured(("",), None, FakeClock()) is None


@pytest.mark.parametrize("text", ["", "\n# only a comment\n"])
def test_a_key_file_must_hold_a_key_at_start_up(text: str, tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(ValueError, match="no key in it"):
        KeyFile(path, FakeClock())
    with pytest.raises(ValueError, match="cannot read it"):
        KeyFile(tmp_path / "missing", FakeClock())


async def test_the_file_and_the_flags_are_one_set_and_a_new_key_works_on_first_use(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys"
    write(path, "file-1\n")
    clock = FakeClock()
    keys = ApiKeys.configured(("flag-1",), str(path), clock)
    assert keys is not None
    assert keys.accepts(_bearer("flag-1")) and keys.accepts(_bearer("file-1"))
    write(path, "file-1\nfile-2\n")
    assert keys.accepts(_h({"x-api-key": "file-2"}))  # the miss looked at the file at once


async def test_a_removed_key_stops_working_once_the_interval_has_passed(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    write(path, "old\nkept\n")
    clock = FakeClock()
    keys = ApiKeys([], KeyFile(path, clock, interval=1.0))
    write(path, "kept\n")
    await clock.advance(0.5)
    assert keys.accepts(_bearer("old"))  # not looked at yet: still in force
    await clock.advance(0.5)
    assert not keys.accepts(_bearer("old"))
    assert keys.accepts(_bearer("kept"))


async def test_bad_keys_in_a_burst_look_at_the_file_a_bounded_number_of_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys"
    write(path, "good\n")
    clock = FakeClock()
    keys = ApiKeys([], KeyFile(path, clock, interval=1.0))
    looks = 0
    stat = os.stat

    def counted(target: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        nonlocal looks
        looks += os.fspath(target) == os.fspath(path)
        return stat(target, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counted)
    for _ in range(100):
        assert not keys.accepts(_bearer("bad"))
    assert looks == MISS_LOOKS
    write(path, "good\nnew\n")
    looks = 0
    assert not keys.accepts(_bearer("new"))  # the misses' looks are used up for this interval
    assert looks == 0
    await clock.advance(0.5)
    assert not keys.accepts(_bearer("new"))
    await clock.advance(0.5)
    assert keys.accepts(_bearer("new"))  # the interval's own look
    assert looks == 1


@pytest.mark.parametrize("broken", ["empty", "missing", "unreadable"])
async def test_a_file_that_breaks_keeps_the_last_good_keys_and_says_so_once(
    broken: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys"
    write(path, "sk-planted-1\n")
    clock = FakeClock()
    keys = ApiKeys([], KeyFile(path, clock, interval=1.0))
    with caplog.at_level(logging.INFO, logger="dynamo_llm.http.auth"):
        if broken == "empty":
            write(path, "# rotated\n")
        elif broken == "missing":
            path.unlink()
        else:
            path.write_bytes(b"\xff\xfe not text\n")
        for _ in range(3):
            await clock.advance(1)
            assert keys.accepts(_bearer("sk-planted-1"))
            assert not keys.accepts(_bearer("other"))
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, errors
        assert str(path) in errors[0] and "keeping the last 1 key(s)" in errors[0]
        write(path, "sk-planted-2\n")
        await clock.advance(1)
        assert keys.accepts(_bearer("sk-planted-2"))
        assert not keys.accepts(_bearer("sk-planted-1"))
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == [f"API key file {path}: 1 key(s) in force"]
    assert "sk-planted" not in caplog.text
