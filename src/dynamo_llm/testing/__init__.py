"""Test helpers shipped with the package (like ``trio.testing``)."""

from .fake_engine import FakeCall, FakeEngine

__all__ = ["FakeCall", "FakeEngine"]
