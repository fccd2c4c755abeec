"""``python -m dynamo_llm``: the same as the ``dynamo-llm`` command."""

from .cli import main

raise SystemExit(main())
