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

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

MAX_STOP_SEQUENCES = 4


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


class SamplingRequest(BaseModel):
    """The fields completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: StrictInt | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(0, ge=0)  # an extension (as in vLLM); 0: off
    seed: StrictInt | None = Field(None, ge=0, lt=1 << 32)
    stop: str | list[str] | None = Field(None, validate_default=True)  # -> list[str]
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    n: StrictInt = 1
    best_of: StrictInt | None = None
    logprobs: Any = None
    echo: StrictBool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("n", "best_of")
    @classmethod
    def _one_choice(cls, value):
        if value not in (None, 1):
            raise ValueError("only n=1 (and best_of=1) is supported")
        return value

    @field_validator("echo", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs")
    @classmethod
    def _unsupported(cls, value, info):
        if value:
            raise ValueError(f"{info.field_name} is not supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        stop = [value] if isinstance(value, str) else list(value or [])
        if len(stop) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        return stop

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[StrictInt]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("one prompt per request (a list of one string)")
            return value[0]
        return value


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    logprobs: StrictBool | None = None


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) for the first of pydantic's validation errors."""
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}", None
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{loc or 'body'}: {message}", loc or None


def response_meta(chat: bool, model_name: str, created: int) -> dict:
    prefix = "chatcmpl-" if chat else "cmpl-"
    return {"id": prefix + uuid.uuid4().hex[:24], "created": created, "model": model_name}


def completion_body(meta: dict, chat: bool, text: str, finish: str, usage: dict) -> dict:
    """A whole (non-streamed) response."""
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
            "logprobs": None,
        }
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {
        **meta,
        "object": "chat.completion" if chat else "text_completion",
        "choices": [choice],
        "usage": usage,
    }


async def sse_events(pieces, meta: dict, chat: bool, include_usage: bool, usage):
    """OpenAI's streaming chunks as Server-Sent Events, then `data: [DONE]`.

    `pieces` yields (text delta, finish reason or None); `usage()` gives the final counts.
    """
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
    async for delta, finish in pieces:
        if delta or not finish:
            yield chunk(delta, None)
        if finish:
            yield chunk(None if chat else "", finish)
    if include_usage:
        yield f"data: {json.dumps({**meta, 'object': kind, 'choices': [], 'usage': usage()})}\n\n"
    yield "data: [DONE]\n\n"
