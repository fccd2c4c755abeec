"""The mocker's knobs, read once into a frozen dataclass.

Names and defaults follow Dynamo's mocker (``MockEngineArgs``), which follow vLLM's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MockerConfig:
    """Parameters of one simulated engine.

    - ``num_gpu_blocks`` * ``block_size`` is the KV cache, in tokens.
    - ``max_num_seqs`` bounds the running batch; ``max_num_batched_tokens`` bounds the tokens
      computed in one pass (decode tokens count 1 each, prefill chunks their length).
    - ``enable_chunked_prefill``: a prompt longer than the pass's remaining token budget is
      prefilled over several passes. Without it a prompt is prefilled in one pass, admitted only
      when it fits the remaining budget (or alone, when it is larger than the whole budget).
    - ``speedup_ratio`` divides every pass's time; ``decode_speedup_ratio`` additionally divides
      the decode part.
    - ``context_length`` is the model's context window (prompt + completion). 8192 is the window
      of the Llama-3-8B class of models a laptop deployment usually stands in for. The window
      the engine enforces is never larger than the KV cache itself
      (:attr:`effective_context_length`), so any single admitted request can always run alone.
    - ``seed`` seeds the deterministic next-token function when the request carries no ``seed``.
    - ``tokenizer`` is a path to a Hugging Face ``tokenizer.json``; None selects the built-in
      deterministic word tokenizer.
    """

    num_gpu_blocks: int = 16384
    block_size: int = 64
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    speedup_ratio: float = 1.0
    decode_speedup_ratio: float = 1.0
    context_length: int = 8192
    seed: int = 0
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "num_gpu_blocks",
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "context_length",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("speedup_ratio", "decode_speedup_ratio"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def effective_context_length(self) -> int:
        """The context window enforced: ``context_length`` capped by the KV cache's tokens."""
        return min(self.context_length, self.num_gpu_blocks * self.block_size)
