"""Test helpers shipped with the package (like ``trio.testing``)."""

from .fake_connection import FakeConnection, make_request
from .fake_engine import FakeCall, FakeEngine
from .frontend import Frontend, running_frontend, serving

__all__ = [
    "FakeCall",
    "FakeConnection",
    "FakeEngine",
    "Frontend",
    "make_request",
    "running_frontend",
    "serving",
]
