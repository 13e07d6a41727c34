"""The HTTP layer: OpenAI-compatible routes over the continuous-batching engine.

`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true`
as Server-Sent Events in OpenAI's chunk format, ending with `data: [DONE]`), `GET /health` and
`GET /metrics` (Prometheus text). Every client mistake is a 4xx with an OpenAI-style
`{"error": {...}}` body; a full queue is 429 with `Retry-After`; a client that goes away frees
its slot. This module knows requests, text and tokens; the model lives behind the engine (in
a process of its own, `core.py`, or on a thread, `client.py`), the wire format in
`protocol.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import random
import signal
import threading
import time
from pathlib import Path
from signal import SIGINT, SIGTERM

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.config import ServeConfig
from pipeline.inference.runs import load_tokenizer
from pipeline.inference.sampling import Sampling
from pipeline.serving.adapters import Adapters
from pipeline.serving.client import (
    AdapterInUseError,
    EngineDeadError,
    Job,
    LocalEngine,
    ll_tokenizer,
)
from pipeline.serving.controls import Controls
from pipeline.serving.core import build_engine, connect
from pipeline.serving.engine import Engine, QueueFullError
from pipeline.serving.launch import spawn_engine
from pipeline.serving.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    ErrorResponse,
    Last,
    LoadAdapterRequest,
    SamplingRequest,
    UnloadAdapterRequest,
    chat_logprobs,
    choice_body,
    completion_body,
    completion_logprobs,
    error_body,
    response_meta,
    sse_events,
    sse_whole,
    validation_message,
)
from pipeline.serving.tools import (
    auto_grammar,
    call_schema,
    parse_call,
    plain_messages,
    system_message,
)
from pipeline.tokenizer import prompt_ids, read_chat_template

log = logging.getLogger(__name__)


class Metrics:
    """Prometheus metrics of one server (its own registry)."""

    def __init__(self, engine):
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
            "Between two deliveries of a request's tokens (one engine call's arrive together)",
            registry=r,
            buckets=buckets,
        )
        queue = Gauge("pipeline_queue_depth", "Requests waiting for a slot", registry=r)
        queue.set_function(lambda: engine.queue_depth)
        busy = Gauge("pipeline_busy_slots", "Slots decoding a request", registry=r)
        busy.set_function(lambda: engine.busy_slots)
        Gauge("pipeline_slots", "Decode slots", registry=r).set(engine.num_slots)
        Gauge("pipeline_kv_blocks", "KV cache blocks in the pool", registry=r).set(engine.kv_blocks)
        used = Gauge("pipeline_kv_blocks_used", "KV cache blocks held by requests", registry=r)
        used.set_function(lambda: engine.blocks_used)
        hit = Gauge(
            "pipeline_prefix_cache_hit_rate",
            "Prompt tokens found in the prefix cache / prompt tokens looked up",
            registry=r,
        )
        hit.set_function(lambda: engine.hit_rate)
        preempted = Gauge(
            "pipeline_preemptions", "Requests preempted (recomputed) for KV blocks", registry=r
        )
        preempted.set_function(lambda: engine.preemptions)
        self._loop_gauges(engine)

    def _loop_gauges(self, engine) -> None:
        """The engine loop's running totals (`stats.py`): rates of these give the host's
        milliseconds per iteration, the time waiting for the device, tokens per iteration."""
        stats, r = engine.stats, self.registry
        for name, doc, read in (
            ("iterations", "Engine loop iterations", lambda: stats.iterations),
            ("busy_seconds", "Engine loop time, waiting for work excluded", lambda: stats.busy_s),
            ("device_wait_seconds", "Loop time blocked on device results", lambda: stats.wait_s),
            (
                "host_seconds",
                "Loop time not blocked on the device",
                lambda: stats.busy_s - stats.wait_s,
            ),
            ("delivered_tokens", "Tokens delivered by the engine loop", lambda: stats.tokens),
            ("decode_steps", "Decode calls dispatched", lambda: stats.steps),
            ("decode_steps_run", "Decode steps those calls ran", lambda: stats.steps_run),
            (
                "decode_row_steps",
                "Running requests each decode step advanced, summed",
                lambda: stats.row_steps,
            ),
            ("prefill_calls", "Prefill calls dispatched", lambda: stats.prefills),
        ):
            Gauge(f"pipeline_engine_{name}", doc, registry=r).set_function(read)
        step = Gauge(
            "pipeline_engine_device_step_seconds",
            "A decode step's device time (mean of the steps timed alone, one in 64)",
            registry=r,
        )
        step.set_function(lambda: stats.timed_s / stats.timed_steps if stats.timed_steps else 0)

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
    the text sent then ends right before it. Each token costs its own text, not the whole
    output again: the `tokenizers` library's `DecodeStream` decodes a token against the few
    before it (a UTF-8 character split over tokens, a decoder's leading-space rule), the way
    the full decode would; the full decode runs once, at the end, for what the stream still
    holds back then (an incomplete character, rendered as the full decode renders it).
    """

    def __init__(self, tokenizer, stop: list[str]):
        from tokenizers.decoders import DecodeStream

        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        hf = getattr(tokenizer, "hf", None)
        self._stream = (hf, DecodeStream(skip_special_tokens=True)) if hf is not None else None
        self._vocab = tokenizer.vocab_size if hf is not None else 0  # (asked once, not per token)
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already returned
        self.text = ""
        self.stopped = False

    def _append(self, token: int | None, final: bool) -> None:
        if token is not None:
            self.ids.append(token)
            if self._stream is None:
                self.text = self.tokenizer.decode(self.ids)
                return
            hf, stream = self._stream
            piece = stream.step(hf, token) if 0 <= token < self._vocab else ""
            self.text += piece or ""
        if final and self._stream is not None:
            whole = self.tokenizer.decode(self.ids)
            if whole.startswith(self.text):
                self.text = whole

    def push(self, token: int | None, final: bool = False) -> str:
        if not self.stopped:
            self._append(token, final)
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
                    if text.endswith(stop[:k], 0, end):
                        end -= k
                        break
        end = max(end, self.sent)
        out, self.sent = text[self.sent : end], end
        return out


def _budget(body: SamplingRequest) -> tuple[str, int | None]:
    """(the field, its value) of the request's token budget: `max_tokens`, or chat's newer name
    `max_completion_tokens` (both given: they must agree)."""
    newer = getattr(body, "max_completion_tokens", None)
    if newer is None:
        return "max_tokens", body.max_tokens
    if body.max_tokens is not None and body.max_tokens != newer:
        message = f"max_tokens ({body.max_tokens}) and max_completion_tokens ({newer}) differ"
        raise APIError(400, message + ": give one", "max_completion_tokens")
    return "max_completion_tokens", newer


def create_app(
    engine,
    tokenizer,
    model_name: str,
    cfg: ServeConfig | None = None,
    adapters: Adapters | None = None,
):
    """The ASGI app over `engine`: an `Engine` whose loop runs on a thread of this process
    (started and warmed up by the caller; `adapters`: the LoRA adapters it serves beside its
    base, the request's `model` picks one), or a `core.EngineClient`."""
    if isinstance(engine, Engine):
        engine = LocalEngine(engine, tokenizer, adapters)
    routes = Routes(engine, tokenizer, model_name, cfg or ServeConfig())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        attach = getattr(engine, "attach", None)
        if attach is not None:  # the engine's process: its pipe read from this event loop
            attach()
        yield

    app = FastAPI(
        title="pipeline",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=lifespan,
    )
    app.state.metrics, app.state.routes = routes.metrics, routes
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(Guard, routes=routes)
    app.get("/health", responses={503: {"description": "shutting down"}})(routes.health)
    app.get("/metrics", response_class=PlainTextResponse)(routes.prometheus)
    app.get("/v1/models", responses=_errors())(routes.models)
    generation = {**_errors(404, 429), 200: {"content": {"text/event-stream": {}}}}
    app.post("/v1/completions", responses=generation)(routes.completions)
    app.post("/v1/chat/completions", responses=generation)(routes.chat_completions)
    app.post("/v1/load_lora_adapter", responses=_errors(404, 409))(routes.load_adapter)
    app.post("/v1/unload_lora_adapter", responses=_errors(404, 409))(routes.unload_adapter)
    app.openapi = lambda: _openapi(app)
    return app


def _errors(*statuses: int) -> dict:
    """The OpenAPI `responses` of the refusals a route can give: each an OpenAI error object.
    400 (a bad body), 401 (the API key), 413 (the body's size) and 500 on every route."""
    return {status: {"model": ErrorResponse} for status in sorted({400, 401, 413, 500, *statuses})}


def _openapi(app) -> dict:
    """FastAPI's document, less the 422 it declares for every body: a bad body is a 400 here."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for route in doc["paths"].values():
            for operation in route.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            doc.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = doc
    return app.openapi_schema


def _respond(err: APIError) -> JSONResponse:
    body = error_body(err.message, err.status, err.param, err.code)
    return JSONResponse(body, status_code=err.status, headers=err.headers)


async def _api_error(request, err: APIError):
    return _respond(err)


async def _validation_error(request, err: RequestValidationError):
    message, param = validation_message(err.errors())
    return _respond(APIError(400, message, param))


async def _http_error(request, err: StarletteHTTPException):
    return _respond(APIError(err.status_code, str(err.detail)))


async def _unexpected(request, err: Exception):
    log.exception("unexpected error")
    return _respond(APIError(500, f"internal error: {type(err).__name__}"))


class Guard:
    """The API key and the body size, for every /v1 route; request counts by route and status.

    A plain ASGI middleware: it sees each request once and passes the response's messages
    straight through (Starlette's `BaseHTTPMiddleware`, what `app.middleware("http")` makes,
    relays every streamed chunk through a memory stream of its own: a tenth of a streaming
    server's time in a profile)."""

    def __init__(self, app, routes: Routes):
        self.app, self.routes = app, routes

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1"):
            return await self.app(scope, receive, send)
        cfg = self.routes.cfg
        refusal = None
        if cfg.api_key and not _authorised(Request(scope), cfg.api_key):
            message = "missing or wrong API key (Authorization: Bearer KEY)"
            refusal = APIError(401, message, code="invalid_api_key")
        # (ASGI's header names are lower-case bytes: no `Request` and header map per request)
        length = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k == b"content-length"), ""
        )
        if refusal is None and length.isdigit() and int(length) > cfg.max_body_bytes:
            limit = cfg.max_body_bytes
            refusal = APIError(413, f"the body is {length} bytes; the limit is {limit}")
        if refusal is not None:
            return await _respond(refusal)(scope, receive, send)
        status = 500

        async def counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, counted)
        self.routes.metrics.requests.labels(path, str(status)).inc()


class Routes:
    """One method per route, over one engine (`client.LocalEngine` or `core.EngineClient`) and
    tokenizer."""

    def __init__(self, engine, tokenizer, model_name: str, cfg: ServeConfig):
        self.engine, self.tokenizer, self.model_name, self.cfg = engine, tokenizer, model_name, cfg
        if cfg.chat_template:
            tokenizer.template_override = read_chat_template(cfg.chat_template)
        self.metrics = Metrics(engine)
        engine.observe = self.metrics.observe
        self.max_tokens = min(cfg.max_tokens or engine.max_len, engine.max_len)
        self.accepting = True  # False once the server drains for shutdown
        self._llt = None  # the tokenizer as llguidance sees it (structured outputs), on first use

    @property
    def adapters(self):
        """The adapters served beside the base (names -> index, salt, run), or None."""
        return self.engine.adapters

    async def health(self):
        engine = self.engine
        if engine.dead is not None:
            return JSONResponse({"status": "failed", "error": engine.dead}, status_code=503)
        if not self.accepting:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok", "busy_slots": engine.busy_slots, "queue_depth": engine.queue_depth}

    async def prometheus(self):
        return PlainTextResponse(generate_latest(self.metrics.registry).decode())

    async def models(self):
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "pipeline"}
        cards = [{**card, "root": self.model_name, "parent": None}]
        for name, run in sorted((self.adapters.runs if self.adapters else {}).items()):
            cards.append({**card, "id": name, "root": run, "parent": self.model_name})
        return {"object": "list", "data": cards}

    async def load_adapter(self, body: LoadAdapterRequest):
        """vLLM's admin route: load LoRA run `lora_path` as model `lora_name`."""
        if self.adapters is None:
            raise APIError(
                400, "this server takes no adapters (serve --adapter, serve.max_adapters)"
            )
        if body.lora_name == self.model_name:
            raise APIError(400, f"{body.lora_name!r} is the base model's name", "lora_name")
        try:
            await self.engine.load_adapter(body.lora_name, body.lora_path)
        except ValueError as err:
            raise APIError(400, str(err), "lora_path") from None
        except EngineDeadError as err:
            raise APIError(503, str(err)) from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def unload_adapter(self, body: UnloadAdapterRequest):
        """vLLM's admin route: unload adapter `lora_name` (409 while requests use it)."""
        index = (self.adapters.index if self.adapters else {}).get(body.lora_name)
        if index is None:
            message = f"no adapter named {body.lora_name!r} is loaded"
            raise APIError(404, message, "lora_name", "model_not_found")
        try:
            await self.engine.unload_adapter(body.lora_name)
        except AdapterInUseError:
            raise APIError(
                409, f"adapter {body.lora_name!r} is in use; retry when its requests end"
            ) from None
        except EngineDeadError as err:
            raise APIError(503, str(err)) from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    def _adapter(self, model: str) -> tuple[int, str]:
        """The adapter index (0: the base) and prefix-cache salt of the request's `model`."""
        if model == self.model_name:
            return 0, ""
        if self.adapters is not None and model in self.adapters.index:
            return self.adapters.index[model], self.adapters.salts[model]
        names = [self.model_name, *sorted(self.adapters.index if self.adapters else ())]
        message = f"model {model!r} does not exist; this server has {', '.join(map(repr, names))}"
        raise APIError(404, message, "model", "model_not_found")

    async def completions(self, body: CompletionRequest):
        if isinstance(body.prompt, str):
            ids = self.tokenizer.encode(body.prompt)
        else:
            vocab = self.tokenizer.vocab_size
            if any(not 0 <= t < vocab for t in body.prompt):
                raise APIError(400, f"token ids must be in [0, {vocab})", "prompt")
            ids = list(body.prompt)
        return await self._complete(body, ids, chat=False)

    async def chat_completions(self, body: ChatRequest):
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        mode = body.tool_mode
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []] if mode else None
        try:
            template = self.tokenizer.chat_template(tools=bool(tools))
            if template is not None:  # the model's layout of tools, calls and results
                offered = tools if "tools" in template else None
                if tools and offered is None:
                    messages = [system_message(tools), *messages]
                ids = prompt_ids(self.tokenizer, messages, offered)
            else:
                plain = plain_messages(messages)
                ids = prompt_ids(
                    self.tokenizer, [system_message(tools), *plain] if tools else plain
                )
        except ValueError as err:  # no chat template, or the template refused the conversation
            raise APIError(400, str(err), "messages") from None
        return await self._complete(body, ids, chat=True, tools=tools, mode=mode)

    def _check(self, body: SamplingRequest, ids: list[int], chat: bool) -> int:
        """The rules that depend on this server; returns max_tokens (0: echo scores the prompt
        and generates nothing)."""
        if self.engine.dead is not None:
            raise APIError(503, f"the server cannot generate: {self.engine.dead}")
        if not self.accepting:
            raise APIError(503, "the server is shutting down")
        self._adapter(body.model)
        name, asked = _budget(body)
        max_tokens = self.cfg.default_max_tokens if asked is None else asked
        echo = getattr(body, "echo", False)
        if not (0 if echo else 1) <= max_tokens <= self.max_tokens:
            low = "0 (with echo)" if echo else "1"
            message = f"{name} must be {low}..{self.max_tokens}, got {max_tokens}"
            raise APIError(400, message, name)
        if body.n > self.cfg.max_n:
            raise APIError(400, f"n must be 1..{self.cfg.max_n} on this server", "n")
        prompt_field = "messages" if chat else "prompt"
        if not ids:
            raise APIError(400, "the prompt is empty", prompt_field)
        context = self.engine.max_len
        if len(ids) + max_tokens > context:
            raise APIError(
                400,
                f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                f"context of {context} tokens",
                "max_tokens" if len(ids) < context else prompt_field,
                "context_length_exceeded",
            )
        vocab = self.tokenizer.vocab_size
        for token in body.stop_token_ids or []:
            if not 0 <= token < vocab:
                raise APIError(400, f"stop_token_ids: {token} is not in [0, {vocab})")
        return max_tokens

    def _stop_ids(self, body: SamplingRequest, chat: bool) -> frozenset[int]:
        ends = set() if body.ignore_eos else set(self.tokenizer.stop_ids)
        if chat and not body.ignore_eos:
            ends.add(self.tokenizer.end_id)
        return frozenset((ends | set(body.stop_token_ids or [])) - {None})

    def _job(
        self,
        body: SamplingRequest,
        ids: list[int],
        chat: bool,
        max_tokens: int,
        index: int,
        first: Job | None,
        grammar: str | None = None,
    ) -> tuple[Job, asyncio.Queue]:
        """Choice `index` of the request as the engine takes it, and the queue its tokens come
        to. Choice i samples with seed + i; choices after the first (`first`) copy its
        prefilled prompt."""
        queue: asyncio.Queue = asyncio.Queue()
        seed = body.seed if body.seed is not None else random.getrandbits(31)
        stop_ids = self._stop_ids(body, chat)
        controls = Controls(
            presence=body.presence_penalty,
            frequency=body.frequency_penalty,
            repetition=body.repetition_penalty,
            bias={int(t): v for t, v in (body.logit_bias or {}).items()},
            min_tokens=body.min_tokens,
            stop_ids=tuple(sorted(stop_ids)),
            logprobs=body.top_logprobs_wanted is not None,
            constrained=grammar is not None,
        )
        adapter, salt = self._adapter(body.model)
        job = Job(
            prompt=ids,
            adapter=adapter,
            salt=salt,
            max_tokens=max_tokens,
            sampling=Sampling(body.temperature, body.top_k, body.top_p, (seed + index) % (1 << 32)),
            stop_ids=stop_ids,
            controls=controls,
            parent=first,
            grammar=grammar,
            emit=self.engine.sink(queue),
        )
        return job, queue

    def _grammar(self, body: SamplingRequest, schema=None, lark: str | None = None):
        """The llguidance grammar of the request's response_format, of `schema` (a required
        tool call's) or of `lark` (strict functions under "auto"); None: free text. A schema it
        cannot follow is a 400 naming what."""
        fmt = body.response_format
        field = "tools" if schema is not None or lark is not None else "response_format"
        if field == "tools" and fmt is not None and fmt.type != "text":
            what = "a required tool call" if lark is None else "a strict function under auto"
            raise APIError(400, f"response_format and {what} exclude each other")
        try:
            schema = schema or (fmt.schema if fmt is not None else None)
        except ValueError as err:
            raise APIError(400, f"response_format: {err}", "response_format") from None
        if schema is None and lark is None:
            return None
        from llguidance import LLMatcher

        try:
            # compact JSON: no free whitespace for the model to spend its tokens on
            grammar = (
                LLMatcher.grammar_from_lark(lark)
                if lark is not None
                else LLMatcher.grammar_from_json_schema(
                    schema, overrides={"whitespace_flexible": False}
                )
            )
        except ValueError as err:
            raise APIError(400, f"{field}: {err}", field) from None
        if self._llt is None:
            self._llt = ll_tokenizer(self.tokenizer, self.engine.vocab_size)
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, self._llt)
        if failed:
            message = f"{field}: the schema is not supported: {messages[0]}"
            raise APIError(400, message, field)
        return grammar

    def _token(self, token: int) -> str:
        return self.tokenizer.token_text(token)

    def _items(self, tokens, logprobs, tops, texts_before: list[int]) -> list[dict]:
        """Per-token logprob items: token text, its log-probability (None for a prompt's first
        token), the alternatives [(text, logprob)], the text offset."""
        return [
            {
                "token": self._token(t),
                "logprob": lp,
                "top": None if top is None else [(self._token(i), v) for i, v in top],
                "offset": offset,
            }
            for t, lp, top, offset in zip(tokens, logprobs, tops, texts_before, strict=True)
        ]

    async def _prompt_items(self, ids: list[int], scored: bool, model: str) -> list[dict]:
        """echo: the prompt's tokens, with their log-probabilities when asked (one forward)."""
        offsets = [len(self.tokenizer.decode(ids[:i])) for i in range(len(ids))]
        if not scored:
            return []
        try:
            adapter = self._adapter(model)[0]
            lp, top_ids, top_lp = await self.engine.score(ids, adapter)
        except ValueError as err:
            raise APIError(400, str(err), "prompt") from None
        except EngineDeadError as err:
            raise APIError(503, f"the server cannot score: {err}") from None
        logprobs = [None] + [float(x) for x in lp[1:]]
        tops = [None] + [
            list(zip(i.tolist(), v.tolist(), strict=True))
            for i, v in zip(top_ids[1:], top_lp[1:], strict=True)
        ]
        return self._items(ids, logprobs, tops, offsets)

    def _logprobs_object(self, chat: bool, items: list[dict], k: int) -> dict:
        return chat_logprobs(items, k) if chat else completion_logprobs(items, k)

    async def _complete(
        self,
        body: SamplingRequest,
        ids: list[int],
        chat: bool,
        tools: list[dict] | None = None,
        mode: str | None = None,
    ):
        """Run the request's choices; `tools` offered (mode "auto", "required" or the name of
        the function to call): answers that are calls come back as `tool_calls`."""
        max_tokens = self._check(body, ids, chat)
        named = mode if mode not in (None, "auto", "required") else None
        call = call_schema(tools, named) if mode not in (None, "auto") else None
        grammar = self._grammar(body, call, auto_grammar(tools) if mode == "auto" else None)
        k = body.top_logprobs_wanted
        echo = getattr(body, "echo", False)
        prompt_text = self.tokenizer.decode(ids) if echo else ""
        scored = echo and k is not None
        prompt_items = await self._prompt_items(ids, scored, body.model) if echo else []
        jobs = await self._submit_choices(body, ids, chat, max_tokens, grammar)
        meta = response_meta(chat, body.model, int(time.time()))
        if body.user is not None:  # OpenAI's end-user id: for the operator's logs
            log.info("%s: %d prompt tokens for user %r", meta["id"], len(ids), body.user)
        streams = [
            self._pieces(job, queue, TextStream(self.tokenizer, body.stop), k, len(prompt_text))
            for job, queue in jobs
        ]

        def usage() -> dict:
            done = sum(job.generated for job, _ in jobs)
            total = len(ids) + done
            return {"prompt_tokens": len(ids), "completion_tokens": done, "total_tokens": total}

        def logprobs_of(items):
            return None if k is None else self._logprobs_object(chat, items, k)

        if body.stream and not tools:
            pieces = self._merged(streams, prompt_text, prompt_items, logprobs_of, body.n)
            return _sse(sse_events(pieces, meta, chat, body.n, body.include_usage, usage))

        async def collect(index: int, pieces) -> dict:
            texts, items, finish = [prompt_text], list(prompt_items), "length"
            if pieces is not None:
                async for delta, reason, token_items in pieces:
                    texts.append(delta)
                    items.extend(token_items)
                    finish = reason or finish
            text = "".join(texts)
            parallel = getattr(body, "parallel_tool_calls", None) is not False
            calls = parse_call(text, tools, parallel) if tools and pieces else None
            return choice_body(chat, index, text, finish, logprobs_of(items), calls)

        # echo with max_tokens 0: no stream; each choice is the prompt, scored
        choices = await asyncio.gather(
            *(collect(i, p) for i, p in enumerate(streams or [None] * body.n))
        )
        if body.stream:  # with tools: whether an answer is a call is known once it is complete
            return _sse(sse_whole(list(choices), meta, body.include_usage, usage()))
        return completion_body(meta, chat, list(choices), usage())

    async def _submit_choices(self, body, ids: list[int], chat: bool, max_tokens: int, grammar):
        """The request's n choices handed to the engine (none with max_tokens 0), taken or
        refused together: [(job, its token queue)]."""
        jobs: list[tuple[Job, asyncio.Queue]] = []
        for index in range(body.n if max_tokens else 0):
            first = jobs[0][0] if jobs else None
            jobs.append(self._job(body, ids, chat, max_tokens, index, first, grammar))
        if not jobs:
            return jobs
        try:
            await self.engine.submit([job for job, _ in jobs])
        except QueueFullError as err:
            error = APIError(429, f"the server is busy ({err}); retry shortly")
            error.headers["Retry-After"] = "1"
            raise error from None
        except ValueError as err:
            raise APIError(400, str(err)) from None
        except EngineDeadError as err:
            raise APIError(503, f"the server cannot generate: {err}") from None
        return jobs

    async def _merged(self, streams, prompt_text, prompt_items, logprobs_of, n: int):
        """The choices' pieces interleaved as they come: (index, delta, finish, logprobs)."""
        if prompt_text:
            for index in range(n):
                yield index, prompt_text, None, logprobs_of(prompt_items) if prompt_items else None
        if not streams:
            for index in range(n):
                yield index, "", "length", None
            return
        if len(streams) == 1:  # one choice: its pieces as they come, no task in between
            try:
                async for delta, reason, items in streams[0]:
                    yield 0, delta, reason, logprobs_of(items) if items else None
            finally:
                await streams[0].aclose()  # (on a cancel: the request cancelled in the engine)
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index, pieces):
            try:
                async for delta, reason, items in pieces:
                    await queue.put((index, delta, reason, logprobs_of(items) if items else None))
            except APIError as err:  # (the engine failed): the stream ends with it
                await queue.put(err)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(streams)]
        try:
            left = len(tasks)
            while left:
                item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, APIError):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            # a pump still inside its generator: aclose() now would raise "asynchronous
            # generator is already running" (found by bench soak: n > 1 streams left mid-way)
            await asyncio.gather(*tasks, return_exceptions=True)
            for pieces in streams:
                await pieces.aclose()  # cancels each choice's request (the engine frees it)

    async def _pieces(self, job, queue: asyncio.Queue, text: TextStream, k, offset: int):
        """(text delta, finish reason or None, logprob items of its tokens) until the request
        ends; cancels it on exit."""
        finished = False
        received = 0

        def items_of(token, before: int) -> list[dict]:
            nonlocal received
            received += 1
            if k is None or token is None or received > len(job.logprobs):
                return []
            lp, top_ids, top_lp = job.logprobs[received - 1]
            top = list(zip(top_ids[:k], top_lp[:k], strict=True))
            return self._items([token], [lp], [top], [offset + before])

        limit = self.cfg.request_timeout_s
        deadline = None if limit is None else asyncio.get_running_loop().time() + limit
        interval, held, held_items, count = self.cfg.stream_interval, "", [], 0
        try:
            while True:
                try:
                    token, reason = await _next_item(queue, deadline)
                except TimeoutError:  # the request's time budget ran out: it ends like "length"
                    self.engine.cancel(job)
                    finished = True
                    yield held + text.push(None, final=True), "length", held_items
                    return
                before = len(text.text)
                if reason == "error":  # the engine failed: the request cannot go on
                    finished = True
                    message = "the engine failed; this request was lost"
                    raise APIError(500, message, code="engine_error")
                if reason is not None:
                    finished = True
                    kept = None if reason == "stop" else token  # "end": a grammar's last token
                    tail = text.push(kept, final=True)
                    # a stop token is not text, but its log-probability is reported (as vLLM
                    # does: echo + max_tokens 1 scorers drop the last item, whatever it is)
                    items = items_of(token, before) if token is not None else []
                    finish = "length" if reason == "length" else "stop"
                    yield held + tail, finish, held_items + items
                    return
                delta = text.push(token)
                items = items_of(token, before)
                if text.stopped:
                    self.engine.cancel(job)
                    finished = True
                    yield held + delta, "stop", held_items + items
                    return
                held, held_items, count = held + delta, held_items + items, count + 1
                # a chunk once `stream_interval` tokens are held and no more have arrived
                # (the tokens of one engine call arrive together: one chunk, one write), even
                # while text is held back (an empty delta)
                if count >= interval and not queue.qsize():
                    yield held, None, held_items
                    held, held_items, count = "", [], 0
        finally:
            if not finished:
                self.engine.cancel(job)


async def _next_item(queue: asyncio.Queue, deadline: float | None):
    """A request's next (token, reason); TimeoutError once `deadline` passes. (`wait_for`
    makes a task: only when the queue is empty.)"""
    if queue.qsize():
        return queue.get_nowait()
    return await asyncio.wait_for(queue.get(), _left(deadline))


def _left(deadline: float | None) -> float | None:
    """Seconds until `deadline` (event-loop time), never negative; None: no deadline."""
    return None if deadline is None else max(deadline - asyncio.get_running_loop().time(), 0.0)


def _sse(events) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache"}
    return EventStream(events, media_type="text/event-stream", headers=headers)


class EventStream(StreamingResponse):
    """A stream of server-sent events, stopped when the client goes away.

    Starlette's `StreamingResponse` learns of a disconnect under uvicorn (whose HTTP scopes
    say ASGI 2.3, where a write to a closed connection raises nothing) from a task that waits
    on `receive` beside the stream, in an anyio task group of their own: per response a task
    group, two tasks and their cancel scopes (22% of the HTTP loop's samples in a profile of
    the `tiny` model's server). Here the stream runs in the request's own task, and one plain
    asyncio task waits for the disconnect and cancels it; the response ends as Starlette's
    does then (the events' generator closed, so the request is cancelled in the engine)."""

    async def stream_response(self, send) -> None:
        """Starlette's, but the events' last write (`protocol.Last`) ends the body itself: the
        chunked body's terminator goes with it, one write fewer per request."""
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        ended = False
        async for chunk in self.body_iterator:
            last = isinstance(chunk, Last)
            body = chunk.encode(self.charset) if isinstance(chunk, str) else chunk
            await send({"type": "http.response.body", "body": body, "more_body": not last})
            ended = ended or last
        if not ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope, receive, send) -> None:
        stream, state = asyncio.current_task(), {"streaming": True, "gone": False}

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if state["streaming"]:
                state["gone"] = True
                stream.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not state["gone"]:
                raise
            stream.uncancel()  # the client left: the response ends here, as Starlette's does
        finally:
            state["streaming"] = False
            watcher.cancel()
        if self.background is not None:
            await self.background()


def _authorised(request: Request, api_key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), api_key)


def uvicorn_config(app, cfg: ServeConfig, log_level: str = "info"):
    """uvicorn's settings for `app` from the serve config (what `pipeline serve` runs)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level=log_level,
        timeout_graceful_shutdown=cfg.graceful_seconds,
        timeout_keep_alive=cfg.keep_alive_s,
        limit_concurrency=cfg.max_connections,
    )


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it resolves to whatever it resolves to
        return False


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
    cfg: ServeConfig,
    adapter_runs: dict[str, str] | None = None,
    spawned=None,
) -> int:
    """Serve a run until SIGTERM / SIGINT (which drain): the engine in a process of its own
    (`core.py`; `serve.engine_process`; `spawned`: that process if already started, see
    `launch.py`), else on a thread of this one. The exit status: 0, or 1 when the engine died
    (for the supervisor to restart the server)."""
    if cfg.engine_process:
        spawned = spawned or spawn_engine(run_dir, cfg, adapter_runs)
        tokenizer = load_tokenizer(run_dir)  # while the engine loads and compiles
        engine = connect(spawned)
        stop = engine.stop
    else:
        local, tokenizer, adapters = build_engine(run_dir, cfg, adapter_runs)
        local.start()
        engine, stop = LocalEngine(local, tokenizer, adapters), local.stop
    name = cfg.model_name or Path(run_dir).resolve().name
    app = create_app(engine, tokenizer, name, cfg)
    if not cfg.api_key and not _loopback(cfg.host):
        log.warning(
            "serving on %s without an API key: anyone who can reach this address can use the "
            "model; set serve.api_key (or $PIPELINE_API_KEY)",
            cfg.host,
        )
    server = _server_class()(uvicorn_config(app, cfg))
    engine.on_death = lambda: setattr(server, "should_exit", True)
    log.info("serving %s as %r on http://%s:%d", run_dir, name, cfg.host, cfg.port)
    try:
        server.run()  # SIGTERM: stop accepting, finish in-flight requests, return
    finally:
        app.state.routes.accepting = False
        stop(drain=True, timeout=cfg.graceful_seconds)
    if engine.dead is not None:
        log.error("exiting: %s", engine.dead)
        return 1
    return 0
