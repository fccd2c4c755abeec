"""API keys: which requests may use the protected routes.

Keys come from two sources, and any key of either is accepted:

- ``--api-key`` (repeatable, or ``DYN_API_KEY`` comma-separated): fixed for the process's life.
- ``--api-key-file PATH``: one key per line; blank lines and lines starting with ``#`` are
  ignored. The file is watched without a task of its own: a request that needs a key looks at
  the file's stamp (modification time, size, inode) at most once per ``interval`` seconds of the
  injected clock, and at once when the key it presents matches none, so a key added to the file
  works on its first use and a key removed stops working within ``interval``. Looking is one
  ``stat``; the file is read only when its stamp moved. Misses look at most :data:`MISS_LOOKS`
  times per ``interval``, so a client sending bad keys costs at most that many ``stat`` calls per
  interval, not one per request; past that, a key just added works at the next look. A
  version that cannot be read or holds no key is logged once and ignored: the last good keys
  stay in force (an empty file never turns authentication off). At start-up the file must be
  readable and hold a key (:class:`ValueError` otherwise, which the command line reports as a
  start-up error).

A request presents a key as ``Authorization: Bearer <key>`` (OpenAI clients) or
``x-api-key: <key>`` (Anthropic clients). Keys are kept as SHA-256 digests and compared with
:func:`hmac.compare_digest` against every key, so neither the length of a key nor which key
nearly matched shows in the time taken. No key, from either source, is ever logged: the log
names the file and counts keys.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from ..runtime.clock import Clock
from .connection import HeaderLookup

__all__ = ["ApiKeys", "KeyFile", "parse_key_file"]

log = logging.getLogger("dynamo_llm.http.auth")

RELOAD_INTERVAL = 1.0
"""How often, at most, a request looks at the key file's stamp (seconds)."""
MISS_LOOKS = 10
"""How many times, at most, keys that match none make requests look at the file per interval."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_key_file(text: str) -> list[str]:
    """The keys of a key file's text: each line stripped, blank lines and ``#`` lines dropped."""
    keys = []
    for line in text.splitlines():
        key = line.strip()
        if key and not key.startswith("#"):
            keys.append(key)
    return keys


class KeyFile:
    """The keys of ``--api-key-file``, reloaded when the file changes (see the module doc)."""

    __slots__ = (
        "_clock",
        "_digests",
        "_failure",
        "_interval",
        "_looked_at",
        "_miss_looks",
        "_miss_window",
        "_path",
        "_stamp",
    )

    def __init__(
        self, path: str | os.PathLike[str], clock: Clock, interval: float = RELOAD_INTERVAL
    ) -> None:
        """Read the file now; ValueError when it cannot be read or holds no key."""
        self._path = Path(path)
        self._clock = clock
        self._interval = interval
        self._digests: tuple[bytes, ...] = ()
        self._stamp: tuple[int, int, int] | None = None
        self._failure: str | None = None
        self._looked_at = clock.now()
        self._miss_window = float("-inf")  # when the current window of misses' looks began
        self._miss_looks = 0  # how many times misses looked in it
        problem = self._reload()
        if problem is not None:
            raise ValueError(f"API key file {self._path}: {problem}")

    def in_force(self) -> tuple[bytes, ...]:
        """The digests of the keys in force, the file looked at first if ``interval`` has
        passed since it last was."""
        if self._clock.now() - self._looked_at >= self._interval:
            self.refresh()
        return self._digests

    def refresh_on_miss(self) -> bool:
        """:meth:`refresh` for a key that matched none, unless misses looked
        :data:`MISS_LOOKS` times already this ``interval``; True when the keys changed."""
        now = self._clock.now()
        if now - self._miss_window >= self._interval:
            self._miss_window = now
            self._miss_looks = 0
        if self._miss_looks >= MISS_LOOKS:
            return False
        self._miss_looks += 1
        return self.refresh()

    def refresh(self) -> bool:
        """Look at the file now; True when the keys in force changed."""
        self._looked_at = self._clock.now()
        before = self._digests
        problem = self._reload()
        if problem is not None:
            if problem != self._failure:
                log.error(
                    "API key file %s: %s; keeping the last %d key(s)",
                    self._path,
                    problem,
                    len(self._digests),
                )
            self._failure = problem
        return self._digests != before

    def _reload(self) -> str | None:
        """Load the file if its stamp moved; what is wrong with it, or None."""
        try:
            stat = self._path.stat()
        except OSError as exc:
            self._stamp = None  # whatever comes back is read afresh
            return _describe(exc)
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp == self._stamp:
            return self._failure
        self._stamp = stamp
        try:
            keys = parse_key_file(self._path.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            return _describe(exc)
        if not keys:
            return "no key in it (blank lines and # comments only)"
        digests = tuple(dict.fromkeys(_digest(key) for key in keys))
        if digests != self._digests or self._failure is not None:
            log.info("API key file %s: %d key(s) in force", self._path, len(digests))
        self._digests = digests
        self._failure = None
        return None


class ApiKeys:
    """The keys a request may present: the fixed ones and those of the key file."""

    __slots__ = ("_file", "_fixed")

    def __init__(self, keys: Iterable[str] = (), file: KeyFile | None = None) -> None:
        self._fixed = tuple(dict.fromkeys(_digest(key) for key in keys if key))
        self._file = file

    @classmethod
    def configured(cls, keys: Iterable[str], path: str | None, clock: Clock) -> ApiKeys | None:
        """The keys of ``--api-key`` and ``--api-key-file``; None when neither is set (no
        authentication). Raises ValueError for a key file that cannot be used."""
        keys = tuple(key for key in keys if key)
        if not keys and path is None:
            return None
        return cls(keys, KeyFile(path, clock) if path is not None else None)

    def accepts(self, headers: HeaderLookup) -> bool:
        """Whether the request carries one of the keys (see the module doc for how)."""
        presented = _presented(headers)
        if not presented:
            return False
        file = self._file
        if file is None:
            return _any_match(presented, self._fixed)
        if _any_match(presented, self._fixed + file.in_force()):
            return True
        # A miss may be a key just added to the file: look at it once more before refusing.
        return file.refresh_on_miss() and _any_match(presented, self._fixed + file.in_force())


def _presented(headers: HeaderLookup) -> list[bytes]:
    presented = []
    scheme, _, token = (headers.get("authorization") or "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        presented.append(_digest(token.strip()))
    api_key = (headers.get("x-api-key") or "").strip()
    if api_key:
        presented.append(_digest(api_key))
    return presented


def _any_match(presented: list[bytes], digests: tuple[bytes, ...]) -> bool:
    # Every pair is compared, so the time taken does not say which key nearly matched.
    matches = [hmac.compare_digest(p, d) for p in presented for d in digests]
    return any(matches)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot read it ({exc.strerror})"
    return f"cannot read it ({type(exc).__name__})"
