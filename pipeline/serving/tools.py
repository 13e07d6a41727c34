"""Tool calls on chat completions: how tools reach the prompt and how calls come back.

Prompt. A chat template that takes `tools` (Llama 3.1+, Qwen2.5, Mistral's...) renders them its
own way. Otherwise (our own tokenizers, templates without tools) they are described in a system
message, our documented convention:

    You can call these functions. To call one, answer with only a JSON object
    {"name": <function name>, "arguments": <its arguments>}.
    Functions: [{"name": ..., "description": ..., "parameters": {...}}, ...]

Output. A call is a JSON object {"name", "arguments"} (also inside Hermes-style
`<tool_call>...</tool_call>` tags, as Qwen's templates ask). With `tool_choice` "required" or a
named function, sampling is constrained to exactly such an object whose arguments follow the
function's parameters schema (the grammar of `call_schema`), so the arguments always parse and
validate; with "auto" the model chooses, and its answer is a call when it parses as one. One
call per choice.
"""

from __future__ import annotations

import json
import re
import uuid

CONVENTION = (
    "You can call these functions. To call one, answer with only a JSON object "
    '{"name": <function name>, "arguments": <its arguments>}.\nFunctions: '
)


def function_specs(tools: list[dict]) -> list[dict]:
    return [
        {
            "name": t["function"]["name"],
            "description": t["function"].get("description") or "",
            "parameters": t["function"].get("parameters") or {"type": "object"},
        }
        for t in tools
    ]


def system_message(tools: list[dict]) -> dict:
    """The convention's system message describing `tools`."""
    return {"role": "system", "content": CONVENTION + json.dumps(function_specs(tools))}


def plain_messages(messages: list[dict]) -> list[dict]:
    """Messages as a template without tool support (or ours) can render them: an assistant's
    tool calls as the convention's JSON, a tool's result as a "tool" turn."""
    out = []
    for m in messages:
        content = m.get("content") or ""
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [
                {"name": c["function"]["name"], "arguments": _loads(c["function"]["arguments"])}
                for c in m["tool_calls"]
            ]
            content = json.dumps(calls[0] if len(calls) == 1 else calls)
        out.append({"role": m["role"], "content": content})
    return out


def _loads(arguments):
    try:
        return json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        return arguments


def call_schema(tools: list[dict], name: str | None = None) -> dict:
    """The JSON schema of one call: of function `name`, or of any of `tools`."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in function_specs(tools)
        if name is None or f["name"] == name
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


_TAGGED = re.compile(r"^\s*<tool_call>\s*(.*?)\s*</tool_call>\s*$", re.DOTALL)


def parse_call(text: str, tools: list[dict]) -> list[dict] | None:
    """OpenAI's `tool_calls` from an answer that is a call to one of `tools`; None otherwise."""
    tagged = _TAGGED.match(text)
    try:
        call = json.loads(tagged.group(1) if tagged else text)
    except json.JSONDecodeError:
        return None
    names = {f["name"] for f in function_specs(tools)}
    if not (isinstance(call, dict) and call.get("name") in names and "arguments" in call):
        return None
    arguments = call["arguments"]
    return [
        {
            "id": "call_" + uuid.uuid4().hex[:24],
            "type": "function",
            "function": {
                "name": call["name"],
                "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
            },
        }
    ]
