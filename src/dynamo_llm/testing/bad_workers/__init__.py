"""Misbehaving OpenAI-compatible workers, as real processes, for fault tests.

::

    python -m dynamo_llm.testing.bad_workers --behaviour zombie --port 0

prints ``listening on http://127.0.0.1:<port>`` (flushed) once it accepts connections. Behaviours:

======================  =========================================================================
``ok``                  a fast fake worker: ``--tokens`` tokens ``tok0 tok1 ...`` (``--gap``
                        seconds apart) for chat and completions; honours ``stream``,
                        ``stream_options.include_usage``, ``max_tokens``, ``return_token_ids``
                        (ids ``0..N-1``) and a graceful ``POST /v1/requests/<id>/stop``; answers
                        400 to a request without messages / prompt or with ``max_tokens < 1``;
                        a unary answer comes after as long as the stream would take
``slow``                ``ok`` with gaps (``--gap``, default 0.5 s) between events, but alive
``refuse``              the port is bound but never listens: connections are refused
``zombie``              accepts, reads the request, never answers (any route but ``/_record``)
``zombie-after-first``  sends the headers and one event, then goes silent
``stop-mid-stream``     sends a few events, then ends the body cleanly without ``[DONE]``
``die-mid-stream``      sends a few events, then the process exits (``os._exit(1)``)
``error-mid-stream``    sends a few events, then an ``event: error`` frame (internal error)
``http-500``            answers 500 with an OpenAI error body
``busy``                answers 503 ``all_workers_busy``
``malformed-sse``       a 200 event stream whose first event is invalid JSON, then non-SSE text
======================  =========================================================================

A unary request (``stream: false``) meets its behaviour where its stream would:
``zombie-after-first`` never answers, the mid-stream ones misbehave a few tokens' time in
(``stop-mid-stream`` ends a body cut short, ``error-mid-stream`` answers 500), and
``malformed-sse`` answers plain text. A frontend asks a worker for a unary answer only if it is
one of ours: ``--owned-by dynamo-llm`` makes a bad worker say so in its ``/v1/models`` (it
honours a graceful stop, and a hang-up cancels its handler, as our worker stops its engine).

Every behaviour that listens keeps a record of what it saw: ``GET /_record`` returns
``{"requests": [{"id", "upstream_id", "path", "body", "disconnected", "disconnected_at",
"completed", "stopped"}]}``, where ``id`` is the frontend's id for the request
(``X-Client-Request-Id``: the client's, ``<id>-<k>`` for a sub-request, the same for every
attempt), ``upstream_id`` the attempt's own (``X-Request-Id``, which names the response and a
graceful stop, as with vLLM and our worker), and ``disconnected_at`` is ``time.monotonic()``
(system-wide on Linux, so it compares with the test's own clock).
``GET /_record?wait=<id>&within=<s>`` first waits until that request has ended
(``arrived=<id>``: until it has arrived), a handshake that spares tests from sleeping. A client
hang-up cancels the handler at once (aiohttp's ``handler_cancellation``), which is what a real
engine server reacts to.

:func:`spawn_bad_worker` runs one as a subprocess for a test. Flapping is left to the test
(``await worker.kill()``, ``await worker.restart()``: same port, so the same URL).

The behaviours and their record are the aiohttp app in :mod:`.behaviours`; :mod:`.server` is the
process (the command line above); :mod:`.spawn` is the test's side, :class:`BadWorker`.
"""

from .behaviours import BEHAVIOURS
from .spawn import BadWorker, spawn_bad_worker

__all__ = ["BEHAVIOURS", "BadWorker", "spawn_bad_worker"]
