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
validate; with "auto" the model chooses, and its answer is a call when it parses as one. Under
"auto", a function marked `strict: true` is enforced too (`auto_grammar`): the answer is either
free text whose first non-blank character opens no call (not "{", not "<tool_call>"), or a call
whose arguments follow its function's schema (the other functions' arguments: any object).
Several calls in one answer (a JSON list of calls, or several tagged ones) are several
`tool_calls` unless the request says `parallel_tool_calls: false`, which makes such an answer
plain content; the constrained modes ("required", a named function, strict under "auto")
produce one call.
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
    tool calls as the convention's JSON, a tool's result as a "tool" turn, a message's author
    `name` before its content ("name: content")."""
    out = []
    for m in messages:
        content = m.get("content") or ""
        if m.get("name"):
            content = f"{m['name']}: {content}"
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


def call_schema(tools: list[dict], name: str | None = None, loose: bool = False) -> dict:
    """The JSON schema of one call: of function `name`, or of any of `tools` (`loose`: the
    arguments of a function not marked `strict` are any object)."""
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f["name"]},
                "arguments": f["parameters"] if strict or not loose else {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f, strict in zip(function_specs(tools), _strict(tools), strict=True)
        if name is None or f["name"] == name
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _strict(tools: list[dict]) -> list[bool]:
    return [bool(t["function"].get("strict")) for t in tools]


TAG, END_TAG = "<tool_call>", "</tool_call>"


def auto_grammar(tools: list[dict]) -> str | None:
    """The llguidance (Lark) grammar of an answer under tool_choice "auto" when a function is
    marked `strict`: free text that opens no call, or a call (bare or in Hermes tags) that
    follows `call_schema(tools, loose=True)`; None when no function is strict."""
    if not any(_strict(tools)):
        return None
    # the text's first non-blank character is not "{", and its start is no prefix of the tag
    opening = ["[^{<\\s]"] + [
        re.escape(TAG[:i]) + f"[^{re.escape(TAG[i])}]" for i in range(1, len(TAG))
    ]
    free = f"/\\s*({'|'.join(opening)})[\\s\\S]*/ | /\\s*/"
    # compact JSON, as structured outputs are: no free whitespace to spend tokens on
    compact = {"x-guidance": {"whitespace_flexible": False}, **call_schema(tools, loose=True)}
    return "\n".join(
        [
            "start: call | free",
            f'call: body | "{TAG}" /\\s*/ body /\\s*/ "{END_TAG}"',
            f"body: %json {json.dumps(compact)}",
            f"free: {free}",
        ]
    )


_TAGGED = re.compile(r"\s*<tool_call>\s*(.*?)\s*</tool_call>\s*", re.DOTALL)


def _call_objects(text: str) -> list | None:
    """The JSON values of an answer that is only calls: one or more `<tool_call>` blocks, or
    one JSON value (an object, or a list of them); None when it is not."""
    blocks, end = [], 0
    for match in _TAGGED.finditer(text):
        if match.start() != end:
            break
        blocks.append(match.group(1))
        end = match.end()
    try:
        if blocks and end == len(text):
            return [json.loads(block) for block in blocks]
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) else [value]


def parse_call(text: str, tools: list[dict], parallel: bool = True) -> list[dict] | None:
    """OpenAI's `tool_calls` from an answer that is a call to one of `tools` (several, with
    `parallel`: a JSON list of calls or several tagged ones); None otherwise."""
    calls = _call_objects(text)
    names = {f["name"] for f in function_specs(tools)}
    if not calls or (len(calls) > 1 and not parallel):
        return None
    if not all(isinstance(c, dict) and c.get("name") in names and "arguments" in c for c in calls):
        return None
    return [
        {
            "id": "call_" + uuid.uuid4().hex[:24],
            "type": "function",
            "function": {
                "name": call["name"],
                "arguments": (
                    call["arguments"]
                    if isinstance(call["arguments"], str)
                    else json.dumps(call["arguments"])
                ),
            },
        }
        for call in calls
    ]
