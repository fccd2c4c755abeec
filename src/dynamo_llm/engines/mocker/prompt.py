"""The prompt of a request, as the mocker reads it: the text to encode, or the client's ids.

One place for the engine (:meth:`.engine.MockerEngine.tokenize` and ``atokenize``) and for a
frontend that routes on the mocker workers' KV events (:mod:`dynamo_llm.fleet`): the same
tokenizer and chat template give the same ids, so the frontend's block keys are the worker's.
"""

from __future__ import annotations

from ...errors import InvalidRequest
from ..base import EngineRequest
from .tokens import MockTokenizer, render_chat


def prompt_of(tokenizer: MockTokenizer, request: EngineRequest) -> str | list[int]:
    """The text to encode (a chat rendered with the mocker's template), or the client's token
    ids (checked, copied); raises ``InvalidRequest`` for a prompt the mocker refuses."""
    if request.endpoint == "chat_completions":
        return render_chat(
            request.messages,
            add_generation_prompt=request.add_generation_prompt,
            continue_final=request.continue_final_message,
        )
    prompt = request.prompt
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(type(t) is int for t in prompt):
        problem = tokenizer.check_ids(prompt)
        if problem is not None:
            raise InvalidRequest(problem, param="prompt")
        return list(prompt)
    raise InvalidRequest("The prompt must be a string or a list of token ids", param="prompt")
