"""The OpenAI wire format: request bodies, error bodies, responses and streamed chunks.

Request bodies are pydantic models: FastAPI validates them, and our own rules (what is not
supported, how many stop sequences, the seed's range) are validators, so every malformed body
is refused before a route runs. Rules that depend on the server (its model name, its context)
are checked by the routes.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)

MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    """A refusal with an HTTP status and OpenAI's error fields."""

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


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every refusal's body (OpenAI's error object); described in the OpenAPI document."""

    error: ErrorDetail


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: StrictBool | None = None  # the output always follows the schema here


class ResponseFormat(BaseModel):
    """`{"type": "text"}`, `{"type": "json_object"}` (any JSON object) or `{"type":
    "json_schema", "json_schema": {"name", "schema", "strict"}}`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @field_validator("json_schema")
    @classmethod
    def _schema_with_type(cls, value, info):
        if value is not None and info.data.get("type") != "json_schema":
            raise ValueError('json_schema goes with type "json_schema"')
        return value

    @property
    def schema(self) -> dict | None:
        """The JSON schema the output must follow; None: free text."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ValueError('type "json_schema" needs json_schema: {"schema": {...}}')
            return self.json_schema.schema_
        return None


class StreamOptions(BaseModel):
    """`stream_options`: OpenAI's `include_usage` (a last chunk with the usage); any other key
    is refused by name."""

    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False


class SamplingRequest(BaseModel):
    """The fields completions and chat completions share. A field this server does not know is
    refused (400 naming it), never silently dropped."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: StrictInt | None = None

    @model_validator(mode="before")
    @classmethod
    def _text(cls, data: Any) -> Any:
        """JSON strings may hold lone UTF-16 surrogates ("\\ud800"), which are not text: no
        tokenizer (UTF-8) can read them. Refused, naming the field, wherever they are."""
        where = _surrogate(data)
        if where is not None:
            raise ValueError(
                f"{where or 'body'} holds a lone UTF-16 surrogate (a half of an escaped pair, "
                'such as "\\ud800"), which is not text: send the whole pair or the character'
            )
        return data

    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(0, ge=0)  # an extension (as in vLLM); 0: off
    seed: StrictInt | None = Field(None, ge=0, lt=1 << 32)
    stop: str | list[str] | None = Field(None, validate_default=True)  # -> list[str]
    stream: StrictBool = False
    stream_options: StreamOptions | None = None  # only with stream: true
    n: StrictInt = Field(1, ge=1)  # the server's limit: serve.max_n
    best_of: StrictInt | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # OpenAI's end-user id: written to the server's log
    response_format: ResponseFormat | None = None
    # extensions, as in vLLM
    repetition_penalty: float = Field(1.0, gt=0.0)
    min_tokens: StrictInt = Field(0, ge=0)
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool = False

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value):
        if value not in (None, 1):
            raise ValueError("best_of > 1 is not supported (n choices are: use n)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        out = {}
        for key, bias in (value or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"keys are token ids; got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"{bias} for token {key} is not in [-100, 100]")
            out[str(int(key))] = bias
        return out or None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        stop = [value] if isinstance(value, str) else list(value or [])
        if len(stop) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        return stop

    @field_validator("stream_options")
    @classmethod
    def _streaming(cls, value, info):
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream: true")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: StrictBool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], str | list):
            if len(value) != 1:
                raise ValueError("one prompt per request (a list of one string or token list)")
            return value[0]
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        if value:
            raise ValueError("suffix (insertion) is not supported by this model")
        return value

    @property
    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    arguments: str | dict[str, Any]  # OpenAI sends the arguments as a JSON string


class ToolCall(BaseModel):
    """One of an assistant's earlier calls, as OpenAI's API returned it."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = Field(None, validate_default=True)
    name: str | None = None  # the author: ours writes "name: content", a template its way
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's result answers this call

    @field_validator("content")
    @classmethod
    def _content(cls, value, info):
        if value is None and info.data.get("role") != "assistant":
            raise ValueError("content is required (null only for an assistant's tool calls)")
        return value


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: StrictBool | None = None  # calls always follow the schema when constrained


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: StrictInt | None = None  # OpenAI's newer name for max_tokens
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None  # false: an answer of several calls is text

    @field_validator("tool_choice")
    @classmethod
    def _choice_needs_tools(cls, value, info):
        tools = info.data.get("tools") or []
        if value not in (None, "none", "auto") and not tools:
            raise ValueError("tool_choice needs tools")
        named = isinstance(value, NamedToolChoice)
        if named and value.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"no tool is named {value.function.name!r}")
        return value

    @property
    def tool_mode(self) -> str | None:
        """None (no tools offered), "auto", "required", or the function a call must be to."""
        choice = self.tool_choice or ("auto" if self.tools else "none")
        if not self.tools or choice == "none":
            return None
        return choice.function.name if isinstance(choice, NamedToolChoice) else choice

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value, info):
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @property
    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def _surrogate(value: Any, path: str = "") -> str | None:
    """The path of the first string (key or value) in `value` that UTF-8 cannot encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        where = f"{path}.{key}" if path else str(key)
        if _surrogate(key) is not None:
            return where
        found = _surrogate(item, where)
        if found is not None:
            return found
    return None


_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}


def _field_path(loc) -> list:
    """A pydantic error's location less "body" and its union branches' tags ("literal[...]",
    "NamedToolChoice", "str"): the path of fields a client wrote."""
    return [
        p
        for p in loc
        if p != "body"
        and not (isinstance(p, str) and ("[" in p or p[:1].isupper() or p in _TYPE_NAMES))
    ]


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) for pydantic's most specific validation error: the first of those
    deepest in the request (a union's errors: the branch that got furthest)."""
    first = max(errors, key=lambda e: len(_field_path(e.get("loc", ()))), default=None)
    first = first or {"msg": "invalid request", "loc": ()}
    loc = ".".join(str(p) for p in _field_path(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}", None
    message = str(first["msg"]).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        message = "unknown field: this server does not take it (nothing is silently ignored)"
    return f"{loc or 'body'}: {message}", loc or None


def response_meta(chat: bool, model_name: str, created: int) -> dict:
    prefix = "chatcmpl-" if chat else "cmpl-"
    return {"id": prefix + uuid.uuid4().hex[:24], "created": created, "model": model_name}


def completion_logprobs(items: list[dict], k: int) -> dict:
    """OpenAI's completions `logprobs` object from token items (token, logprob or None, top
    [(token, logprob)] or None, offset)."""
    return {
        "tokens": [t["token"] for t in items],
        "token_logprobs": [t["logprob"] for t in items],
        "top_logprobs": [None if t["top"] is None else dict(t["top"][:k]) for t in items],
        "text_offset": [t["offset"] for t in items],
    }


def chat_logprobs(items: list[dict], k: int) -> dict:
    """OpenAI's chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(_raw(token))}

    return {
        "content": [
            {
                **entry(t["token"], t["logprob"]),
                "top_logprobs": [entry(tok, lp) for tok, lp in (t["top"] or [])[:k]],
            }
            for t in items
        ]
    }


def _raw(token: str) -> bytes:
    """The bytes of a token text as `Tokenizer.token_text` writes it."""
    if token.startswith("bytes:"):
        return bytes(int(h, 16) for h in token[len("bytes:") :].split("\\x")[1:])
    return token.encode("utf-8")


def choice_body(
    chat: bool,
    index: int,
    text: str,
    finish: str,
    logprobs: dict | None,
    tool_calls: list[dict] | None = None,
) -> dict:
    if chat:
        message = {"role": "assistant", "content": text}
        if tool_calls:
            message, finish = {**message, "content": None, "tool_calls": tool_calls}, "tool_calls"
        return {"index": index, "message": message, "finish_reason": finish, "logprobs": logprobs}
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}


def completion_body(meta: dict, chat: bool, choices: list[dict], usage: dict) -> dict:
    """A whole (non-streamed) response."""
    return {
        **meta,
        "object": "chat.completion" if chat else "text_completion",
        "choices": choices,
        "usage": usage,
    }


class Last(str):
    """A stream's last write (the response's body ends with it)."""


# a text no delta holds (a stream's chunk templates are made around it)
_MARK = "\x00delta\x00"


class _Chunks:
    """One stream's chunks as Server-Sent Events: OpenAI's chunk objects (chat or completion)."""

    def __init__(self, meta: dict, chat: bool, include_usage: bool):
        self.meta, self.chat, self.include_usage = meta, chat, include_usage
        self.kind = "chat.completion.chunk" if chat else "text_completion"
        self._templates: dict[int, list[str] | None] = {}

    def whole(self, index, delta, finish, logprobs=None, first=False) -> str:
        """A chunk, its object encoded whole."""
        if self.chat:
            body = {"content": delta} if delta is not None else {}
            if first:
                body = {"role": "assistant", "content": ""}
            choice = {"index": index, "delta": body, "finish_reason": finish, "logprobs": logprobs}
        else:
            choice = {"index": index, "text": delta or "", "finish_reason": finish}
            choice["logprobs"] = logprobs
        out = {**self.meta, "object": self.kind, "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        return f"data: {json.dumps(out)}\n\n"

    def text(self, index: int, delta: str) -> str:
        """`whole(index, delta, None)`, from the choice's chunk rendered once around a mark: a
        stream's chunks differ only in their text, and encoding the whole object per chunk
        (json.dumps, 8.6 us here) cost ten times encoding the text alone."""
        if index not in self._templates:
            chunk, mark = self.whole(index, _MARK, None), json.dumps(_MARK)
            self._templates[index] = chunk.split(mark) if chunk.count(mark) == 1 else None
        parts = self._templates[index]
        if parts is None:  # (the mark appeared elsewhere too, say in a model's name)
            return self.whole(index, delta, None)
        return f"{parts[0]}{json.dumps(delta)}{parts[1]}"

    def piece(self, index, delta, finish, logprobs) -> str:
        """What one piece of a choice writes: its delta (none for an empty last one), then its
        finish reason."""
        if not (delta or logprobs or not finish):
            out = ""
        elif logprobs is None and delta is not None:
            out = self.text(index, delta)
        else:
            out = self.whole(index, delta, None, logprobs)
        if finish:
            out += self.whole(index, None if self.chat else "", finish)
        return out


async def sse_events(pieces, meta: dict, chat: bool, n: int, include_usage: bool, usage):
    """OpenAI's streaming chunks as Server-Sent Events, then `data: [DONE]`.

    `pieces` yields (choice index, text delta, finish reason or None, logprobs object or None),
    the choices interleaved; `usage()` gives the final counts.
    """
    chunks = _Chunks(meta, chat, include_usage)
    if chat:
        for index in range(n):
            yield chunks.whole(index, None, None, first=True)
    # what a piece gives is one write; the last choice's end goes with the usage and [DONE]
    ended, last = 0, ""
    try:
        async for index, delta, finish, logprobs in pieces:
            out = chunks.piece(index, delta, finish, logprobs)
            ended += bool(finish)
            if ended == n:
                last += out
            elif out:
                yield out
    except APIError as err:  # after the status line: an error event ends the stream
        error = error_body(err.message, err.status, err.param, err.code)
        yield Last(f"{last}data: {json.dumps(error)}\n\ndata: [DONE]\n\n")
        return
    if include_usage:
        final = {**meta, "object": chunks.kind, "choices": [], "usage": usage()}
        last += f"data: {json.dumps(final)}\n\n"
    yield Last(last + "data: [DONE]\n\n")


async def sse_whole(choices: list[dict], meta: dict, include_usage: bool, usage: dict):
    """Chat choices decided as a whole (tool calls: known once the answer is complete) as
    OpenAI streams them: the role, then per call its id and name and then its arguments (or
    the content), then the finish reason. A choice's log-probabilities (all its tokens') come
    with the chunk of its arguments or content."""
    base = {**meta, "object": "chat.completion.chunk"}

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs=None) -> str:
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        out = {**base, "choices": [choice]} | ({"usage": None} if include_usage else {})
        return f"data: {json.dumps(out)}\n\n"

    for choice in choices:
        index, message, logprobs = choice["index"], choice["message"], choice.get("logprobs")
        yield chunk(index, {"role": "assistant", "content": ""})
        for j, call in enumerate(message.get("tool_calls") or []):
            head = {"index": j, "id": call["id"], "type": "function"}
            head["function"] = {"name": call["function"]["name"], "arguments": ""}
            yield chunk(index, {"tool_calls": [head]})
            arguments = {"index": j, "function": {"arguments": call["function"]["arguments"]}}
            yield chunk(index, {"tool_calls": [arguments]}, None, logprobs)
            logprobs = None
        if message.get("content"):
            yield chunk(index, {"content": message["content"]}, None, logprobs)
            logprobs = None
        yield chunk(index, {}, choice["finish_reason"], logprobs)
    if include_usage:
        yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


class LoadAdapterRequest(BaseModel):
    """`POST /v1/load_lora_adapter` (vLLM's admin route)."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(BaseModel):
    """`POST /v1/unload_lora_adapter`."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's: refused unless null (adapters go by name here)

    @field_validator("lora_int_id")
    @classmethod
    def _by_name(cls, value):
        if value is not None:
            raise ValueError("adapters are unloaded by lora_name here; leave lora_int_id out")
        return value
