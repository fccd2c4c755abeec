"""Runtime primitives: the engine context and the injected clock."""

from .clock import Clock, FakeClock, SystemClock, TimerHandle, settle
from .context import ContextState, EngineContext, StopReason

__all__ = [
    "Clock",
    "ContextState",
    "EngineContext",
    "FakeClock",
    "StopReason",
    "SystemClock",
    "TimerHandle",
    "settle",
]
