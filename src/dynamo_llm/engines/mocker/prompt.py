"""The prompt token ids of a request, as the mocker computes them.

One function for the engine (:meth:`.engine.MockerEngine.tokenize`) and for a frontend that
routes on the mocker workers' KV events (:mod:`dynamo_llm.router.kv_events`): the same
tokenizer and chat template give the same ids, so the frontend's block keys are the worker's.
"""

from __future__ import annotations

from ...errors import InvalidRequest
from ..base import EngineRequest
from .tokens import MockTokenizer, render_chat


def prompt_token_ids(tokenizer: MockTokenizer, request: EngineRequest) -> list[int]:
    """The prompt token ids the mocker computes for ``request``; raises ``InvalidRequest`` for
    a prompt it would refuse."""
    if request.endpoint == "chat_completions":
        text = render_chat(
            request.messages,
            add_generation_prompt=request.add_generation_prompt,
            continue_final=request.continue_final_message,
        )
        return tokenizer.encode(text)
    prompt = request.prompt
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and all(type(t) is int for t in prompt):
        problem = tokenizer.check_ids(prompt)
        if problem is not None:
            raise InvalidRequest(problem, param="prompt")
        return list(prompt)
    raise InvalidRequest("The prompt must be a string or a list of token ids", param="prompt")
