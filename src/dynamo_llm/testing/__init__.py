"""Test helpers shipped with the package (like ``trio.testing``)."""

from .fake_engine import FakeCall, FakeEngine
from .frontend import Frontend, running_frontend

__all__ = ["FakeCall", "FakeEngine", "Frontend", "running_frontend"]
