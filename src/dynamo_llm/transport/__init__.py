"""The router's transport: the HTTP client to OpenAI-compatible workers, and their SSE streams.

One routing attempt goes to one worker through :meth:`WorkerClient.open_stream`; the worker's
stream comes back as a :class:`RemoteStream`, relayed as raw bytes on the hot path and parsed
only where a decision is needed. Cancellation crosses the wire (a closed connection, or a
graceful stop for our own workers). The modules, in the order a request meets them:

- :mod:`.client` — :class:`WorkerClient` (admission, probes, ``/v1/models``) and
  :func:`make_session`, the pooled aiohttp session for everything but generation.
- :mod:`.pool` and :mod:`.h1` — generation requests: a pool of keep-alive HTTP/1.1 connections
  (bound, idle expiry, receive buffer, ``Authorization``) and the connection protocol that reads
  a worker's answer (httptools' parser, whole buffers per read, backpressure).
- :mod:`.body` — :func:`upstream_body`, the JSON sent upstream.
- :mod:`.errors` — the tables mapping a worker's statuses and aiohttp's exceptions to our error
  classes (:func:`error_from_worker`).
- :mod:`.stream` — :class:`RemoteStream`: the read loop, cancellation and the release of the
  connection.
- :mod:`.answer` — a unary answer taken whole (:meth:`WorkerClient.open_answer`): the worker's
  body read to its end, passed on with its id and model name renamed, its usage read.
- :mod:`.relay` — the raw relay's fast path, its check that each relayed event is a JSON-object
  line, and the id and model rewrite.
- :mod:`.events` — the slow path: SSE events parsed into the shared chunk shape
  (:mod:`dynamo_llm.protocols.stream`).
- :mod:`.probe` — the active probe of a quarantined worker: a 1-token completion, falling back
  to what the engine offers.

The transport sits below the router and beside the engines: it uses the engine types
(:class:`~dynamo_llm.engines.base.EngineRequest`, :class:`~dynamo_llm.engines.base.EngineOutput`)
but is not an engine, and it never imports the router or the HTTP layer.
"""

from .body import upstream_body
from .client import WorkerClient, make_session
from .errors import error_from_worker
from .stream import RemoteStream

__all__ = ["RemoteStream", "WorkerClient", "error_from_worker", "make_session", "upstream_body"]
