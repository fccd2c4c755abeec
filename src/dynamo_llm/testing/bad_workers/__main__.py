"""``python -m dynamo_llm.testing.bad_workers``: run one bad worker (see :mod:`.server`)."""

from .server import main

if __name__ == "__main__":
    main()
