"""Every field of every request model, walked: a request using it either changes the response
as the field specifies, or is refused with a 400 naming it. A field added to a request model
without a case here fails `test_every_field_has_a_case`, so none can be accepted and silently
ignored. Run: pytest tests/test_request_fields.py
"""

import dataclasses
import json
import logging
import typing

import httpx
import jsonschema
import pytest
from helpers import CFG, NAME, Server
from pydantic import BaseModel

from pipeline.serving import protocol
from pipeline.serving.tools import parse_call, plain_messages, system_message
from pipeline.tokenizer import prompt_ids

pytestmark = pytest.mark.e2e

ROOTS = (
    protocol.CompletionRequest,
    protocol.ChatRequest,
    protocol.LoadAdapterRequest,
    protocol.UnloadAdapterRequest,
)
C, H = "completions", "chat/completions"
ASK = [{"role": "user", "content": "hi"}]
UNIT = {  # arguments of an enum only: a forced "{" cannot run on inside a string
    "type": "function",
    "function": {
        "name": "set_unit",
        "description": "The unit of temperatures",
        "parameters": {
            "type": "object",
            "properties": {"unit": {"enum": ["c", "f"]}},
            "required": ["unit"],
            "additionalProperties": False,
        },
    },
}


def _models(annotation) -> list[type[BaseModel]]:
    """The request models an annotation holds (in unions, lists, dicts)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def request_fields() -> list[str]:
    """ "Class.field" of every field of the request models and the models they hold, named by
    the class that declares the field."""
    seen, todo, out = set(), list(ROOTS), set()
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            owner = next(c for c in model.__mro__ if name in c.__dict__.get("__annotations__", {}))
            out.add(f"{owner.__name__}.{name}")
            todo.extend(_models(info.annotation))
    return sorted(out)


@pytest.fixture(scope="module")
def server():
    s = Server(slots=4, cfg=dataclasses.replace(CFG, max_seq_len=1024))
    yield s
    s.close()


def _send(server, body: dict, route: str = C) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{route}", json={"model": NAME, **body}, timeout=60)


def ok(server, body: dict, route: str = C) -> dict:
    r = _send(server, body, route)
    assert r.status_code == 200, r.text
    return r.json()


def refused(server, body: dict, field: str, route: str = C, status: int = 400) -> None:
    """The request is refused with `status` and an OpenAI error naming `field`."""
    r = _send(server, body, route)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert field in (error["param"] or "") or field in error["message"], error


def chat(server, body: dict) -> dict:
    return ok(server, {"messages": ASK, **body}, H)


def text(out: dict) -> str:
    choice = out["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def streamed(server, body: dict, route: str = C) -> list[dict]:
    with httpx.stream(
        "POST", f"{server.url}/v1/{route}", json={"model": NAME, **body}, timeout=60
    ) as r:
        assert r.status_code == 200, r.read()
        lines = [x for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(x[6:]) for x in lines[:-1]]


def tops_taken(server, body: dict) -> list[bool]:
    """Per generated token: whether it was the model's most likely one."""
    lp = ok(server, {"prompt": "q", "max_tokens": 16, "logprobs": 1, **body})["choices"][0]
    tops = lp["logprobs"]["top_logprobs"]
    return [max(t, key=t.get) == tok for t, tok in zip(tops, lp["logprobs"]["tokens"], strict=True)]


def force(token: str, bias: float = 100) -> dict:
    return {str(ord(token)): bias}


# --- the cases, one per field --------------------------------------------------------------


def case_model(server):
    assert ok(server, {"prompt": "q", "max_tokens": 1})["model"] == NAME
    refused(server, {"model": "nope", "prompt": "q"}, "model", status=404)


def case_max_tokens(server):
    for n in (3, 7):
        out = ok(server, {"prompt": "q", "max_tokens": n, "ignore_eos": True})
        assert out["usage"]["completion_tokens"] == n
    refused(server, {"prompt": "q", "max_tokens": 0}, "max_tokens")


def case_temperature(server):
    assert all(tops_taken(server, {"temperature": 0}))
    assert not all(tops_taken(server, {"temperature": 2.0, "seed": 0}))
    refused(server, {"prompt": "q", "temperature": 3}, "temperature")


def case_top_p(server):
    assert all(tops_taken(server, {"temperature": 2.0, "seed": 0, "top_p": 1e-6}))
    refused(server, {"prompt": "q", "top_p": 0}, "top_p")


def case_top_k(server):
    assert all(tops_taken(server, {"temperature": 2.0, "seed": 0, "top_k": 1}))
    out = ok(server, {"prompt": "q", "max_tokens": 16, "logprobs": 2, "temperature": 2.0})
    lp = out["choices"][0]["logprobs"]
    out2 = ok(
        server, {"prompt": "q", "max_tokens": 16, "logprobs": 2, "temperature": 2.0, "top_k": 2}
    )
    lp2 = out2["choices"][0]["logprobs"]
    assert all(tok in top for top, tok in zip(lp2["top_logprobs"], lp2["tokens"], strict=True))
    assert not all(tok in top for top, tok in zip(lp["top_logprobs"], lp["tokens"], strict=True))


def case_seed(server):
    body = {"prompt": "q", "max_tokens": 16, "temperature": 1.5}
    same = [text(ok(server, {**body, "seed": 1})) for _ in range(2)]
    assert same[0] == same[1] != text(ok(server, {**body, "seed": 2}))


def case_stop(server):
    whole = text(ok(server, {"prompt": "q", "max_tokens": 24, "temperature": 0}))
    k = next(k for k in range(2, len(whole) - 2) if whole.find(whole[k : k + 2]) == k)
    out = ok(server, {"prompt": "q", "max_tokens": 24, "temperature": 0, "stop": whole[k : k + 2]})
    assert text(out) == whole[:k] and out["choices"][0]["finish_reason"] == "stop"


def case_stream(server):
    body = {"prompt": "q", "max_tokens": 12, "temperature": 0}
    chunks = streamed(server, {**body, "stream": True})
    assert "".join(c["choices"][0]["text"] for c in chunks) == text(ok(server, body))


def case_stream_options(server):
    body = {"prompt": "q", "max_tokens": 5, "ignore_eos": True, "stream": True}
    with_usage = streamed(server, {**body, "stream_options": {"include_usage": True}})
    assert with_usage[-1]["usage"]["completion_tokens"] == 5
    assert all("usage" not in c for c in streamed(server, body))
    refused(server, {**body, "stream_options": {"include_usgae": True}}, "include_usgae")
    del body["stream"]
    refused(server, {**body, "stream_options": {"include_usage": True}}, "stream_options")


def case_include_usage(server):
    body = {"prompt": "q", "max_tokens": 3, "stream": True}
    off = streamed(server, {**body, "stream_options": {"include_usage": False}})
    assert all("usage" not in c for c in off)
    refused(server, {**body, "stream_options": {"include_usage": "yes"}}, "include_usage")


def case_n(server):
    out = ok(server, {"prompt": "q", "max_tokens": 4, "n": 3, "temperature": 1.0, "seed": 0})
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    refused(server, {"prompt": "q", "n": 0}, "n")


def case_best_of(server):
    ok(server, {"prompt": "q", "max_tokens": 1, "best_of": 1})
    refused(server, {"prompt": "q", "best_of": 2}, "best_of")


def case_presence_penalty(server):
    # "z" leads every other token by its bias; once present, 2.0 takes more than that back
    body = {"prompt": "q", "max_tokens": 10, "temperature": 0, "logit_bias": force("z", 1.0)}
    assert text(ok(server, body)) == "z" * 10
    penalised = text(ok(server, {**body, "presence_penalty": 2.0}))
    assert penalised[0] == "z" and "z" not in penalised[1:]


def case_frequency_penalty(server):
    # bias 5, 2 a use: three uses leave "z" behind the others, for good
    body = {"prompt": "q", "max_tokens": 12, "temperature": 0, "logit_bias": force("z", 5)}
    penalised = text(ok(server, {**body, "frequency_penalty": 2.0}))
    assert penalised.startswith("zzz") and penalised.count("z") == 3


def case_logit_bias(server):
    out = ok(server, {"prompt": "q", "max_tokens": 5, "temperature": 1.0, "logit_bias": force("z")})
    assert text(out) == "zzzzz"
    refused(server, {"prompt": "q", "logit_bias": {"z": 1}}, "logit_bias")


def case_user(server, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.serving.serve"):
        out = ok(server, {"prompt": "q", "max_tokens": 1, "user": "user-1234"})
    assert any(out["id"] in r.message and "user-1234" in r.message for r in caplog.records)


def case_response_format(server):
    schema = {"type": "string", "enum": ["yes", "no"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    out = ok(server, {"prompt": "q", "max_tokens": 8, "response_format": fmt})
    assert json.loads(text(out)) in ("yes", "no")
    plain = {"prompt": "q", "max_tokens": 8, "temperature": 0}
    as_text = ok(server, {**plain, "response_format": {"type": "text"}})
    assert text(as_text) == text(ok(server, plain))


def case_type(server):  # ResponseFormat.type
    out = ok(server, {"prompt": "q", "max_tokens": 6, "response_format": {"type": "json_object"}})
    assert text(out).startswith("{")
    refused(server, {"prompt": "q", "response_format": {"type": "xml"}}, "response_format.type")


def case_json_schema(server):  # ResponseFormat.json_schema
    fmt = {"type": "json_object", "json_schema": {"schema": {}}}
    refused(server, {"prompt": "q", "response_format": fmt}, "json_schema")


def case_schema_(server):  # JSONSchemaFormat.schema
    schema = {"type": "integer", "minimum": 0, "maximum": 9}
    fmt = {"type": "json_schema", "json_schema": {"name": "digit", "schema": schema}}
    for seed in range(3):
        out = ok(server, {"prompt": "q", "max_tokens": 4, "seed": seed, "response_format": fmt})
        assert 0 <= json.loads(text(out)) <= 9


def _label(server, field: str, value):
    """A label (no part in what is generated): accepted when well-formed, refused by name when
    not."""
    fmt = {"type": "json_schema", "json_schema": {"schema": {"enum": ["a"]}, field: value}}
    assert text(ok(server, {"prompt": "q", "max_tokens": 4, "response_format": fmt})) == '"a"'
    fmt["json_schema"][field] = 7
    refused(server, {"prompt": "q", "response_format": fmt}, field)


def case_name_of_schema(server):  # JSONSchemaFormat.name
    _label(server, "name", "answer")


def case_description_of_schema(server):  # JSONSchemaFormat.description
    _label(server, "description", "one letter")


def case_strict_of_schema(server):  # JSONSchemaFormat.strict: followed either way
    for strict in (True, False):
        schema = {"enum": ["a"]}
        fmt = {"type": "json_schema", "json_schema": {"schema": schema, "strict": strict}}
        out = ok(server, {"prompt": "q", "max_tokens": 4, "response_format": fmt})
        assert text(out) == '"a"'


def case_repetition_penalty(server):
    body = {"prompt": "q", "max_tokens": 10, "temperature": 0, "logit_bias": force("z", 2.0)}
    penalised = text(ok(server, {**body, "repetition_penalty": 100.0}))
    assert penalised[0] == "z" and "z" not in penalised[1:]
    refused(server, {"prompt": "q", "repetition_penalty": 0}, "repetition_penalty")


def _eos_bias(server) -> dict:
    return {str(server.tokenizer.eos_id): 100, str(ord("k")): 50}


def case_min_tokens(server):
    body = {"prompt": "q", "max_tokens": 5, "temperature": 0, "logit_bias": _eos_bias(server)}
    assert text(ok(server, body)) == ""
    assert text(ok(server, {**body, "min_tokens": 3})) == "kkk"


def case_stop_token_ids(server):
    body = {"prompt": "q", "max_tokens": 5, "temperature": 0, "logit_bias": force("k")}
    assert text(ok(server, body)) == "kkkkk"
    out = ok(server, {**body, "stop_token_ids": [ord("k")]})
    assert text(out) == "" and out["choices"][0]["finish_reason"] == "stop"


def case_ignore_eos(server):
    # the end token is the most likely by far: only ignore_eos lets the budget run out
    body = {"prompt": "q", "max_tokens": 5, "temperature": 0, "logit_bias": _eos_bias(server)}
    assert ok(server, body)["choices"][0]["finish_reason"] == "stop"
    out = ok(server, {**body, "ignore_eos": True})
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 5


def case_prompt(server):
    body = {"max_tokens": 8, "temperature": 0}
    by_text = ok(server, {**body, "prompt": "def f"})
    assert text(ok(server, {**body, "prompt": list(b"def f")})) == text(by_text)
    assert ok(server, {**body, "prompt": "class"})["usage"]["prompt_tokens"] == 5
    refused(server, {**body, "prompt": ["a", "b"]}, "prompt")


def case_logprobs_completion(server):
    out = ok(server, {"prompt": "q", "max_tokens": 4, "logprobs": 2})["choices"][0]["logprobs"]
    assert len(out["tokens"]) == 4 and all(len(t) == 2 for t in out["top_logprobs"])
    assert ok(server, {"prompt": "q", "max_tokens": 4})["choices"][0]["logprobs"] is None
    refused(server, {"prompt": "q", "logprobs": 21}, "logprobs")


def case_echo(server):
    out = ok(server, {"prompt": "abc", "max_tokens": 3, "echo": True, "temperature": 0})
    plain = ok(server, {"prompt": "abc", "max_tokens": 3, "temperature": 0})
    assert text(out) == "abc" + text(plain)


def case_suffix(server):
    ok(server, {"prompt": "q", "max_tokens": 1, "suffix": ""})
    refused(server, {"prompt": "q", "suffix": "end"}, "suffix")


def _prompt_tokens(server, messages: list[dict], **body) -> int:
    return chat(server, {"messages": messages, "max_tokens": 1, **body})["usage"]["prompt_tokens"]


def case_messages(server):
    expected = len(prompt_ids(server.tokenizer, ASK))
    assert _prompt_tokens(server, ASK) == expected
    refused(server, {"messages": []}, "messages", H)


def case_role(server):
    system = [{"role": "system", "content": "hi"}]
    assert _prompt_tokens(server, system) == len(prompt_ids(server.tokenizer, system))
    refused(server, {"messages": [{"role": "robot", "content": "x"}]}, "role", H)


def case_content(server):
    longer = [{"role": "user", "content": "hi there"}]
    assert _prompt_tokens(server, longer) == _prompt_tokens(server, ASK) + len(" there")
    refused(server, {"messages": [{"role": "user"}]}, "content", H)


def case_name_of_message(server):
    named = [{"role": "user", "content": "hi", "name": "ada"}]
    expected = len(prompt_ids(server.tokenizer, plain_messages(named)))
    assert _prompt_tokens(server, named) == expected == _prompt_tokens(server, ASK) + len("ada: ")


CALLED = {"name": "set_unit", "arguments": '{"unit": "c"}'}


def _history(call: dict, **fields) -> list[dict]:
    return [
        {"role": "user", "content": "unit?"},
        {"role": "assistant", "content": None, "tool_calls": [{"function": call, **fields}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "done"},
    ]


def case_tool_calls_of_message(server):
    history = _history(CALLED)
    assert _prompt_tokens(server, history) == len(
        prompt_ids(server.tokenizer, plain_messages(history))
    )
    other = _history({**CALLED, "arguments": '{"unit": "f"}'})
    assert _prompt_tokens(server, other) == _prompt_tokens(server, history)  # one letter
    refused(server, {"messages": _history({"name": "x"})}, "arguments", H)


def case_tool_call_id(server):
    """Ours lays out a result after the call it answers; a model's template may write the id
    (Mistral's does): a label, checked for its type."""
    history = _history(CALLED)
    ok(server, {"messages": history, "max_tokens": 1}, H)
    history[2]["tool_call_id"] = 7
    refused(server, {"messages": history}, "tool_call_id", H)


def case_id_of_call(server):  # ToolCall.id: a label, as tool_call_id
    ok(server, {"messages": _history(CALLED, id="call_1"), "max_tokens": 1}, H)
    refused(server, {"messages": _history(CALLED, id=7)}, "id", H)


def case_type_of_call(server):  # ToolCall.type
    ok(server, {"messages": _history(CALLED, type="function"), "max_tokens": 1}, H)
    refused(server, {"messages": _history(CALLED, type="other")}, "type", H)


def case_name_of_called(server):  # CalledFunction.name: in the prompt
    renamed = _history({**CALLED, "name": "set_unix"})
    assert _prompt_tokens(server, renamed) == _prompt_tokens(server, _history(CALLED))
    longer = _history({**CALLED, "name": "set_units"})
    assert _prompt_tokens(server, longer) == _prompt_tokens(server, _history(CALLED)) + 1


def case_arguments(server):  # CalledFunction.arguments: in the prompt
    longer = _history({**CALLED, "arguments": '{"unit": "cc"}'})
    assert _prompt_tokens(server, longer) == _prompt_tokens(server, _history(CALLED)) + 1


def case_tools(server):
    offered = _prompt_tokens(server, ASK, tools=[UNIT])
    expected = len(prompt_ids(server.tokenizer, [system_message([UNIT]), *ASK]))
    assert offered == expected
    out = chat(server, {"tools": [UNIT], "tool_choice": "required", "max_tokens": 60})
    (call,) = out["choices"][0]["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"])["unit"] in ("c", "f")


def case_tool_choice(server):
    none = _prompt_tokens(server, ASK, tools=[UNIT], tool_choice="none")
    assert none == _prompt_tokens(server, ASK)  # "none": the tools are not offered
    named = {"type": "function", "function": {"name": "set_unit"}}
    out = chat(server, {"tools": [UNIT], "tool_choice": named, "max_tokens": 60})
    assert out["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "set_unit"
    refused(server, {"messages": ASK, "tool_choice": "required"}, "tool_choice", H)


def case_parallel_tool_calls(server):
    """An answer of two calls is two calls, unless parallel_tool_calls is false (the model
    here never writes two, so the parsing the server applies is checked on such an answer);
    constrained, one call either way."""
    two = json.dumps([{"name": "set_unit", "arguments": {"unit": u}} for u in "cf"])
    assert len(parse_call(two, [UNIT], parallel=True)) == 2
    assert parse_call(two, [UNIT], parallel=False) is None
    for parallel in (True, False):
        body = {"tools": [UNIT], "tool_choice": "required", "max_tokens": 60}
        out = chat(server, {**body, "parallel_tool_calls": parallel})
        assert len(out["choices"][0]["message"]["tool_calls"]) == 1


def case_type_of_tool(server):  # Tool.type
    refused(server, {"messages": ASK, "tools": [{**UNIT, "type": "other"}]}, "type", H)


def case_function_of_tool(server):  # Tool.function
    refused(server, {"messages": ASK, "tools": [{"type": "function"}]}, "function", H)


def _unit(**changes) -> dict:
    return {"type": "function", "function": {**UNIT["function"], **changes}}


def case_name_of_function(server):  # FunctionDef.name: offered, and the call's name
    longer = _prompt_tokens(server, ASK, tools=[_unit(name="set_units")])
    assert longer == _prompt_tokens(server, ASK, tools=[UNIT]) + 1
    tools = [_unit(name="pick")]
    out = chat(server, {"tools": tools, "tool_choice": "required", "max_tokens": 60})
    assert out["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "pick"
    refused(server, {"messages": ASK, "tools": [_unit(name="a b")]}, "name", H)


def case_description_of_function(server):  # FunctionDef.description: offered
    longer = _prompt_tokens(server, ASK, tools=[_unit(description="The units of temperatures")])
    assert longer == _prompt_tokens(server, ASK, tools=[UNIT]) + 1


def case_parameters(server):  # FunctionDef.parameters: a required call's arguments follow them
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 5}},
        "required": ["n"],
        "additionalProperties": False,
    }
    for seed in range(3):
        body = {"tools": [_unit(parameters=schema)], "tool_choice": "required", "seed": seed}
        out = chat(server, {**body, "max_tokens": 60, "temperature": 1.0})
        arguments = out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
        jsonschema.validate(json.loads(arguments), schema)


def case_strict_of_function(server):
    """Under "auto", an answer that opens a call ("{", forced here) is held to a strict
    function's schema: a valid call; without strict it runs on as text."""
    body = {"max_tokens": 60, "temperature": 0, "logit_bias": {str(ord("{")): 100}}
    loose = chat(server, {**body, "tools": [UNIT]})["choices"][0]
    assert loose["message"].get("tool_calls") is None
    assert loose["message"]["content"].startswith("{{")
    strict = chat(server, {**body, "tools": [_unit(strict=True)]})["choices"][0]
    (call,) = strict["message"]["tool_calls"]
    assert strict["finish_reason"] == "tool_calls"
    jsonschema.validate(json.loads(call["function"]["arguments"]), UNIT["function"]["parameters"])


def case_type_of_named(server):  # NamedToolChoice.type
    choice = {"type": "other", "function": {"name": "set_unit"}}
    refused(server, {"messages": ASK, "tools": [UNIT], "tool_choice": choice}, "type", H)


def case_function_of_named(server):  # NamedToolChoice.function / NamedFunction.name
    choice = {"type": "function", "function": {"name": "nope"}}
    refused(server, {"messages": ASK, "tools": [UNIT], "tool_choice": choice}, "nope", H)


def case_chat_logprobs(server):
    out = chat(server, {"max_tokens": 4, "ignore_eos": True, "logprobs": True})
    assert len(out["choices"][0]["logprobs"]["content"]) == 4
    assert chat(server, {"max_tokens": 4})["choices"][0]["logprobs"] is None
    # streamed with tools (the answer decided as a whole): every token's item comes along
    for choice in ("auto", "required"):
        body = {"messages": ASK, "tools": [UNIT], "tool_choice": choice, "max_tokens": 40}
        body |= {"logprobs": True, "stream": True, "stream_options": {"include_usage": True}}
        chunks = streamed(server, body, H)
        items = [
            item
            for c in chunks[:-1]
            for item in (c["choices"][0]["logprobs"] or {}).get("content", [])
        ]
        assert len(items) == chunks[-1]["usage"]["completion_tokens"] > 0


def case_top_logprobs(server):
    out = chat(server, {"max_tokens": 4, "logprobs": True, "top_logprobs": 3})
    assert all(len(item["top_logprobs"]) == 3 for item in out["choices"][0]["logprobs"]["content"])
    refused(server, {"messages": ASK, "top_logprobs": 3}, "top_logprobs", H)


def case_max_completion_tokens(server):
    out = chat(server, {"max_completion_tokens": 3, "ignore_eos": True})
    assert out["usage"]["completion_tokens"] == 3
    refused(server, {"messages": ASK, "max_completion_tokens": 0}, "max_completion_tokens", H)
    both = {"messages": ASK, "max_completion_tokens": 3, "max_tokens": 2}
    refused(server, both, "max_completion_tokens", H)


def case_lora_name(server):  # the adapters' routes; loading and unloading: tests/test_adapters.py
    r = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "x"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["param"] == "lora_name", r.text
    r = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": ""}, timeout=30)
    assert r.status_code == 400 and "lora_name" in r.json()["error"]["param"], r.text


def case_lora_path(server):
    body = {"lora_name": "x", "lora_path": ""}
    r = httpx.post(f"{server.url}/v1/load_lora_adapter", json=body, timeout=30)
    assert r.status_code == 400 and "lora_path" in r.json()["error"]["param"], r.text


def case_lora_int_id(server):
    body = {"lora_name": "x", "lora_int_id": 1}
    r = httpx.post(f"{server.url}/v1/unload_lora_adapter", json=body, timeout=30)
    assert r.status_code == 400 and "lora_int_id" in r.json()["error"]["param"], r.text


CASES = {
    "SamplingRequest.model": case_model,
    "SamplingRequest.max_tokens": case_max_tokens,
    "SamplingRequest.temperature": case_temperature,
    "SamplingRequest.top_p": case_top_p,
    "SamplingRequest.top_k": case_top_k,
    "SamplingRequest.seed": case_seed,
    "SamplingRequest.stop": case_stop,
    "SamplingRequest.stream": case_stream,
    "SamplingRequest.stream_options": case_stream_options,
    "StreamOptions.include_usage": case_include_usage,
    "SamplingRequest.n": case_n,
    "SamplingRequest.best_of": case_best_of,
    "SamplingRequest.presence_penalty": case_presence_penalty,
    "SamplingRequest.frequency_penalty": case_frequency_penalty,
    "SamplingRequest.logit_bias": case_logit_bias,
    "SamplingRequest.user": case_user,
    "SamplingRequest.response_format": case_response_format,
    "ResponseFormat.type": case_type,
    "ResponseFormat.json_schema": case_json_schema,
    "JSONSchemaFormat.schema_": case_schema_,
    "JSONSchemaFormat.name": case_name_of_schema,
    "JSONSchemaFormat.description": case_description_of_schema,
    "JSONSchemaFormat.strict": case_strict_of_schema,
    "SamplingRequest.repetition_penalty": case_repetition_penalty,
    "SamplingRequest.min_tokens": case_min_tokens,
    "SamplingRequest.stop_token_ids": case_stop_token_ids,
    "SamplingRequest.ignore_eos": case_ignore_eos,
    "CompletionRequest.prompt": case_prompt,
    "CompletionRequest.logprobs": case_logprobs_completion,
    "CompletionRequest.echo": case_echo,
    "CompletionRequest.suffix": case_suffix,
    "ChatRequest.messages": case_messages,
    "ChatRequest.logprobs": case_chat_logprobs,
    "ChatRequest.top_logprobs": case_top_logprobs,
    "ChatRequest.max_completion_tokens": case_max_completion_tokens,
    "ChatRequest.tools": case_tools,
    "ChatRequest.tool_choice": case_tool_choice,
    "ChatRequest.parallel_tool_calls": case_parallel_tool_calls,
    "Message.role": case_role,
    "Message.content": case_content,
    "Message.name": case_name_of_message,
    "Message.tool_calls": case_tool_calls_of_message,
    "Message.tool_call_id": case_tool_call_id,
    "ToolCall.id": case_id_of_call,
    "ToolCall.type": case_type_of_call,
    "ToolCall.function": case_tool_calls_of_message,
    "CalledFunction.name": case_name_of_called,
    "CalledFunction.arguments": case_arguments,
    "Tool.type": case_type_of_tool,
    "Tool.function": case_function_of_tool,
    "FunctionDef.name": case_name_of_function,
    "FunctionDef.description": case_description_of_function,
    "FunctionDef.parameters": case_parameters,
    "FunctionDef.strict": case_strict_of_function,
    "NamedToolChoice.type": case_type_of_named,
    "NamedToolChoice.function": case_function_of_named,
    "NamedFunction.name": case_function_of_named,
    "LoadAdapterRequest.lora_name": case_lora_name,
    "LoadAdapterRequest.lora_path": case_lora_path,
    "UnloadAdapterRequest.lora_name": case_lora_name,
    "UnloadAdapterRequest.lora_int_id": case_lora_int_id,
}


def test_every_field_has_a_case():
    """A new field needs a case here: honoured (and checked) or refused by name."""
    fields = request_fields()
    assert sorted(set(fields) - set(CASES)) == [], "fields without a case"
    assert sorted(set(CASES) - set(fields)) == [], "cases of no field"


@pytest.mark.parametrize("field", request_fields())
def test_the_field_is_honoured_or_refused(server, field, request):
    case = CASES[field]
    if "caplog" in case.__code__.co_varnames[: case.__code__.co_argcount]:
        case(server, request.getfixturevalue("caplog"))
    else:
        case(server)
