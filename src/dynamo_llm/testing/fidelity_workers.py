"""A fake OpenAI-compatible worker that uses every field real engines send, as a process.

::

    python -m dynamo_llm.testing.fidelity_workers --port 0 [--per-event K] [--no-usage]
        [--no-token-ids] [--hold-after K] [--tokens N] [--model NAME] [--owned-by NAME]

prints ``listening on http://127.0.0.1:<port>`` (flushed) once it accepts connections. For the
tests of what the frontend passes on from a worker (issue 9): tool calls, logprobs, reasoning,
keys of the engine's own, usage details and counts. What it generates is a script, one *piece*
per token (id ``1000 + position``); the module is long (~500 lines) because that script and
the chunks it renders for chat and completions, streamed and unary, are one piece of data:

- chat: two ``reasoning_content`` pieces when the request has ``reasoning_effort``; ``--tokens``
  content pieces ``t0 t1 ...``; with ``tools``, two tool calls (``call_0``/``fn_0``,
  ``call_1``/``fn_1``), each a delta with its id, type and name and then its arguments split
  over three deltas, one piece each, finishing with ``tool_calls``;
- completions: ``--tokens`` text pieces.

Content pieces are packed ``--per-event`` to an event, as vLLM does under load (reasoning and
tool-call pieces go one to an event). Every chunk carries ``system_fingerprint`` and
``x_engine``; every choice ``x_choice``; the finishing choice ``stop_reason``. ``logprobs``
(chat: ``logprobs``/``top_logprobs``; completions: ``logprobs``) are per piece.
``return_token_ids`` gives ``token_ids`` per choice and ``prompt_token_ids`` (on the first chunk:
chat at its top level, completions on its choice), as vLLM does, unless ``--no-token-ids``
(llama.cpp's servers have no such option). The usage chunk (unless
``--no-usage``, which is llama_cpp.server's way) has ``prompt_tokens_details`` (with
``cached_tokens`` and ``audio_tokens``), ``completion_tokens_details`` and ``x_usage``, and the
chunk carries llama.cpp's ``timings``; without ``include_usage`` the ``timings`` go on the
finishing chunk, as llama.cpp does.

A request continues a script where a migration's replay says it stopped: a token-id prompt after
its ids >= 1000, a text prompt or a final assistant message (``continue_final_message``) after
its ``tN`` words. ``--hold-after K`` stops a fresh request (not a continuation) after ``K``
events past the role chunk and waits (to be killed mid-stream). A unary request (``stream:
false``) gets the script folded by hand, as an engine's own unary answer (``prompt_token_ids``
placed as in the stream): the frontend asks for one when nothing needs the events, and the
tests compare the folded stream against it.

``--owned-by`` is what its ``/v1/models`` says serves it (``vllm``: the frontend takes it for
vLLM, whose packed events it counts by their token ids).

``GET /_record`` returns ``{"requests": [{"path", "body"}]}``; ``GET /health`` and
``GET /v1/models`` answer as a worker should. :func:`spawn_fidelity_worker` runs one for a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["FidelityWorker", "Script", "spawn_fidelity_worker"]

FINGERPRINT = "fp_fidelity"
ENGINE = {"name": "fidelity"}
CACHED = 2  # the prompt tokens the fake says it found in its cache
TOOL_ARGUMENTS = ('{"city": "Par', 'is", "days"', ": 3}")
_WORD = re.compile(r"\bt(\d+)\b")


@dataclass
class Options:
    tokens: int = 12
    per_event: int = 1
    usage: bool = True
    hold_after: int | None = None
    model: str = "fid-model"
    token_ids: bool = True
    owned_by: str = "fidelity"


@dataclass
class Piece:
    """One generated token: content text, reasoning text or a tool-call delta."""

    position: int
    kind: str  # "content", "reasoning" or "tool"
    text: str = ""
    tool: dict[str, Any] | None = None

    @property
    def id(self) -> int:
        return 1000 + self.position


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class Script:
    """What the fake generates for one request body, and how it renders it."""

    def __init__(self, options: Options, path: str, body: dict[str, Any]) -> None:
        self.options = options
        self.chat = path.endswith("/chat/completions")
        self.body = body
        self.token_ids = options.token_ids and bool(body.get("return_token_ids"))
        stream_options = body.get("stream_options") or {}
        self.include_usage = bool(stream_options.get("include_usage"))
        if self.chat:
            self.logprobs = bool(body.get("logprobs"))
            self.top = int(body.get("top_logprobs") or 0)
        else:
            self.logprobs = body.get("logprobs") is not None
            self.top = int(body.get("logprobs") or 0)
        self.prompt_ids = self._prompt_ids()
        pieces = self._pieces()
        self.start = start = self._start(pieces)
        limit = body.get("max_tokens", body.get("max_completion_tokens"))
        end = len(pieces) if limit is None else min(len(pieces), start + int(limit))
        self.pieces = pieces[start:end]
        self.finish = "length" if end < len(pieces) else self._natural_finish()
        self.created = int(time.time())
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + "fidelity"

    # --- the script ---------------------------------------------------------------------------

    def _prompt_ids(self) -> list[int]:
        prompt = self.body.get("prompt")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if isinstance(prompt, str):
            words = prompt.split()
        else:
            words = ["<s>", "<assistant>"]  # the chat template
            for message in self.body.get("messages") or ():
                content = message.get("content") if isinstance(message, dict) else None
                if isinstance(content, str):
                    words += content.split()
        return [1 + (i % 900) for i in range(len(words))]

    def _pieces(self) -> list[Piece]:
        pieces: list[Piece] = []

        def add(kind: str, text: str = "", tool: dict[str, Any] | None = None) -> None:
            pieces.append(Piece(len(pieces), kind, text, tool))

        if self.chat and self.body.get("reasoning_effort") is not None:
            add("reasoning", "hmm ")
            add("reasoning", "ok ")
        for i in range(self.options.tokens):
            add("content", f"t{i} ")
        if self.chat and self.body.get("tools"):
            for k in range(2):
                function = {"name": f"fn_{k}", "arguments": ""}
                add("tool", tool={"index": k, "id": f"call_{k}", "type": "function",
                                  "function": function})  # fmt: skip
                for fragment in TOOL_ARGUMENTS:
                    add("tool", tool={"index": k, "function": {"arguments": fragment}})
        return pieces

    def _start(self, pieces: list[Piece]) -> int:
        """Where a replay continues: after what its prompt already holds of the script."""
        prompt = self.body.get("prompt")
        if isinstance(prompt, list):
            return sum(1 for t in prompt if isinstance(t, int) and t >= 1000)
        text = prompt if isinstance(prompt, str) else ""
        if self.chat and self.body.get("continue_final_message"):
            last = (self.body.get("messages") or [{}])[-1]
            text = last.get("content") if isinstance(last.get("content"), str) else ""
        done = len(_WORD.findall(text))
        if not done:
            return 0
        first = next(p.position for p in pieces if p.kind == "content")
        return first + done

    def _natural_finish(self) -> str:
        return "tool_calls" if self.chat and self.body.get("tools") else "stop"

    # --- what each piece carries --------------------------------------------------------------

    def _chat_logprob(self, piece: Piece) -> dict[str, Any]:
        value = -0.01 * (piece.position + 1)
        top = [{"token": piece.text, "logprob": value, "bytes": list(piece.text.encode())}]
        top.append({"token": "alt", "logprob": value - 1, "bytes": list(b"alt")})
        return {
            "token": piece.text,
            "logprob": value,
            "bytes": list(piece.text.encode()),
            "top_logprobs": top[: self.top],
        }

    def _offsets(self) -> dict[int, int]:
        offsets: dict[int, int] = {}
        at = 0
        for piece in self.pieces:
            offsets[piece.position] = at
            at += len(piece.text)
        return offsets

    def _completion_logprobs(self, group: list[Piece], offsets: dict[int, int]) -> dict[str, Any]:
        values = [-0.01 * (p.position + 1) for p in group]
        return {
            "text_offset": [offsets[p.position] for p in group],
            "token_logprobs": values,
            "tokens": [p.text for p in group],
            "top_logprobs": [
                dict(list({p.text: v, "alt": v - 1}.items())[: self.top])
                for p, v in zip(group, values, strict=True)
            ],
        }

    def _usage(self) -> dict[str, Any]:
        prompt = len(self.prompt_ids)
        completion = len(self.pieces)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": min(CACHED, prompt), "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": sum(p.kind == "reasoning" for p in self.pieces)
            },
            "x_usage": "fidelity",
        }

    def _timings(self) -> dict[str, Any]:
        return {"prompt_n": len(self.prompt_ids), "predicted_n": len(self.pieces)}

    # --- streaming ----------------------------------------------------------------------------

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.options.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
            "x_engine": ENGINE,
            **extra,
        }
        return b"data: " + _dumps(chunk) + b"\n\n"

    def groups(self) -> list[list[Piece]]:
        """The pieces as events: content packed ``per_event`` together, the rest one each."""
        groups: list[list[Piece]] = []
        for piece in self.pieces:
            last = groups[-1] if groups else None
            if (
                last is not None
                and piece.kind == "content"
                and last[0].kind == "content"
                and len(last) < self.options.per_event
            ):
                last.append(piece)
            else:
                groups.append([piece])
        return groups

    def events(self) -> list[bytes]:
        """Every event of the stream, in order, but the final ``[DONE]``."""
        events: list[bytes] = []
        offsets = self._offsets()
        first = True
        if self.chat:
            extra = {"prompt_token_ids": self.prompt_ids} if self.token_ids else {}
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
            events.append(self._chunk([{**role, "finish_reason": None}], **extra))
            first = False
        for group in self.groups():
            choice: dict[str, Any] = {"index": 0}
            kind = group[0].kind
            if self.chat:
                if kind == "tool":
                    choice["delta"] = {"tool_calls": [group[0].tool]}
                else:
                    key = "content" if kind == "content" else "reasoning_content"
                    choice["delta"] = {key: "".join(p.text for p in group)}
                logprobs = None
                if self.logprobs and kind == "content":
                    logprobs = {"content": [self._chat_logprob(p) for p in group], "refusal": None}
                choice["logprobs"] = logprobs
            else:
                choice["text"] = "".join(p.text for p in group)
                choice["logprobs"] = (
                    self._completion_logprobs(group, offsets) if self.logprobs else None
                )
            choice["finish_reason"] = None
            choice["x_choice"] = "fidelity"
            if self.token_ids:
                choice["token_ids"] = [p.id for p in group]
                if first and not self.chat:
                    choice["prompt_token_ids"] = self.prompt_ids
            first = False
            events.append(self._chunk([choice]))
        finish: dict[str, Any] = {"index": 0}
        finish["delta" if self.chat else "text"] = {} if self.chat else ""
        finish.update(logprobs=None, finish_reason=self.finish, stop_reason=7, x_choice="end")
        if self.options.usage and self.include_usage:
            events.append(self._chunk([finish]))
            events.append(self._chunk([], usage=self._usage(), timings=self._timings()))
        else:
            events.append(self._chunk([finish], timings=self._timings()))
        return events

    # --- the engine's own unary answer --------------------------------------------------------

    def unary(self) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant"}
            content = "".join(p.text for p in self.pieces if p.kind == "content")
            message["content"] = content if content or not self._calls() else None
            reasoning = "".join(p.text for p in self.pieces if p.kind == "reasoning")
            if reasoning:
                message["reasoning_content"] = reasoning
            if self._calls():
                message["tool_calls"] = self._calls()
            choice["message"] = message
            content_pieces = [p for p in self.pieces if p.kind == "content"]
            choice["logprobs"] = (
                {"content": [self._chat_logprob(p) for p in content_pieces], "refusal": None}
                if self.logprobs
                else None
            )
        else:
            choice["text"] = "".join(p.text for p in self.pieces)
            choice["logprobs"] = (
                self._completion_logprobs(self.pieces, self._offsets()) if self.logprobs else None
            )
        choice["finish_reason"] = self.finish
        if self.token_ids:
            choice["token_ids"] = [p.id for p in self.pieces]
            if not self.chat:
                choice["prompt_token_ids"] = self.prompt_ids
        choice.update(x_choice="end", stop_reason=7)
        answer: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.options.model,
            "choices": [choice],
        }
        if self.token_ids and self.chat:
            answer["prompt_token_ids"] = self.prompt_ids
        if self.options.usage:
            answer["usage"] = self._usage()
        answer.update(system_fingerprint=FINGERPRINT, x_engine=ENGINE, timings=self._timings())
        return answer

    def _calls(self) -> list[dict[str, Any]]:
        calls: dict[int, dict[str, Any]] = {}
        for piece in self.pieces:
            if piece.tool is None:
                continue
            index = piece.tool["index"]
            if "id" in piece.tool:
                function = dict(piece.tool["function"])
                calls[index] = {"id": piece.tool["id"], "type": "function", "function": function}
            else:
                calls[index]["function"]["arguments"] += piece.tool["function"]["arguments"]
        return [calls[k] for k in sorted(calls)]


# --- the server ------------------------------------------------------------------------------


class _Worker:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.seen: list[dict[str, Any]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.get("/_record", self.record),
                web.get("/health", self.health),
                web.get("/v1/models", self.models),
                *(web.post(path, self.generate) for path in self.PATHS),
            ]
        )
        return app

    PATHS = ("/v1/chat/completions", "/v1/completions")

    async def record(self, request: web.Request) -> web.Response:
        return web.Response(body=_dumps({"requests": self.seen}), content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type="application/json")

    async def models(self, request: web.Request) -> web.Response:
        owner = self.options.owned_by
        card = {"id": self.options.model, "object": "model", "created": 0, "owned_by": owner}
        return web.Response(
            body=_dumps({"object": "list", "data": [card]}), content_type="application/json"
        )

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        self.seen.append({"path": request.path, "body": body})
        script = Script(self.options, request.path, body)
        if not body.get("stream"):
            return web.Response(body=_dumps(script.unary()), content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        hold = self.options.hold_after if script.start == 0 else None
        for sent, event in enumerate(script.events()):
            if hold is not None and sent == hold + (1 if script.chat else 0):
                await asyncio.Event().wait()  # held mid-stream until the test kills the process
            await resp.write(event)
        await resp.write(b"data: [DONE]\n\n")
        return resp


def _announce(port: int) -> None:
    sys.stdout.write(f"listening on http://127.0.0.1:{port}\n")
    sys.stdout.flush()


async def serve(options: Options, port: int) -> None:
    """Run the fake worker on ``127.0.0.1:port`` until the process is stopped."""
    runner = web.AppRunner(_Worker(options).app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        _announce(runner.addresses[0][1])
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dynamo_llm.testing.fidelity_workers")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=Options.tokens)
    parser.add_argument("--per-event", type=int, default=Options.per_event)
    parser.add_argument("--no-usage", action="store_true", help="never send a usage chunk")
    parser.add_argument("--no-token-ids", action="store_true", help="ignore return_token_ids")
    parser.add_argument("--hold-after", type=int, default=None)
    parser.add_argument("--model", default=Options.model)
    parser.add_argument(
        "--owned-by",
        default=Options.owned_by,
        help="its /v1/models' owned_by (vllm: the frontend asks it for token ids to count)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    options = Options(
        args.tokens,
        args.per_event,
        not args.no_usage,
        args.hold_after,
        args.model,
        not args.no_token_ids,
        args.owned_by,
    )
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(options, args.port))


# --- the test helper -----------------------------------------------------------------------------


@dataclass
class FidelityWorker:
    """A running fake worker process: its ``url`` and ``proc``, and its options."""

    options: Options
    url: str = ""
    proc: asyncio.subprocess.Process | None = field(default=None, repr=False)

    def script(self, path: str, body: dict[str, Any]) -> Script:
        """What this worker generates for ``body`` (for the test's expectations)."""
        return Script(self.options, path, body)

    async def kill(self) -> None:
        """SIGKILL the process (if it still runs) and reap it."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.communicate()


@contextlib.asynccontextmanager
async def spawn_fidelity_worker(
    *,
    tokens: int = Options.tokens,
    per_event: int = Options.per_event,
    usage: bool = True,
    hold_after: int | None = None,
    model: str = Options.model,
    token_ids: bool = True,
    owned_by: str = Options.owned_by,
    ready_within: float = 30.0,
) -> AsyncIterator[FidelityWorker]:
    """Run a fake worker process for the body of the ``async with``; killed and reaped after."""
    options = Options(tokens, per_event, usage, hold_after, model, token_ids, owned_by)
    args = ["--tokens", str(tokens), "--per-event", str(per_event), "--model", model]
    args += ["--owned-by", owned_by]
    if not usage:
        args.append("--no-usage")
    if not token_ids:
        args.append("--no-token-ids")
    if hold_after is not None:
        args += ["--hold-after", str(hold_after)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", __name__, *args, stdout=asyncio.subprocess.PIPE
    )
    worker = FidelityWorker(options, proc=proc)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(ready_within):
            line = (await proc.stdout.readline()).decode().strip()
        if not line.startswith("listening on "):
            raise RuntimeError(f"the fidelity worker did not start: {line!r}")
        worker.url = line.removeprefix("listening on ")
        yield worker
    finally:
        await worker.kill()


if __name__ == "__main__":
    main()
