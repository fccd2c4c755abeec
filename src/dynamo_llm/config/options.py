"""A row of the options table, and how a row reads its value from a variable or a flag.

A row is declared where its field is, with :func:`option`: the field's type and default, then
its flag, its variable, its :class:`Kind` (how text becomes a value), the commands it applies
to, its ``--help`` group and text. :func:`rows_of` collects the rows of a dataclass, each
completed with its field's name and default, in the order the fields are declared (which is
the order ``--help`` lists them in).

Both sources go through the same two steps, so a flag and its variable always mean the same:

1. ``Kind.parse`` turns the text into a value. A variable that is unset or blank means the
   default; one that does not parse is logged and ignored (the default again), so a typo in a
   deployment's environment never stops it. A flag that does not parse is an error (argparse
   exits 2 naming it), because whoever typed it is there to fix it.
2. The row's ``normalize`` maps degenerate values to what they mean, e.g. a timeout of 0 to
   ``None`` (off). It sees the default too, for "0 means the default".
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

log = logging.getLogger("dynamo_llm.config")

T = TypeVar("T")

Command = Literal["serve", "worker", "register"]
BOTH: Final[tuple[Command, ...]] = ("serve", "worker")
SERVE: Final[tuple[Command, ...]] = ("serve",)
ALL: Final[tuple[Command, ...]] = ("serve", "worker", "register")
REGISTER: Final[tuple[Command, ...]] = ("register",)

TRUTHY = frozenset({"1", "true", "on", "yes"})
FALSY = frozenset({"0", "false", "off", "no"})

Normalizer = Callable[[Any, Any], Any]
"""``(value, default) -> value``: what a parsed (or default) value stands for."""


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in TRUTHY:
        return True
    if value in FALSY:
        return False
    raise ValueError(text)


def parse_list(text: str) -> tuple[str, ...]:
    """Comma-separated items, each stripped; empty items are dropped."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


@dataclass(frozen=True, slots=True)
class Kind:
    """How an option's text becomes its value, from a variable and from a flag."""

    what: str
    """What a value is, for the warning about a variable that is not one ("an integer")."""
    parse: Callable[[str], Any]
    """Text to a value; raises ``ValueError`` when it is not one. It is argparse's ``type=``
    too, except for a repeatable flag, whose every value is one item of the list."""
    action: Literal["store", "append", "bool"] = "store"
    """``append``: the flag is repeatable, its values added to the variable's list;
    ``bool``: ``--flag`` / ``--no-flag``."""


def parse_processes(text: str) -> int:
    """A number of processes, at least 1, or ``auto``: one per core this process may run on."""
    value = text.strip().lower()
    if value == "auto":
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            return os.cpu_count() or 1
    count = int(value)
    if count < 1:
        raise ValueError(text)
    return count


TEXT: Final = Kind("a string", str)
CHOICE: Final = Kind("a choice", str)
"""Text that, given as a flag, must be one of the row's choices (a variable is not checked
here: whoever consumes the field rejects an unknown value)."""
INT: Final = Kind("an integer", int)
FLOAT: Final = Kind("a number", float)
BOOL: Final = Kind("a boolean", parse_bool, action="bool")
LIST: Final = Kind("a list", parse_list, action="append")
"""A comma-separated variable, or the flag repeated."""
PROCESSES: Final = Kind("a number of processes or auto", parse_processes)


def positive_or_off(value: int | None, _default: object) -> int | None:
    """Timeouts: unset, unparsable, 0 or negative is off (``None``)."""
    return value if value is not None and value > 0 else None


def zero_is_off(value: int | None, _default: object) -> int | None:
    """0 (or unset) is no limit (``None``)."""
    return value or None


def zero_is_default(value: int, default: int) -> int:
    return value or default


def positive_or_default(value: float, default: float) -> float:
    """0 or negative is the default."""
    return value if value > 0 else default


def at_least_zero(value: int, _default: object) -> int:
    return max(0, value)


def lowercase(value: str, _default: object) -> str:
    return value.lower()


@dataclass(frozen=True, slots=True)
class Group:
    """A ``--help`` section; options are listed under the group of their row."""

    title: str
    description: str | None = None


@dataclass(frozen=True, slots=True)
class Option:
    """One row of the options table: a configuration field and everything that sets it."""

    flag: str | None
    """The command-line flag (``--http-port``); ``None`` for an environment-only option."""
    env: str | None
    """The environment variable (``DYN_HTTP_PORT``); ``None`` for a flag-only option."""
    kind: Kind
    help: str
    group: Group
    commands: tuple[Command, ...] = BOTH
    """The commands that take the flag (the variable is read whatever the command)."""
    metavar: str | None = None
    """The flag's value in ``--help``; by default the flag's name in capitals."""
    choices: tuple[str, ...] | None = None
    """For a ``CHOICE`` whose values this layer owns; others are supplied by the CLI."""
    normalize: Normalizer | None = None
    unset: str = "off"
    """How ``--help`` shows a default that is ``None`` or empty."""
    secret: bool = False
    """A credential: ``--help`` says only whether it is set, and ``repr(config)`` omits it."""
    field: str = ""
    """The configuration field, filled in by :func:`rows_of`."""
    default: Any = None
    """The field's default, filled in by :func:`rows_of`."""

    def has_flag_on(self, command: str) -> bool:
        """True when ``command``'s parser has this option's flag."""
        return self.flag is not None and command in self.commands

    def finish(self, value: Any) -> Any:
        """The value a parsed value (or the default) stands for."""
        return value if self.normalize is None else self.normalize(value, self.default)

    def read_env(self, environ: Mapping[str, str]) -> Any:
        """The value the environment gives this option: its variable, else the default."""
        raw = environ.get(self.env) if self.env is not None else None
        if raw is None or not raw.strip():
            return self.finish(self.default)
        try:
            value = self.kind.parse(raw)
        except ValueError:
            log.warning("ignoring %s=%r: not %s", self.env, raw, self.kind.what)
            value = self.default
        return self.finish(value)


_ROW = "dynamo_llm.option"


def option(
    default: T,
    flag: str | None,
    env: str | None,
    kind: Kind,
    help: str,
    *,
    group: Group,
    commands: tuple[Command, ...] = BOTH,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
    normalize: Normalizer | None = None,
    unset: str = "off",
    secret: bool = False,
) -> T:
    """A dataclass field with ``default`` that is also a row of the options table."""
    row = Option(flag, env, kind, help, group, commands, metavar, choices, normalize, unset, secret)
    return dataclasses.field(default=default, metadata={_ROW: row}, repr=not secret)


def read_environment(cls: type, environ: Mapping[str, str]) -> dict[str, Any]:
    """Each field of ``cls`` that has a variable, as :meth:`Option.read_env` reads it."""
    return {row.field: row.read_env(environ) for row in rows_of(cls) if row.env is not None}


@functools.cache
def rows_of(cls: type) -> tuple[Option, ...]:
    """The rows declared on dataclass ``cls``, in field order, each naming its field."""
    return tuple(
        dataclasses.replace(f.metadata[_ROW], field=f.name, default=f.default)
        for f in dataclasses.fields(cls)
        if _ROW in f.metadata
    )
