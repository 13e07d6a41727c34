"""The OpenAI API beyond plain sampling, on a real server on 127.0.0.1: logprobs, echo, n,
penalties, logit_bias, min_tokens, stop_token_ids, ignore_eos. Run: pytest tests/test_serve_api.py
"""

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import full_logits
from helpers import NAME, Server, openai_client

from pipeline.serving.controls import Controls, adjust, control_arrays

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


def _post(server, body, route="completions"):
    r = httpx.post(f"{server.url}/v1/{route}", json={"model": NAME, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _ids(server, texts: list[str]) -> list[int]:
    """Token ids from logprobs' token texts (each names one token)."""
    by_text = {server.tokenizer.token_text(i): i for i in range(server.model.cfg.vocab_size)}
    return [by_text[t] for t in texts]


def _log_softmax(server, ids: list[int]) -> np.ndarray:
    """The model's own forward pass over `ids`: (len(ids), V) float64 log-probabilities."""
    return np.asarray(jax.nn.log_softmax(full_logits(server.model, [ids])[0]), np.float64)


def test_echo_scores_the_prompt_with_the_models_own_log_probabilities(server):
    prompt = "def add(a, b):\n    return"
    ids = server.tokenizer.encode(prompt)
    out = _post(server, {"prompt": prompt, "echo": True, "max_tokens": 0, "logprobs": 3})
    choice = out["choices"][0]
    assert choice["text"] == prompt and out["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    reference = _log_softmax(server, ids)
    expected = [reference[i - 1, ids[i]] for i in range(1, len(ids))]
    np.testing.assert_allclose(lp["token_logprobs"][1:], expected, atol=1e-4)
    for i, top in enumerate(lp["top_logprobs"][1:], start=1):  # the 3 largest, in order
        assert len(top) == 3
        np.testing.assert_allclose(
            sorted(top.values(), reverse=True), np.sort(reference[i - 1])[::-1][:3], atol=1e-4
        )
    assert "".join(lp["tokens"]) == prompt
    assert lp["text_offset"] == [len(server.tokenizer.decode(ids[:i])) for i in range(len(ids))]


def test_completion_logprobs_are_the_raw_distributions_of_the_chosen_tokens(server):
    prompt = "import os\n"
    ids = server.tokenizer.encode(prompt)
    out = _post(server, {"prompt": prompt, "max_tokens": 6, "logprobs": 2, "temperature": 0})
    lp = out["choices"][0]["logprobs"]
    generated = _ids(server, lp["tokens"])
    reference = _log_softmax(server, ids + generated)
    expected = [reference[len(ids) - 1 + i, t] for i, t in enumerate(generated)]
    np.testing.assert_allclose(lp["token_logprobs"], expected, atol=1e-4)
    for top, chosen in zip(lp["top_logprobs"], lp["tokens"], strict=True):
        assert len(top) == 2 and max(top, key=top.get) == chosen  # greedy: the top token
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])

    # echo with generation: the prompt's items first, then the completion's
    both = _post(
        server, {"prompt": prompt, "echo": True, "max_tokens": 6, "logprobs": 2, "temperature": 0}
    )
    lp2 = both["choices"][0]["logprobs"]
    assert both["choices"][0]["text"] == prompt + out["choices"][0]["text"]
    assert lp2["token_logprobs"][len(ids) :] == pytest.approx(lp["token_logprobs"], abs=1e-5)
    assert lp2["text_offset"][len(ids)] == len(prompt)


def test_chat_logprobs_in_openais_format_through_the_client(server):
    client = openai_client(server)
    ask = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    out = client.chat.completions.create(**ask, temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert 1 <= len(content) <= 5
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        token_id = _ids(server, [item.token])[0]
        if token_id < server.tokenizer.vocab_size:  # the random model's padded ids have no bytes
            assert item.bytes == list(server.tokenizer.token_bytes(token_id))
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-5)  # greedy
    streamed = client.chat.completions.create(**ask, temperature=0, logprobs=True, stream=True)
    items = [
        i
        for c in streamed
        if c.choices and c.choices[0].logprobs
        for i in c.choices[0].logprobs.content
    ]
    assert [i.token for i in items] == [i.token for i in content]


def test_n_choices_sample_their_own_streams(server):
    client = openai_client(server)
    sampled = client.completions.create(
        model=NAME, prompt="x = ", max_tokens=12, temperature=1.0, seed=5, n=4
    )
    texts = [c.text for c in sorted(sampled.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(sampled.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    assert len(set(texts)) == 4
    again = client.completions.create(
        model=NAME, prompt="x = ", max_tokens=12, temperature=1.0, seed=5, n=4
    )
    assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == texts  # seeded
    # choice i samples with seed + i: choice 1 of seed 5 is choice 0 of seed 6
    six = client.completions.create(
        model=NAME, prompt="x = ", max_tokens=12, temperature=1.0, seed=6
    )
    assert six.choices[0].text == texts[1]
    prefills = []  # rows of each prefill call: the prompt is prefilled once, then copied
    engine = server.engine
    original = engine._prefill_call
    engine._prefill_call = lambda reqs, *a, **kw: (
        prefills.append(len(reqs)),
        original(reqs, *a, **kw),
    )[1]
    try:
        greedy = client.completions.create(
            model=NAME, prompt="x = ", max_tokens=12, temperature=0, n=4
        )
    finally:
        del engine._prefill_call
    assert prefills == [1]
    assert len({c.text for c in greedy.choices}) == 1
    assert greedy.choices[0].text == server.expected("x = ", 12, stop_ids={server.tokenizer.eos_id})
    stream = client.completions.create(
        model=NAME, prompt="x = ", max_tokens=12, temperature=1.0, seed=5, n=4, stream=True
    )
    pieces = {i: "" for i in range(4)}
    for chunk in stream:
        for c in chunk.choices:
            pieces[c.index] += c.text
    assert [pieces[i] for i in range(4)] == texts


def _reference_penalised_greedy(server, ids, steps, presence, frequency, repetition, bias):
    """Greedy decoding with OpenAI's / vLLM's penalty formulas, in NumPy over full forwards."""
    out = []
    for _ in range(steps):
        x = np.asarray(full_logits(server.model, [ids + out])[0][-1], np.float64)
        for token, b in bias.items():
            x[token] += b
        seen = set(ids) | set(out)
        for t in seen:
            x[t] = x[t] / repetition if x[t] > 0 else x[t] * repetition
        counts = np.bincount(out, minlength=x.size) if out else np.zeros(x.size)
        x -= frequency * counts + presence * (counts > 0)
        out.append(int(np.argmax(x)))
    return out


def test_penalties_and_bias_follow_their_formulas(server):
    prompt = "aaaa bbbb aaaa"
    ids = server.tokenizer.encode(prompt)
    settings = {"presence": 0.8, "frequency": 0.6, "repetition": 1.4, "bias": {ord("c"): 2.5}}
    expected = _reference_penalised_greedy(server, ids, 10, **settings)
    out = _post(
        server,
        {
            "prompt": prompt,
            "max_tokens": 10,
            "temperature": 0,
            "presence_penalty": 0.8,
            "frequency_penalty": 0.6,
            "repetition_penalty": 1.4,
            "logit_bias": {str(ord("c")): 2.5},
            "ignore_eos": True,
            "logprobs": 0,
        },
    )
    tokens = _ids(server, out["choices"][0]["logprobs"]["tokens"])
    assert tokens == expected
    plain = _reference_penalised_greedy(server, ids, 10, 0.0, 0.0, 1.0, {})
    assert plain != expected  # the penalties did change the choice


def test_adjust_matches_numpy_on_a_small_vocabulary():
    """controls.adjust against the formulas, row by row, with mixed controls in one batch."""
    rng = np.random.default_rng(0)
    V = 11
    logits = rng.normal(size=(3, V)).astype(np.float32) * 3
    controls = [
        Controls(presence=0.5, frequency=0.25, repetition=1.5, bias={2: 3.0, 7: -100.0}),
        Controls(),
        Controls(min_tokens=2, stop_ids=(4, 9)),
    ]
    arrays = control_arrays(controls)
    counts = np.zeros((3, V), np.int32)
    counts[0, [1, 1, 5]] = [2, 0, 1]
    counts[0, 1] = 2
    prompt = np.zeros((3, V), bool)
    prompt[0, 3] = True  # a prompt token
    seen = prompt | (counts > 0)
    bias = np.zeros((3, V), np.float32)
    bias[0, 2], bias[0, 7] = 3.0, -100.0
    view = {
        **{
            k: jnp.asarray(arrays[k])
            for k in ("presence", "frequency", "repetition", "min_tokens", "stop_ids", "active")
        },
        "bias": jnp.asarray(bias),
        "counts": jnp.asarray(counts),
        "prompt": jnp.asarray(prompt),
    }
    everything = jnp.full((3, 1), -1, jnp.int32)  # bitmask: every token allowed
    got = np.asarray(adjust(jnp.asarray(logits), view, jnp.asarray([3, 3, 1]), everything))
    x = logits[0].astype(np.float64) + bias[0]
    x = np.where(seen[0], np.where(x > 0, x / 1.5, x * 1.5), x)
    x -= 0.25 * counts[0] + 0.5 * (counts[0] > 0)
    np.testing.assert_allclose(got[0], x, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[1], logits[1])  # no controls: untouched
    assert np.isneginf(got[2, [4, 9]]).all()  # 1 token generated, min_tokens 2: stops masked
    np.testing.assert_array_equal(np.delete(got[2], [4, 9]), np.delete(logits[2], [4, 9]))


def test_logit_bias_min_tokens_stop_token_ids_and_ignore_eos(server):
    eos = server.tokenizer.eos_id
    force = lambda t: {str(t): 100}  # noqa: E731
    forced = _post(
        server, {"prompt": "q", "max_tokens": 5, "temperature": 1.0, "logit_bias": force(ord("z"))}
    )
    assert forced["choices"][0]["text"] == "zzzzz"
    # end-of-text forced: an empty completion, unless min_tokens or ignore_eos hold it back
    bias = {str(eos): 100, str(ord("k")): 50}
    stopped = _post(server, {"prompt": "q", "max_tokens": 5, "temperature": 0, "logit_bias": bias})
    assert stopped["choices"][0]["text"] == "" and stopped["choices"][0]["finish_reason"] == "stop"
    held = _post(
        server,
        {"prompt": "q", "max_tokens": 5, "temperature": 0, "logit_bias": bias, "min_tokens": 3},
    )
    assert held["choices"][0]["text"] == "kkk" and held["choices"][0]["finish_reason"] == "stop"
    # the end token forced, ignore_eos: generation goes on past it (as vLLM's does: the end
    # tokens are generated, and written as nothing) until the budget runs out
    ignored = _post(
        server,
        {"prompt": "q", "max_tokens": 5, "temperature": 0, "logit_bias": bias, "ignore_eos": True},
    )
    assert ignored["choices"][0]["finish_reason"] == "length"
    assert ignored["usage"]["completion_tokens"] == 5
    by_id = _post(
        server,
        {
            "prompt": "q",
            "max_tokens": 5,
            "temperature": 0,
            "logit_bias": force(ord("k")),
            "stop_token_ids": [ord("k")],
        },
    )
    assert by_id["choices"][0]["text"] == "" and by_id["choices"][0]["finish_reason"] == "stop"


def test_no_request_option_recompiles_anything_after_start_up():
    """Every option above runs on the programs compiled at start-up: a server of its own, so
    no earlier request has compiled anything for it."""
    server = Server()
    try:
        _no_compilation(server)
    finally:
        server.close()


def _no_compilation(server):
    compiles = []

    def listener(event, *args, **kwargs):
        if "compile" in event or "tracing" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for body in (
            {"prompt": "abc", "max_tokens": 4, "logprobs": 5, "temperature": 0.7, "seed": 1},
            {"prompt": "abc", "max_tokens": 0, "echo": True, "logprobs": 1},
            {"prompt": "abc", "max_tokens": 4, "n": 3, "presence_penalty": 1.0, "top_k": 5},
            {
                "prompt": "abc" * 5,
                "max_tokens": 4,
                "logit_bias": {"97": 3},
                "min_tokens": 2,
                "repetition_penalty": 1.2,
            },
            {"prompt": "abc", "max_tokens": 4, "response_format": {"type": "json_object"}},
            {"prompt": "abc", "max_tokens": 4, "stop": ["a"], "top_p": 0.5, "frequency_penalty": 1},
        ):
            _post(server, body)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [], sorted(set(compiles))


def _random_schema(rng, depth: int = 0, kind: str | None = None) -> dict:
    """A JSON schema of the kinds clients send: objects (nested), enums, arrays, numbers,
    booleans, short strings; bounded so a random model's output fits in max_tokens."""
    kinds = ["enum", "integer", "number", "boolean", "string", "array"]
    if depth < 2:
        kinds.append("object")
    kind = kind or kinds[rng.integers(len(kinds))]
    if kind == "enum":
        return {"enum": [str(x) for x in rng.choice(["red", "green", "blue", "cyan"], 3, False)]}
    if kind == "integer":
        return {"type": "integer", "minimum": -50, "maximum": 500}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": 10}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "string":
        return {"type": "string", "maxLength": 4}
    if kind == "array":
        items = _random_schema(rng, depth + 1)
        return {"type": "array", "items": items, "minItems": 1, "maxItems": 2}
    names = ["id", "name", "tags", "size", "ok"][: rng.integers(1, 4)]
    return {
        "type": "object",
        "properties": {n: _random_schema(rng, depth + 1) for n in names},
        "required": names,
        "additionalProperties": False,
    }


def test_json_schema_outputs_parse_and_validate(server):
    """20 random schemas, sampled at temperature 1: every output parses and validates."""
    import json

    import jsonschema

    rng = np.random.default_rng(0)
    for i in range(20):
        schema = _random_schema(rng, 0, kind="object")
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}
        out = _post(
            server,
            {
                "prompt": "{",
                "max_tokens": 110,
                "temperature": 1.0,
                "seed": i,
                "response_format": fmt,
            },
        )
        choice = out["choices"][0]
        assert choice["finish_reason"] == "stop", (schema, choice)
        jsonschema.validate(json.loads(choice["text"]), schema)


def test_json_mode_and_unsupported_schemas(server):
    import json

    client = openai_client(server)
    out = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "a JSON object, please"}],
        max_tokens=100,
        temperature=0,
        response_format={"type": "json_object"},
        # a random model would spin a key forever; "}" made likely, the mask decides where
        logit_bias={str(ord("}")): 5, str(ord(":")): 5},
    )
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    bad = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "string", "format": "ipv9"}},
    }
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": NAME, "prompt": "x", "response_format": bad},
        timeout=30,
    )
    assert r.status_code == 400 and "ipv9" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "response_format"


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "set_alarm",
        "parameters": {
            "type": "object",
            "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}},
            "required": ["hour"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def long_server():
    """Room for the tools' descriptions in the prompt (our convention's system message)."""
    import dataclasses

    from helpers import CFG

    s = Server(slots=2, cfg=dataclasses.replace(CFG, max_seq_len=1024))
    yield s
    s.close()


def test_tool_calls_follow_their_parameters_and_stream_as_openai_streams_them(long_server):
    server = long_server
    import json

    import jsonschema

    client = openai_client(server)
    ask = {"model": NAME, "messages": [{"role": "user", "content": "weather in Oslo?"}]}
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = client.chat.completions.create(
        **ask, tools=[WEATHER, CLOCK], tool_choice=named, max_tokens=120, temperature=1.0, seed=3
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    for seed in range(5):  # required: a call to either tool, arguments valid for that tool
        out = client.chat.completions.create(
            **ask,
            tools=[WEATHER, CLOCK],
            tool_choice="required",
            max_tokens=120,
            seed=seed,
            temperature=1.0,
        )
        (call,) = out.choices[0].message.tool_calls
        schema = {"get_weather": WEATHER, "set_alarm": CLOCK}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), schema["function"]["parameters"])

    stream = client.chat.completions.create(
        **ask,
        tools=[WEATHER, CLOCK],
        tool_choice=named,
        max_tokens=120,
        temperature=1.0,
        seed=3,
        stream=True,
    )
    name, arguments, finish = "", "", None
    for chunk in stream:
        for c in chunk.choices:
            for delta in c.delta.tool_calls or []:
                name += delta.function.name or ""
                arguments += delta.function.arguments or ""
            finish = c.finish_reason or finish
    assert (name, finish) == ("get_weather", "tool_calls")
    first = client.chat.completions.create(
        **ask, tools=[WEATHER, CLOCK], tool_choice=named, max_tokens=120, temperature=1.0, seed=3
    )
    assert arguments == first.choices[0].message.tool_calls[0].function.arguments


def test_a_tool_conversation_and_auto_and_refusals(long_server):
    server = long_server
    client = openai_client(server)
    history = [
        {"role": "user", "content": "weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"forecast": "rain"}'},
    ]
    out = client.chat.completions.create(
        model=NAME, messages=history, tools=[WEATHER], max_tokens=8, temperature=0
    )
    message = out.choices[0].message  # auto: a random model answers in text
    assert message.tool_calls is None and isinstance(message.content, str)
    for body, words in (
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "nope",
        ),
        ({"tool_choice": "required"}, "tool_choice needs tools"),
    ):
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"model": NAME, "messages": [{"role": "user", "content": "x"}], **body},
            timeout=30,
        )
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
