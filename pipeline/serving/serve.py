"""The HTTP layer: OpenAI-compatible routes over the continuous-batching engine.

`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true`
as Server-Sent Events in OpenAI's chunk format, ending with `data: [DONE]`), `GET /health` and
`GET /metrics` (Prometheus text). Every client mistake is a 4xx with an OpenAI-style
`{"error": {...}}` body; a full queue is 429 with `Retry-After`; a client that goes away frees
its slot. This module knows requests, text and tokens; the model lives behind `Engine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import threading
import time
import uuid
from signal import SIGINT, SIGTERM
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.inference.generate import Sampling
from pipeline.serving.engine import Engine, QueueFullError
from pipeline.serving.engine import Request as EngineRequest

log = logging.getLogger(__name__)
MAX_STOP_SEQUENCES = 4


class APIError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers: dict[str, str] = {}


def error_body(message: str, status: int, param: str | None = None, code: str | None = None):
    kind = {
        401: "authentication_error",
        404: "not_found_error",
        429: "rate_limit_error",
    }.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: StrictInt | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(0, ge=0)  # an extension (as in vLLM); 0: off
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    n: StrictInt = 1
    best_of: StrictInt | None = None
    logprobs: Any = None
    echo: StrictBool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[StrictInt]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: StrictBool | None = None


class Metrics:
    """Prometheus metrics of one server (its own registry)."""

    def __init__(self, engine: Engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "pipeline_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("pipeline_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generated_tokens = Counter("pipeline_generated_tokens", "Tokens generated", registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.ttft = Histogram(
            "pipeline_time_to_first_token_seconds",
            "Submission to first token",
            registry=r,
            buckets=buckets,
        )
        self.itl = Histogram(
            "pipeline_inter_token_latency_seconds",
            "Between two tokens of a request",
            registry=r,
            buckets=buckets,
        )
        queue = Gauge("pipeline_queue_depth", "Requests waiting for a slot", registry=r)
        queue.set_function(lambda: engine.queue_depth)
        busy = Gauge("pipeline_busy_slots", "Slots decoding a request", registry=r)
        busy.set_function(lambda: engine.busy_slots)
        Gauge("pipeline_slots", "Decode slots", registry=r).set(engine.num_slots)

    def observe(self, name: str, value: float) -> None:
        """The engine's hook (called from the engine thread)."""
        if name == "prompt_tokens":
            self.prompt_tokens.inc(value)
        elif name == "ttft":
            self.ttft.observe(value)
            self.generated_tokens.inc()
        elif name == "itl":
            self.itl.observe(value)
            self.generated_tokens.inc()


class TextStream:
    """Incremental detokenisation with stop sequences.

    `push(token)` returns the text that is safe to send: never half a UTF-8 character, and never
    text that could still turn out to begin a stop sequence. `stopped` is set when one matched;
    the text sent then ends right before it.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already returned
        self.text = ""
        self.stopped = False

    def push(self, token: int | None, final: bool = False) -> str:
        if token is not None:
            self.ids.append(token)
            self.text = self.tokenizer.decode(self.ids)
        text = self.text
        for stop in self.stop:
            at = text.find(stop, max(0, self.sent - len(stop) + 1))
            if at != -1:
                self.stopped = True
                self.text = text = text[:at]
        end = len(text)
        if not (final or self.stopped):
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its end
                end -= 1
            for stop in self.stop:  # hold back a tail that may begin a stop sequence
                for k in range(min(len(stop) - 1, end), 0, -1):
                    if text[:end].endswith(stop[:k]):
                        end -= k
                        break
        end = max(end, self.sent)
        out, self.sent = text[self.sent : end], end
        return out


def create_app(
    engine: Engine,
    tokenizer,
    model_name: str,
    api_key: str | None = None,
    max_tokens_limit: int | None = None,
    default_max_tokens: int = 16,
    max_body_bytes: int = 1 << 20,
) -> FastAPI:
    """The ASGI app. The engine must be started (and warmed up) by the caller."""
    from pipeline.tokenizer import prompt_ids

    app = FastAPI(title="pipeline", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(engine)
    engine.observe = metrics.observe
    limit = min(max_tokens_limit or engine.max_len, engine.max_len)
    state = {"accepting": True}
    app.state.metrics, app.state.serving = metrics, state

    def respond_error(err: APIError) -> JSONResponse:
        return JSONResponse(
            error_body(err.message, err.status, err.param, err.code),
            status_code=err.status,
            headers=err.headers,
        )

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return respond_error(err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {"msg": "invalid request", "loc": ()}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
        else:
            message = f"{'.'.join(loc) or 'body'}: {first['msg']}"
        return respond_error(APIError(400, message, ".".join(loc) or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err: StarletteHTTPException):
        return respond_error(APIError(err.status_code, str(err.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request, err: Exception):
        log.exception("unexpected error")
        return respond_error(APIError(500, f"internal error: {type(err).__name__}"))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if path.startswith("/v1"):
            if api_key and not _authorised(request, api_key):
                return respond_error(
                    APIError(
                        401,
                        "missing or wrong API key (Authorization: Bearer KEY)",
                        code="invalid_api_key",
                    )
                )
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > max_body_bytes:
                return respond_error(
                    APIError(413, f"the body is {length} bytes; the limit is {max_body_bytes}")
                )
        response = await call_next(request)
        if path.startswith("/v1"):
            metrics.requests.labels(path, str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health():
        if not state["accepting"]:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok", "busy_slots": engine.busy_slots, "queue_depth": engine.queue_depth}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry).decode())

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "pipeline"}],
        }

    def check(body: _Sampling) -> tuple[int, Sampling, list[str]]:
        if body.model != model_name:
            raise APIError(
                404,
                f"model {body.model!r} does not exist; this server has {model_name!r}",
                "model",
                "model_not_found",
            )
        if body.n != 1 or (body.best_of or 1) != 1:
            raise APIError(400, "only n=1 (and best_of=1) is supported", "n")
        for name in ("echo", "presence_penalty", "frequency_penalty", "logit_bias"):
            if getattr(body, name):
                raise APIError(400, f"{name} is not supported", name)
        if body.logprobs:
            raise APIError(400, "logprobs is not supported", "logprobs")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP_SEQUENCES:
            raise APIError(400, f"at most {MAX_STOP_SEQUENCES} stop sequences", "stop")
        max_tokens = default_max_tokens if body.max_tokens is None else body.max_tokens
        if not 1 <= max_tokens <= limit:
            raise APIError(400, f"max_tokens must be 1..{limit}, got {max_tokens}", "max_tokens")
        seed = body.seed if body.seed is not None else uuid.uuid4().int % (1 << 31)
        if not 0 <= seed < 1 << 32:
            raise APIError(400, "seed must be in [0, 2**32)", "seed")
        return max_tokens, Sampling(body.temperature, body.top_k, body.top_p, seed), stop

    async def run(request: Request, body: _Sampling, ids: list[int], chat: bool):
        if not state["accepting"]:
            raise APIError(503, "the server is shutting down")
        max_tokens, sampling, stop = check(body)
        if not ids:
            raise APIError(400, "the prompt is empty", "messages" if chat else "prompt")
        if len(ids) + max_tokens > engine.max_len:
            raise APIError(
                400,
                f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                f"context of {engine.max_len} tokens",
                "max_tokens" if len(ids) < engine.max_len else ("messages" if chat else "prompt"),
                "context_length_exceeded",
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop_ids = ({tokenizer.eos_id} | ({tokenizer.end_id} if chat else set())) - {None}
        job = EngineRequest(
            prompt=ids,
            max_tokens=max_tokens,
            sampling=sampling,
            stop_ids=frozenset(stop_ids),
            emit=lambda token, reason: loop.call_soon_threadsafe(queue.put_nowait, (token, reason)),
        )
        try:
            engine.submit(job)
        except QueueFullError as err:
            error = APIError(429, f"the server is busy ({err}); retry shortly")
            error.headers["Retry-After"] = "1"
            raise error from None
        except ValueError as err:
            raise APIError(400, str(err)) from None
        meta = {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
            "created": int(time.time()),
            "model": model_name,
        }
        text = TextStream(tokenizer, stop)

        async def tokens():
            """(text delta, finish reason or None) until the request ends; cancels on exit."""
            finished = False
            try:
                while True:
                    token, reason = await queue.get()
                    if reason is not None:
                        finished = True
                        tail = text.push(None if reason == "stop" else token, final=True)
                        yield tail, "length" if reason == "length" else "stop"
                        return
                    delta = text.push(token)
                    if text.stopped:
                        engine.cancel(job)
                        finished = True
                        yield delta, "stop"
                        return
                    yield delta, None  # one chunk per token, even while text is held back
            finally:
                if not finished:
                    engine.cancel(job)

        usage = lambda: {  # noqa: E731
            "prompt_tokens": len(ids),
            "completion_tokens": job.generated,
            "total_tokens": len(ids) + job.generated,
        }
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                _sse(tokens(), meta, chat, include_usage, usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        pieces, finish = [], "stop"
        async for delta, reason in tokens():
            pieces.append(delta)
            finish = reason or finish
        content = "".join(pieces)
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish,
                "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": content, "finish_reason": finish, "logprobs": None}
        return {
            **meta,
            "object": "chat.completion" if chat else "text_completion",
            "choices": [choice],
            "usage": usage(),
        }

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request (a list of one string)", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt)
        else:
            if any(not 0 <= t < tokenizer.vocab_size for t in prompt):
                raise APIError(400, f"token ids must be in [0, {tokenizer.vocab_size})", "prompt")
            ids = list(prompt)
        return await run(request, body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        messages = [m.model_dump() for m in body.messages]
        return await run(request, body, prompt_ids(tokenizer, messages), chat=True)

    return app


def _authorised(request: Request, api_key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), api_key)


async def _sse(tokens, meta: dict, chat: bool, include_usage: bool, usage):
    """OpenAI's streaming chunks as Server-Sent Events, then `data: [DONE]`."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            body = {"content": delta} if delta is not None else {}
            if first:
                body = {"role": "assistant", "content": ""}
            choice = {"index": 0, "delta": body, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        out = {**meta, "object": kind, "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return f"data: {json.dumps(out)}\n\n"

    if chat:
        yield chunk(None, None, first=True)
    async for delta, finish in tokens:
        if delta or not finish:
            yield chunk(delta, None)
        if finish:
            yield chunk(None if chat else "", finish)
    if include_usage:
        yield f"data: {json.dumps({**meta, 'object': kind, 'choices': [], 'usage': usage()})}\n\n"
    yield "data: [DONE]\n\n"


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that SIGTERM / SIGINT end the process with status 0 once
        in-flight requests are done (uvicorn re-raises the signal after its shutdown)."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {s: signal.signal(s, self.handle_exit) for s in (SIGINT, SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return Server


def serve(
    run_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    quantize: str | None = None,
    slots: int = 8,
    max_len: int | None = None,
    max_queue: int = 64,
    max_tokens: int | None = None,
    default_max_tokens: int = 16,
    max_body_bytes: int = 1 << 20,
    model_name: str | None = None,
    graceful_seconds: float = 60.0,
    draft: str | None = None,
    draft_k: int = 4,
) -> None:
    """Load a run, compile everything, then serve until SIGTERM / SIGINT (which drains)."""
    from pathlib import Path

    import uvicorn

    from pipeline.inference.runs import load_model

    _, model, tokenizer = load_model(run_dir, key="--run")
    if quantize:
        from pipeline.quantize import quantize_model

        quantize_model(model, quantize, embeddings=True)
    draft_model = None
    if draft:
        from pipeline.config import ConfigError

        _, draft_model, draft_tokenizer = load_model(draft, key="--draft")
        if draft_tokenizer.fingerprint() != tokenizer.fingerprint():
            raise ConfigError(f"--draft: {draft} has another tokenizer than --run")
    engine = Engine(
        model,
        slots=slots,
        max_len=max_len,
        max_queue=max_queue,
        draft=draft_model,
        draft_k=draft_k,
    )
    engine.warmup()
    engine.start()
    name = model_name or Path(run_dir).resolve().name
    app = create_app(
        engine, tokenizer, name, api_key, max_tokens, default_max_tokens, max_body_bytes
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=graceful_seconds,
    )
    server = _server_class()(config)
    log.info("serving %s as %r on http://%s:%d", run_dir, name, host, port)
    try:
        server.run()  # SIGTERM: stop accepting, finish in-flight requests, return
    finally:
        app.state.serving["accepting"] = False
        engine.stop(drain=True, timeout=graceful_seconds)
