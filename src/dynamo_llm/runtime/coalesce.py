"""Awaiting the next item of a stream, but writing out what is pending first if it must wait.

A client stream costs one write per chunk: a call into the server, a system call to wake its I/O
thread, and a ``write`` on the socket. When an engine has several chunks ready at once (a burst),
one write of all of them is much cheaper, and when it has none, the pending bytes must go out
*before* we wait, or the client would see them late.

:func:`next_or_flush` gets both without a timer and without guessing: it starts awaiting the
source's next item by hand. If the item is ready at once, it is returned with nothing written and
without a trip through the event loop. If the source has to wait, ``flush()`` is awaited first,
and only then does the wait continue (the source's pending future is handed to the event loop
exactly as ``await`` would have). Cancellation and exceptions reach the source as with a plain
``await``; this is ``yield from`` written out, because the source's awaitable has already been
started when we learn that it must wait.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar

T = TypeVar("T")


class next_or_flush(Awaitable[T]):
    """``await next_or_flush(next_item, flush)``: see the module docstring."""

    __slots__ = ("_flush", "_next_item")

    def __init__(
        self, next_item: Callable[[], Awaitable[T]], flush: Callable[[], Awaitable[None]]
    ) -> None:
        self._next_item = next_item
        self._flush = flush

    def __await__(self) -> Generator[Any, Any, T]:
        source = self._next_item().__await__()
        try:
            pending = source.send(None)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        # The source must wait: write out what we hold first. If writing fails (the client is
        # gone, or we are cancelled), the source's half-started await is unwound with that same
        # error, through the event loop since its cleanup may await, before the error goes on:
        # a half-started async generator left behind would stay "running" for good, and closing
        # it later would fail.
        try:
            yield from self._flush().__await__()
        except BaseException as exc:
            yield from _unwind(source, pending, exc)
            raise
        while True:
            try:
                sent = yield pending
            except GeneratorExit:
                source.close()
                raise
            except BaseException as exc:  # CancelledError and friends: deliver to the source
                try:
                    pending = source.throw(exc)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
            else:
                try:
                    pending = source.send(sent)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]


def _unwind(
    source: Generator[Any, Any, Any], pending: Any, exc: BaseException
) -> Generator[Any, Any, None]:
    """Deliver ``exc`` to a started ``source`` and drive it until it has finished."""
    del pending  # the source's pending future: nobody will wait for it now
    try:
        waiting = source.throw(exc)
        while True:
            try:
                sent = yield waiting
            except GeneratorExit:
                source.close()
                raise
            except BaseException as again:  # cancelled once more: pass it on, keep unwinding
                waiting = source.throw(again)
            else:
                waiting = source.send(sent)
    except BaseException:  # the source's own ending (or our close): ``exc`` is what matters
        return
