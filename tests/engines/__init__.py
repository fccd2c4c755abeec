"""The real-engine conformance suite: run by scripts/test-engines (see README)."""
