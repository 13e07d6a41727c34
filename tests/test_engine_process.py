"""`pipeline serve` with its engine in a process of its own (`serving/core.py`, the default):
what a client gets equals the model's own output, every route works across the pipe, and a
dead engine is seen at once: requests in flight end with an error, new ones are refused, the
server exits non-zero.

Run: pytest -m slow tests/test_engine_process.py
"""

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from conftest import make_tiny_runs
from helpers import openai_client, serve_process

pytestmark = pytest.mark.slow


def _engine_pid(proc) -> int:
    """The engine core process among the server's children."""
    for task in Path(f"/proc/{proc.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:
                return int(child)
    raise AssertionError("no engine process")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    base, lora = make_tiny_runs(tmp)
    return tmp, base, lora


def test_the_engine_process_serves_what_the_model_generates(runs):
    """Greedy text equals `generate`'s, echo scores the prompt, n choices, a JSON schema, an
    adapter loaded and unloaded at run time, the engine's figures in /metrics."""
    from pipeline.inference.generate import generate
    from pipeline.inference.runs import load_for_inference

    tmp, base, lora = runs
    proc, url = serve_process(base, tmp / "jax", "serve.slots=4", "serve.max_adapters=1")
    try:
        assert _engine_pid(proc) != proc.pid
        client = openai_client(type("S", (), {"url": url}))
        loaded = load_for_inference(base)
        prompt = "def main():"
        ids = loaded.tokenizer.encode(prompt)
        want = loaded.tokenizer.decode(generate(loaded.model, [ids], 12).tokens[0])
        name = Path(base).name
        got = client.completions.create(
            model=name, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        assert got.choices[0].text == want
        assert got.usage.completion_tokens == 12
        scored = client.completions.create(
            model=name,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            logprobs=2,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = [c.choices[0] for c in scored if c.choices]
        lps = [x for c in chunks if c.logprobs for x in c.logprobs.token_logprobs]
        assert len(lps) == 12 and all(x <= 0 for x in lps)  # each token's, over the pipe
        assert "".join(c.text for c in chunks) == want
        # the tokens of one engine call (4 decode steps) reach the server together and go out
        # as one chunk (or with later ones, when the stream is behind): at most the prefill's
        # token, then 4 + 4 + 3, where one chunk per token would be 12
        sizes = [len(c.logprobs.tokens) for c in chunks if c.logprobs and c.logprobs.tokens]
        assert sum(sizes) == 12 and len(sizes) <= 4
        echo = client.completions.create(
            model=name, prompt=prompt, max_tokens=0, echo=True, logprobs=2
        )
        tops = echo.choices[0].logprobs.token_logprobs
        assert tops[0] is None and len(tops) == len(ids) and all(x <= 0 for x in tops[1:])
        many = client.completions.create(
            model=name, prompt=prompt, max_tokens=4, n=3, temperature=1.0, seed=3
        )
        assert sorted(c.index for c in many.choices) == [0, 1, 2]
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
        shaped = client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": "a number"}],
            max_tokens=40,
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
        )
        content = shaped.choices[0].message.content
        assert content.startswith('{"a":')  # the grammar, followed in the engine's process
        if shaped.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(content)["a"], int)
        body = {"lora_name": "ft", "lora_path": lora}
        assert httpx.post(url + "/v1/load_lora_adapter", json=body).status_code == 200
        assert "ft" in [m.id for m in client.models.list().data]
        tuned = client.completions.create(model="ft", prompt=prompt, max_tokens=3)
        assert tuned.usage.completion_tokens >= 1
        unload = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "ft"})
        assert unload.status_code == 200
        assert "ft" not in [m.id for m in client.models.list().data]
        metrics = httpx.get(url + "/metrics").text
        figures = dict(
            line.rsplit(" ", 1) for line in metrics.splitlines() if not line.startswith("#")
        )
        assert float(figures["pipeline_engine_iterations"]) > 0
        steps, rows = (
            float(figures[f"pipeline_engine_decode_{k}"]) for k in ("steps_run", "row_steps")
        )
        assert float(figures["pipeline_engine_prefill_calls"]) > 0 and 0 < steps <= rows
        assert float(figures["pipeline_generated_tokens_total"]) >= 12
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stdout.read()


def test_a_killed_engine_ends_every_request_and_the_server_exits_non_zero(runs):
    """The engine process killed under load: every streaming and whole request ends within
    seconds with an error (an SSE error event after the status line, else a 5xx body), the
    server answers new requests 503 or is already gone, and it exits with status 1."""
    tmp, base, _ = runs
    proc, url = serve_process(base, tmp / "jax", "serve.slots=4")
    name = Path(base).name

    async def one(client, stream: bool, started: asyncio.Event):
        body = {
            "model": name,
            "prompt": "x",
            "max_tokens": 100,
            "ignore_eos": True,
            "stream": stream,
        }
        if not stream:
            r = await client.post("/v1/completions", json=body)
            return r.status_code, r.json()
        async with client.stream("POST", "/v1/completions", json=body) as r:
            lines = []
            async for line in r.aiter_lines():
                if line:
                    started.set()
                    lines.append(line)
            return r.status_code, lines

    async def load():
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            started = asyncio.Event()
            tasks = [asyncio.create_task(one(client, i % 2 == 0, started)) for i in range(8)]
            await asyncio.wait_for(started.wait(), 30)
            os.kill(_engine_pid(proc), signal.SIGKILL)
            killed = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*tasks), 20)
            return results, time.monotonic() - killed

    try:
        results, took = asyncio.run(load())
        assert took < 10
        lost = 0
        for status, answer in results:
            if isinstance(answer, list) and status != 200:  # refused: it came after the kill
                assert status == 503 and json.loads(answer[0])["error"]["message"]
                pass
            elif isinstance(answer, list):  # streamed: 200, tokens, then (maybe) an error event
                assert answer[-1] == "data: [DONE]"
                events = [json.loads(x[6:]) for x in answer[:-1]]
                lost += "error" in events[-1]
                finished = events[-1].get("choices", [{}])[0].get("finish_reason")
                assert "error" in events[-1] or finished == "length"
            else:
                assert status == 200 or (status >= 500 and answer["error"]["message"])
                lost += status == 500
        assert lost >= 1  # the kill came while requests ran: they ended with an error
        try:
            health = httpx.get(url + "/health", timeout=2)
            assert health.status_code == 503 and "exited" in health.json()["error"]
            late = httpx.post(url + "/v1/completions", json={"model": name, "prompt": "x"})
            assert late.status_code == 503
        except httpx.TransportError:
            pass  # the server had already shut down
        assert proc.wait(30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
