"""Worker URLs as they may be shown: in ``/health``, in metric labels and in logs.

An operator may put credentials in a worker's URL (``http://user:token@host:8000``): aiohttp
sends them as basic auth, so the URL itself is what connects. Everything that *shows* a worker
uses :func:`redact_url` instead, which keeps scheme, host, port and path and replaces the user
info and any query string with ``***``. A worker's id (its label in metrics) is its redacted URL.
"""

from __future__ import annotations

import urllib.parse

__all__ = ["has_credentials", "redact_url"]

REDACTED = "***"


def has_credentials(url: str) -> bool:
    """Whether ``url`` carries user info (``http://user:pass@host``), which aiohttp sends as basic
    auth."""
    try:
        return "@" in urllib.parse.urlsplit(url).netloc
    except ValueError:
        return False


def redact_url(url: str) -> str:
    """``url`` with its user info and query replaced by ``***`` (unchanged when it has none)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    _userinfo, at, hostport = netloc.rpartition("@")
    if at:
        netloc = f"{REDACTED}@{hostport}"
    query = REDACTED if parts.query else ""
    if netloc == parts.netloc and not query:
        return url
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))
