"""The frontend's tokenization: a model's chat template and tokenizer, applied as its engine does.

``--tokenizer [MODEL=]PATH`` (a Hugging Face model folder) gives a routed frontend the prompt's
token ids: :class:`ModelTokenizer` renders a chat with the model's template (:mod:`.template`,
vLLM 0.32's semantics) and encodes it, reusing the ids of prefixes it encoded before
(:mod:`.prefix`). The router uses them for precise ``kv`` routing, the context-length check
before dispatch, and ``input_sequence_tokens``.
"""

from .model import THREAD_CHARS, ModelTokenizer
from .prefix import PrefixCache
from .template import ChatTemplate, Untokenizable

__all__ = ["THREAD_CHARS", "ChatTemplate", "ModelTokenizer", "PrefixCache", "Untokenizable"]
