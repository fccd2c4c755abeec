"""The mocker's timing model (Dynamo's polynomial fits of vLLM on one GPU).

One pass lasts ``prefill + decode``:

- prefill ms = 4.209989e-7·t² + 1.518344e-2·t + 16.50142, for ``t`` new (uncached) prompt tokens
  computed in the pass, and 0 when there are none;
- decode ms = max(1, -25.74·u² + 54.01·u + 5.74), with ``u`` the fraction of KV blocks in use,
  and 0 when no request emits a token at the end of the pass (a pass that only advances a
  chunked prefill has no decode step).

Prefill is divided by ``speedup_ratio``, decode by ``speedup_ratio * decode_speedup_ratio``.
"""

from __future__ import annotations

from .config import MockerConfig


def prefill_ms(new_tokens: int) -> float:
    """Milliseconds to prefill ``new_tokens`` prompt tokens in one pass (0 for none)."""
    if new_tokens <= 0:
        return 0.0
    t = float(new_tokens)
    return 4.209989e-7 * t * t + 1.518344e-2 * t + 16.50142


def decode_ms(kv_utilisation: float) -> float:
    """Milliseconds of one decode step at the given KV-block utilisation (0..1)."""
    u = kv_utilisation
    return max(1.0, -25.74 * u * u + 54.01 * u + 5.74)


def pass_seconds(
    config: MockerConfig, prefill_tokens: int, emits: bool, kv_utilisation: float
) -> float:
    """Duration of one pass, in seconds, with the config's speed-up ratios applied."""
    seconds = prefill_ms(prefill_tokens) / 1000.0 / config.speedup_ratio
    if emits:
        seconds += (
            decode_ms(kv_utilisation)
            / 1000.0
            / (config.speedup_ratio * config.decode_speedup_ratio)
        )
    return seconds
