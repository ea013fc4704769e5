"""The HTTP API: OpenAI's chat and completion endpoints (JSON, or server-sent events with
``stream: true``), the authors' ``POST /`` (ChatGLM-6B's ``api.py``), ``/v1/models`` and
``/health``, over one continuous-batching :class:`~glm_jax.serving.engine.Engine`.

* ``/v1/chat/completions``: ``messages`` become the model's own prompt: ChatGLM-6B's
  multi-round format (``glm_jax.data.chat.chat_prompt``: earlier user/assistant pairs as
  history, a system message prefixed to the first question), or for other models the
  messages' text joined by newlines and continued.
* ``/v1/completions``: ``prompt`` continued (``text [gMASK] <sop>``); a list of token ids
  is taken as the text's encoding and gets the same ending.
* Parameters: ``max_tokens``, ``temperature`` (0: greedy), ``top_p``, ``stop`` (strings; the
  answer is cut before the first and the request stops), ``n`` (1 only), ``seed``; with
  ``stream: true``, ``stream_options: {"include_usage": true}`` adds OpenAI's last chunk
  with the token counts.
* ``POST /``: ``{prompt, history, max_length, top_p, temperature}`` ->
  ``{response, history, status, time}`` as the authors' ``api.py`` answers
  (``max_length`` counts the prompt's tokens too, as their ``chat()`` does).

Errors are OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad
parameter or a prompt too long, 429 when the queue is full. A client that disconnects
cancels its request, which frees its slot.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Optional, Union

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from glm_jax.config import ConfigError
from glm_jax.data.chat import chat_prompt
from glm_jax.inference.sampling import Sampling
from glm_jax.serving import page
from glm_jax.serving.engine import Engine, QueueFull, Request


class Message(BaseModel):
    role: str
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None


class ChatBody(_Common):
    messages: list[Message]


class CompletionBody(_Common):
    prompt: Union[str, list[int]]


class AuthorsBody(BaseModel):
    prompt: str
    history: list[list[str]] = []
    max_length: Optional[int] = None
    top_p: float = Field(default=0.7, gt=0.0, le=1.0)
    temperature: float = Field(default=0.95, ge=0.0, le=2.0)


class BadRequest(ValueError):
    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


def _error(status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


class Detokenizer:
    """New text as tokens arrive: the decoded prefix grows, and what is new is handed on;
    text is held back while it ends in an incomplete character or a possible stop string."""

    def __init__(self, decode, stops: list[str]):
        self.decode, self.stops = decode, [s for s in stops if s]
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False

    def push(self, ids: list[int], final: bool) -> str:
        self.ids.extend(ids)
        text = self.decode(self.ids)
        for s in self.stops:
            at = text.find(s)
            if at >= 0:
                self.stopped = True
                text = text[:at]
        if not final and not self.stopped:
            hold = 1 if text.endswith("\ufffd") else 0
            for s in self.stops:  # a stop string may be starting at the end
                for k in range(len(s) - 1, 0, -1):
                    if text.endswith(s[:k]):
                        hold = max(hold, k)
                        break
            text = text[: len(text) - hold]
        new = text[self.sent:] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return new


def create_app(engine: Engine, text, *, model_name: str = "glm_jax", default_max_tokens: int = 256) -> FastAPI:
    """The ASGI app over a started ``engine`` and the model's ``text``
    (``glm_jax.inference.text.PromptText``)."""
    app = FastAPI(title="glm_jax", version="1")
    cfg = engine.cfg
    chat_format = cfg.position_encoding == "rotary_2d"  # ChatGLM-6B's multi-round prompt
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", where)

    @app.exception_handler(BadRequest)
    async def _bad(request, exc: BadRequest):
        return _error(400, str(exc), exc.param)

    @app.exception_handler(ConfigError)
    async def _config(request, exc: ConfigError):
        return _error(400, str(exc))

    @app.exception_handler(QueueFull)
    async def _full(request, exc: QueueFull):
        return _error(429, f"the server is busy: {exc}; retry later", kind="rate_limit_error")

    @app.get("/health")
    async def health():
        return {"status": "ok" if engine.error is None else f"error: {engine.error}", "active_slots": engine.active,
                "queued": engine.queued, "slots": engine.n_slots}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "glm_jax"}]}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return page.HTML

    def sampling(body: Any) -> Sampling:
        if body.n != 1:
            raise BadRequest(f"n={body.n}: this server returns one choice per request (n=1)", "n")
        seed = 0 if body.seed is None else int(body.seed)
        if body.temperature == 0:
            return Sampling(seed=seed)
        return Sampling(greedy=False, temperature=body.temperature, top_p=body.top_p, seed=seed)

    def budget(prompt_ids: list[int], asked: Optional[int], param: str) -> int:
        room = engine.length - len(prompt_ids)
        if room < 1:
            raise BadRequest(f"the prompt is {len(prompt_ids)} tokens; this server takes at most {engine.length - 1} "
                             "with room for an answer", param)
        if asked is None:
            return min(default_max_tokens, room)
        if asked > room:
            raise BadRequest(f"max_tokens={asked}, but the prompt of {len(prompt_ids)} tokens leaves room for "
                             f"{room} (prompt and answer share {engine.length} tokens)", "max_tokens")
        return asked

    def chat_ids(messages: list[Message]) -> list[int]:
        if not messages or messages[-1].role != "user":
            raise BadRequest("messages must end with a user message", "messages")
        bad = [m.role for m in messages if m.role not in ("system", "user", "assistant")]
        if bad:
            raise BadRequest(f"role {bad[0]!r} is not one of system, user, assistant", "messages")
        if not chat_format:
            return text.prompt_ids("\n".join(m.content for m in messages))
        system = "\n".join(m.content for m in messages if m.role == "system")
        turns = [m for m in messages if m.role != "system"]
        history, pending = [], None
        for m in turns[:-1]:
            if m.role == "user":
                pending = m.content
            elif pending is not None:
                history.append((pending, m.content))
                pending = None
        query = turns[-1].content
        if system:
            if history:
                history[0] = (system + "\n" + history[0][0], history[0][1])
            else:
                query = system + "\n" + query
        return text.prompt_ids(chat_prompt(history, query))

    def generate(prompt_ids: list[int], max_tokens: int, s: Sampling, http: HttpRequest, stops: list[str],
                 counted: Optional[list] = None):
        """Queue the request now (a full queue raises here, before any response starts) and
        return an async iterator of (new text, finish_reason or None). The request is
        cancelled if the client goes or the iterator is dropped; ``counted`` gets the number
        of generated tokens at the end."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        request = Request(prompt_ids, max_tokens, s,
                          on_tokens=lambda ids, finish: loop.call_soon_threadsafe(queue.put_nowait, (ids, finish)))
        engine.submit(request)
        detok = Detokenizer(text.decode, stops)

        async def results():
            try:
                while True:
                    try:
                        ids, finish = await asyncio.wait_for(queue.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        if await http.is_disconnected():
                            return
                        continue
                    if finish == "error":
                        raise RuntimeError(f"the engine failed: {engine.error}")
                    new = detok.push(ids, finish is not None)
                    if detok.stopped:
                        yield new, "stop"
                        return
                    if finish is not None:
                        yield new, "stop" if finish == "stop" else "length"
                        return
                    if new:
                        yield new, None
            finally:
                if request.finish_reason is None:
                    engine.cancel(request)
                if counted is not None:
                    counted.append(len(detok.ids))

        return results()

    def token_prompt(ids: list[int]) -> list[int]:
        """A prompt given as token ids is the text's encoding: it gets what ``prompt_ids``
        adds to encoded text (``[gMASK]`` unless it holds a mask, then ``<sop>``)."""
        if not ids:
            raise BadRequest("prompt is empty", "prompt")
        bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
        if bad:
            raise BadRequest(f"prompt: token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})", "prompt")
        masks = (cfg.mask_token_id, cfg.smask_token_id, cfg.gmask_token_id)
        if not any(i in masks for i in ids):
            ids = ids + [cfg.gmask_token_id]
        elif ids[-1] not in masks:
            ids = ids + [cfg.eos_token_id]
        return ids + [cfg.sop_token_id]

    def stops_of(body) -> list[str]:
        return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])

    async def answer(http: HttpRequest, prompt_ids, body, kind: str):
        s = sampling(body)
        n = budget(prompt_ids, body.max_tokens, "messages" if kind == "chat" else "prompt")
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        stops = stops_of(body)
        base = {"id": rid, "created": int(time.time()), "model": body.model or model_name}
        counted: list = []
        stream = generate(prompt_ids, n, s, http, stops, counted)

        def usage() -> dict:
            count = counted[0] if counted else 0
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": count, "total_tokens": len(prompt_ids) + count}

        if not body.stream:
            parts, reason = [], "length"
            async for new, finish in stream:
                parts.append(new)
                reason = finish or reason
            content = "".join(parts)
            if kind == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": reason}
                return {**base, "object": "chat.completion", "choices": [choice], "usage": usage()}
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": reason}
            return {**base, "object": "text_completion", "choices": [choice], "usage": usage()}
        with_usage = body.stream_options is not None and body.stream_options.include_usage

        async def events():
            obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
            if kind == "chat":
                first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                yield f"data: {json.dumps({**base, 'object': obj, 'choices': [first]})}\n\n"
            async for new, finish in stream:
                if kind == "chat":
                    choice = {"index": 0, "delta": {"content": new} if new else {}, "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": new, "logprobs": None, "finish_reason": finish}
                extra = {"usage": None} if with_usage else {}
                yield f"data: {json.dumps({**base, 'object': obj, 'choices': [choice], **extra}, ensure_ascii=False)}\n\n"
            if with_usage:  # OpenAI's last chunk: no choices, the request's token counts
                yield f"data: {json.dumps({**base, 'object': obj, 'choices': [], 'usage': usage()})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HttpRequest):
        return await answer(http, chat_ids(body.messages), body, "chat")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HttpRequest):
        if isinstance(body.prompt, list):  # token ids: the text already encoded
            return await answer(http, token_prompt(body.prompt), body, "completion")
        if not body.prompt.strip():
            raise BadRequest("prompt is empty", "prompt")
        return await answer(http, text.prompt_ids(body.prompt), body, "completion")

    @app.post("/")
    async def authors_api(body: AuthorsBody, http: HttpRequest):
        history = [tuple(h) for h in body.history]
        if any(len(h) != 2 for h in history):
            raise BadRequest("history must be a list of [query, response] pairs", "history")
        ids = text.prompt_ids(chat_prompt(history, body.prompt)) if chat_format else text.prompt_ids(body.prompt)
        n = min(body.max_length or engine.length, engine.length) - len(ids)
        if n < 1:
            raise BadRequest(f"max_length={body.max_length or engine.length} leaves no room after the prompt's "
                             f"{len(ids)} tokens", "max_length")
        s = Sampling(greedy=False, temperature=body.temperature, top_p=body.top_p) if body.temperature > 0 else Sampling()
        parts = [new async for new, _ in generate(ids, n, s, http, [])]
        response = "".join(parts)
        return {"response": response, "history": [list(h) for h in history] + [[body.prompt, response]], "status": 200,
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}

    return app
