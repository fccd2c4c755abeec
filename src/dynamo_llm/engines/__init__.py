"""Engines: the protocol every engine implements, and the engines shipped with the package."""

from .base import Endpoint, Engine, EngineOutput, EngineRequest, Usage, check_context_length

__all__ = ["Endpoint", "Engine", "EngineOutput", "EngineRequest", "Usage", "check_context_length"]
