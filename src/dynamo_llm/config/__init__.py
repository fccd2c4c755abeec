"""Configuration: one table of options, read once into a frozen dataclass.

Every option is one field of :class:`Config` (:mod:`.table`), declared with its flag, its
environment variable, how its text is parsed, which commands take it and its ``--help`` text
(:mod:`.options` defines the row). Everything else is generated from those rows:
:meth:`Config.from_env` and the ``serve`` and ``worker`` flags and ``--help``
(:mod:`.arguments`). A flag wins over its variable, which wins over the default.

No module reads ``os.environ``: :meth:`Config.from_env` takes the environment as an argument
(only the entry point, :func:`dynamo_llm.cli.main`, passes the process's), the CLI layers its
flags over it, and the result is injected where it is needed. Variable names are Dynamo's, so
runbooks carry over.
"""

from .arguments import add_arguments, config_from_args
from .options import BOTH, SERVE, Command, Group, Kind, Option, option
from .table import OPTIONS, Config

__all__ = [
    "BOTH",
    "OPTIONS",
    "SERVE",
    "Command",
    "Config",
    "Group",
    "Kind",
    "Option",
    "add_arguments",
    "config_from_args",
    "option",
]
