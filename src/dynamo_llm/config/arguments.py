"""A command's flags and ``--help``, generated from the options table; and back to a Config.

:func:`add_arguments` adds, for one command, every row (of the table the defaults are an
instance of: :class:`~dynamo_llm.config.Config`) that applies to it: under its group,
with its kind's argparse shape (a value, a repeatable value, ``--x/--no-x``), and a help line
that names its variable and default. The parser's defaults are a :class:`Config` read from the
environment, so a flag wins over its variable, which wins over the table's default, and
``--help`` shows the default that is actually in force. :func:`config_from_args` puts the
parsed values back into that Config, through the same ``normalize`` step the variables take.

A repeatable flag (``--upstream``) adds to its variable's list rather than replacing it.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .options import CHOICE, Group, Option, rows_of

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    D = TypeVar("D", bound=DataclassInstance)


def add_arguments(
    parser: argparse.ArgumentParser,
    command: str,
    defaults: DataclassInstance,
    choices: Mapping[str, Sequence[str]],
) -> None:
    """Add to ``parser`` the flags of ``command``, defaulting to ``defaults``.

    ``choices`` gives, by field name, the values of each ``CHOICE`` option whose values a
    layer above the configuration owns (the engines, the server interfaces, the router modes).
    """
    groups: dict[Group, argparse._ArgumentGroup] = {}
    for row in rows_of(type(defaults)):
        if not row.has_flag_on(command):
            continue
        group = groups.get(row.group)
        if group is None:
            group = groups[row.group] = parser.add_argument_group(
                row.group.title, row.group.description
            )
        _add_argument(group, row, getattr(defaults, row.field), choices)


def _add_argument(
    group: argparse._ArgumentGroup,
    row: Option,
    default: Any,
    choices: Mapping[str, Sequence[str]],
) -> None:
    assert row.flag is not None
    text = _help(row, default).replace("%", "%%")
    if row.kind.action == "bool":
        group.add_argument(
            row.flag,
            dest=row.field,
            action=argparse.BooleanOptionalAction,
            default=default,
            help=text,
        )
        return
    allowed = row.choices if row.choices is not None else choices.get(row.field)
    if row.kind is CHOICE and allowed is None:
        raise ValueError(f"{row.flag}: no choices given for {row.field!r}")
    if row.kind.action == "append":
        group.add_argument(
            row.flag,
            dest=row.field,
            action="append",
            default=list(default),
            metavar=_metavar(row),
            help=text,
        )
        return
    group.add_argument(
        row.flag,
        dest=row.field,
        type=row.kind.parse,
        choices=allowed,
        default=default,
        metavar=None if allowed is not None else _metavar(row),
        help=text,
    )


def _metavar(row: Option) -> str:
    """The row's metavar, else what argparse would show: the flag's name in capitals."""
    assert row.flag is not None
    return row.metavar or row.flag.lstrip("-").replace("-", "_").upper()


def _help(row: Option, default: Any) -> str:
    if row.secret:
        shown = "set" if default else row.unset
    elif isinstance(default, bool):
        shown = "on" if default else "off"
    elif default is None or default == ():
        shown = row.unset
    else:
        shown = str(default)
    if row.env is None:
        return f"{row.help} [default {shown}]"
    return f"{row.help} [env {row.env}{_env_shape(row)}; default {shown}]"


def _env_shape(row: Option) -> str:
    """How to spell the variable's value, where that is not obvious."""
    if row.kind.action == "bool":
        return "=1|0"
    if row.kind.action == "append":
        item = _metavar(row).lower()
        return f"={item}1,{item}2"
    return ""


def config_from_args(args: argparse.Namespace, base: D, command: str) -> D:
    """``base`` with the values ``args`` parsed for ``command``'s flags."""
    changes: dict[str, object] = {}
    for row in rows_of(type(base)):
        if not row.has_flag_on(command):
            continue
        value = getattr(args, row.field)
        if row.kind.action == "append":
            value = tuple(value)
        changes[row.field] = row.finish(value)
    return dataclasses.replace(base, **changes)
