"""Runtime primitives: the engine context and the injected clock."""

from .clock import Clock, FakeClock, SystemClock, TimerHandle, settle
from .context import ContextState, EngineContext, StopReason
from .tasks import cancel_and_wait

__all__ = [
    "Clock",
    "ContextState",
    "EngineContext",
    "FakeClock",
    "StopReason",
    "SystemClock",
    "TimerHandle",
    "cancel_and_wait",
    "settle",
]
