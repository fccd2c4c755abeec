"""The mocker: a simulated vLLM-like engine running in injected (possibly fake) time.

- :mod:`.config` — :class:`MockerConfig`, the knobs (Dynamo's mocker names and defaults).
- :mod:`.engine` — :class:`MockerEngine`, the :class:`~dynamo_llm.engines.base.Engine`.
- :mod:`.scheduler` — the pass loop (batching, chunked prefill, preemption) and
  :class:`MockerSnapshot`.
- :mod:`.kv` — the KV block pool with prefix caching.
- :mod:`.timing` — the prefill and decode time formulas.
- :mod:`.tokens` — tokenizers, the chat template and the deterministic next-token function.
- :mod:`.sequence` — one request's state: tokens, text, stop strings, output channel.
- :mod:`.metrics` — :class:`MockerMetrics`, the scheduler state in ``/metrics`` at scrape time.
"""

from .config import MockerConfig
from .engine import MockerEngine
from .metrics import MockerMetrics
from .scheduler import MockerSnapshot
from .timing import decode_ms, prefill_ms

__all__ = [
    "MockerConfig",
    "MockerEngine",
    "MockerMetrics",
    "MockerSnapshot",
    "decode_ms",
    "prefill_ms",
]
