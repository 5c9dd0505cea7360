"""`ternchat serve`: one process serving a web chat page and an OpenAI-compatible HTTP API for a run.

Endpoints (FastAPI on uvicorn, bound to 127.0.0.1 unless told otherwise):
- `GET /`: the chat page (eval/chat_page.html): streamed replies, a stop button, temperature, top-k and max
  tokens. A pretrained run has no chat format, so the page then continues each prompt through /v1/completions.
- `POST /v1/chat/completions` and `POST /v1/completions`: OpenAI's request and response shapes, streamed as
  server-sent events (`stream: true`, chunks then `data: [DONE]`) or whole. `top_k` is accepted as an
  extension. Chat requests are rendered in the chat format of data/chat.py and end at <|assistant_end|>.
- `GET /v1/models`: the one model served.
Bad input gets a 4xx with OpenAI's error body (`{"error": {"message", "type", "param", "code"}}`): malformed
JSON or fields (400), a prompt longer than the model's context (400), max_tokens above the server's limit
(400), a body over the size limit (413), an unknown path (404). Requests take turns on the model token by token; a
streamed request whose client goes away stops after the token in flight. Text is streamed through an incremental UTF-8 decoder, so a character split
across tokens is sent whole.
"""

# No `from __future__ import annotations` here: FastAPI reads the request models from the endpoints'
# annotations, and those models are defined inside create_app (pydantic and FastAPI stay optional imports).
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

from ternchat.data.chat import completion_prompt
from ternchat.data.errors import DataError
from ternchat.data.tokenizer import Tokenizer
from ternchat.eval.chat import Sampling, StopText, stream_text
from ternchat.eval.decode_step import CompiledStep, prepare_decoding
from ternchat.eval.engine import generate
from ternchat.model.gpt import GPT

PAGE = Path(__file__).with_name("chat_page.html")


@dataclass
class Limits:
    max_tokens: int = 1024  # the most tokens one request may ask for
    max_body_bytes: int = 1 << 20
    max_messages: int = 256


class RequestError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass
class Outcome:
    completion_tokens: int = 0
    finish_reason: str = "length"


class Generator:
    """The served model: prompts in, text pieces out; requests take turns token by token."""

    def __init__(self, model: GPT, tok: Tokenizer, chat_format: bool, name: str, limits: Limits,
                 compiled_step: CompiledStep | None = None):
        self.model, self.tok, self.chat_format, self.name, self.limits = model, tok, chat_format, name, limits
        self.compiled_step = compiled_step
        self.speculative = getattr(model, "mtp", None) is not None
        self.lock = threading.Lock()

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        try:
            return completion_prompt(messages, self.tok)
        except DataError as e:
            raise RequestError(400, str(e), "messages") from None

    def check(self, prompt: list[int], max_tokens: int, prompt_field: str) -> None:
        context = self.model.shape.seq_len
        if len(prompt) >= context:
            raise RequestError(400, f"the prompt is {len(prompt)} tokens; this model's context is {context} tokens, "
                                    f"so at most {context - 1} can be prompt", prompt_field, "context_length_exceeded")
        if max_tokens > self.limits.max_tokens:
            raise RequestError(400, f"max_tokens is {max_tokens}; this server allows at most {self.limits.max_tokens}",
                               "max_tokens")

    def pieces(self, prompt: list[int], stop_ids: list[int], stops: list[str], params: Sampling,
               outcome: Outcome) -> Iterator[str]:
        """The generated text, piece by piece; `outcome` learns the token count and why it ended. The model is
        held for one token at a time, never across a yield, so concurrent requests take turns token by token
        and a generator abandoned by a client that left (and not yet collected) holds nothing."""
        tokens = generate(self.model, prompt, params.max_tokens, temperature=params.temperature, top_k=params.top_k,
                          top_p=params.top_p, seed=params.seed, stop_ids=stop_ids, speculative=self.speculative,
                          compiled_step=self.compiled_step)

        def counted() -> Iterator[int]:
            while True:
                with self.lock:
                    token = next(tokens, None)
                if token is None:
                    break
                outcome.completion_tokens += 1
                yield token
            ended_early = outcome.completion_tokens < params.max_tokens
            if ended_early and len(prompt) + outcome.completion_tokens < self.model.shape.seq_len:
                outcome.finish_reason = "stop"  # a stop token, not the context's end

        stop_text = StopText(stops)
        yield from stop_text.cut(stream_text(counted(), self.tok))
        if stop_text.hit:
            outcome.finish_reason = "stop"


# --- the HTTP app ---------------------------------------------------------------------------------


def create_app(engine: Generator) -> Any:
    """The FastAPI application serving `engine`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException

    limits = engine.limits

    class TextPart(BaseModel):
        type: Literal["text"]
        text: str

    class Message(BaseModel):
        model_config = ConfigDict(extra="ignore")
        role: Literal["system", "user", "assistant"]
        content: str | list[TextPart]

        def text(self) -> str:
            return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    class SamplingFields(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str | None = None
        max_tokens: int | None = Field(None, ge=1)
        temperature: float = Field(1.0, ge=0, le=2)
        top_p: float = Field(1.0, gt=0, le=1)
        top_k: int = Field(0, ge=0, description="extension: sample from the k most likely tokens; 0 = off")
        seed: int | None = None
        stop: str | list[str] | None = Field(None, description="up to 4 stop strings")
        n: int = Field(1, ge=1, le=1, description="one choice per request")
        stream: bool = False
        stream_options: dict | None = None

        def stops(self) -> list[str]:
            stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
            if len(stops) > 4:
                raise RequestError(400, f"stop has {len(stops)} strings; at most 4", "stop")
            return stops

        def include_usage(self) -> bool:
            return bool((self.stream_options or {}).get("include_usage"))

    class ChatRequest(SamplingFields):
        messages: list[Message] = Field(min_length=1, max_length=limits.max_messages)
        max_completion_tokens: int | None = Field(None, ge=1)

    class CompletionRequest(SamplingFields):
        prompt: str

    app = FastAPI(title="ternchat", docs_url=None, redoc_url=None)

    def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)

    @app.exception_handler(RequestError)
    async def on_request_error(_: Request, e: RequestError) -> JSONResponse:
        return error(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        if first["type"] == "json_invalid":
            return error(400, "the request body is not valid JSON", None, "invalid_json")
        return error(400, f"{where or 'body'}: {first['msg']}", where or None)

    @app.exception_handler(HTTPException)
    async def on_http(_: Request, e: HTTPException) -> JSONResponse:
        return error(e.status_code, str(e.detail))

    @app.middleware("http")
    async def body_limit(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            return error(413, f"the request body is {length} bytes; this server accepts at most "
                              f"{limits.max_body_bytes}", None, "request_too_large")
        return await call_next(request)

    def max_tokens_of(request: SamplingFields, *extra: int | None) -> int:
        asked = next((m for m in (*extra, request.max_tokens) if m is not None), None)
        return asked if asked is not None else min(limits.max_tokens, engine.model.shape.seq_len)

    def respond(request: SamplingFields, prompt: list[int], max_tokens: int, stop_ids: list[int], chat: bool):
        engine.check(prompt, max_tokens, "messages" if chat else "prompt")
        stops = request.stops()
        created, ident = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        kind = "chat.completion" if chat else "text_completion"
        outcome = Outcome()
        params = Sampling(max_tokens, request.temperature, request.top_k, request.top_p, request.seed)
        pieces = engine.pieces(prompt, stop_ids, stops, params, outcome)

        def usage() -> dict:
            return {"prompt_tokens": len(prompt), "completion_tokens": outcome.completion_tokens,
                    "total_tokens": len(prompt) + outcome.completion_tokens}

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            delta = {} if text is None else {"content": text}
            if first:
                delta = {"role": "assistant", "content": ""}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        if not request.stream:
            text = "".join(pieces)
            body = {"id": ident, "object": kind, "created": created, "model": engine.name, "usage": usage()}
            body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                "finish_reason": outcome.finish_reason} if chat else choice(text, outcome.finish_reason)]
            return JSONResponse(body)

        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list[dict], **extra: Any) -> str:
            body = {"id": ident, "object": chunk_kind, "created": created, "model": engine.name, "choices": choices}
            return f"data: {json.dumps({**body, **extra})}\n\n"

        def events() -> Iterator[str]:
            if chat:
                yield event([choice(None, None, first=True)])
            for piece in pieces:
                yield event([choice(piece, None)])
            yield event([choice(None if chat else "", outcome.finish_reason)])
            if request.include_usage():
                yield event([], usage=usage())
            yield "data: [DONE]\n\n"

        return StreamingResponse(_closing(events(), pieces), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/")
    def page() -> HTMLResponse:
        settings = {"chatFormat": engine.chat_format, "model": engine.name, "maxTokensLimit": limits.max_tokens,
                    "context": engine.model.shape.seq_len}
        return HTMLResponse(PAGE.read_text().replace("/*SETTINGS*/{}", json.dumps(settings)))

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0, "owned_by": "ternchat",
                                            "chat_format": engine.chat_format,
                                            "context_length": engine.model.shape.seq_len}]}

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatRequest):
        if not engine.chat_format:
            raise RequestError(400, f"{engine.name} is a pretrained run without the chat format; use /v1/completions "
                                    "(or serve with --chat to force the format)", "messages", "no_chat_format")
        prompt = engine.chat_prompt([{"role": m.role, "content": m.text()} for m in request.messages])
        stop_ids = [engine.tok.special("<|assistant_end|>"), engine.tok.eod_id]
        return respond(request, prompt, max_tokens_of(request, request.max_completion_tokens), stop_ids, chat=True)

    @app.post("/v1/completions")
    def completions(request: CompletionRequest):
        if not request.prompt:
            raise RequestError(400, "prompt is empty", "prompt")
        prompt = engine.tok.encode(request.prompt)
        return respond(request, prompt, max_tokens_of(request), [engine.tok.eod_id], chat=False)

    return app


async def _closing(events: Iterator[str], pieces: Iterator[str]):
    """Stream `events` from a worker thread, a token at a time; close both generators when the stream ends or is
    cancelled because the client went away."""
    import anyio

    done = object()
    try:
        while True:
            item = await anyio.to_thread.run_sync(next, events, done)
            if item is done:
                return
            yield item
    finally:
        events.close()
        pieces.close()


def serve(model: GPT, tok: Tokenizer, name: str, chat: bool, host: str, port: int, limits: Limits,
          kernel: str = "auto", compile: bool = False) -> None:
    """Serve a loaded model until interrupted."""
    import uvicorn

    app = create_app(Generator(model, tok, chat, name, limits, prepare_decoding(model, kernel, compile)))
    print(f"serving {name} ({'chat format' if chat else 'completion: a pretrained run'}) on http://{host}:{port}/ "
          f"(OpenAI API at http://{host}:{port}/v1)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
