"""dynamo-llm: an OpenAI-compatible LLM serving frontend that gets the request lifecycle right."""

__version__ = "0.1.0"

__all__ = ["__version__"]
