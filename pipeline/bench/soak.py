"""`pipeline bench soak`: many random requests against the real server on loopback, bounded.

Clients (in a process of their own, as `bench serve`'s) send completions and chat completions
with options drawn from the valid space (streaming or not, n, sampling values, stop sequences,
log-probabilities, penalties, JSON mode, budgets), `concurrency` at a time, until `requests`
have been sent or `seconds` have passed. Some clients leave in the middle of a stream (they
close the connection) and some read their stream slowly. Every request ends in one of:
answered (a complete, well-formed answer), left (the client went away on purpose) or failed
(anything else: a 5xx, a 4xx to a valid body, a dropped connection, a stream without its end);
a refusal (429 or 503, an honest "not now") is counted and the request retried after a second,
as clients do. The server gets a quarter as many slots as there are clients and a queue as
long, so refusals happen. The report gives those counts, latency percentiles of the answered
requests, the busy slots and KV blocks in use once the load is over, and the server process's
RSS after a warm-up and at the end.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import random
import time
from collections import Counter
from dataclasses import replace

import numpy as np

from pipeline.config import Config

LEAVE, SLOW = 0.05, 0.03  # the shares of streaming clients that leave / read slowly
WORDS = ["alpha", "beta", "gamma", "delta", "def", "class", "return", "import", "(", ")", "\n"]


def request_plan(rng: random.Random, context: int) -> tuple[str, dict, str]:
    """(route, body, behaviour): a request with options from the valid space, its prompt (in
    bytes: a byte tokenizer) and budget within half the context together (chat's template adds
    some)."""
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))[: context // 3]
    body: dict = {
        "model": "bench",
        "max_tokens": rng.randint(1, min(40, context // 8)),
        "temperature": rng.choice([0.0, 0.7, 1.0, 1.5]),
        "top_p": rng.choice([1.0, 0.9, 0.5]),
        "top_k": rng.choice([0, 5, 50]),
        "seed": rng.randrange(1 << 31),
        "n": rng.choice([1, 1, 1, 2, 3]),
        "stream": rng.random() < 0.5,
    }
    if rng.random() < 0.2:
        body["stop"] = rng.sample(["\n", "e", " a", "xyz"], rng.randint(1, 2))
    if rng.random() < 0.1:
        body["presence_penalty"] = round(rng.uniform(-1, 1), 2)
        body["frequency_penalty"] = round(rng.uniform(-1, 1), 2)
    if body["stream"] and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.6:
        route, body["prompt"] = "/v1/completions", text
        if rng.random() < 0.2:
            body["logprobs"] = rng.randint(0, 5)
        body["echo"] = rng.random() < 0.1
    else:
        route = "/v1/chat/completions"
        system = [{"role": "system", "content": "be brief"}] if rng.random() < 0.3 else []
        body["messages"] = [*system, {"role": "user", "content": text}]
        if rng.random() < 0.1:
            body["logprobs"], body["top_logprobs"] = True, rng.randint(0, 5)
        if rng.random() < 0.05:
            body["response_format"] = {"type": "json_object"}
    draw = rng.random()
    behaviour = "normal"
    if body["stream"] and draw < LEAVE:
        behaviour = "leave"
    elif body["stream"] and draw < LEAVE + SLOW:
        behaviour = "slow"
    return route, body, behaviour


async def _stream(response, behaviour: str, rng: random.Random) -> str:
    """Read an SSE answer: 'answered', 'left' or why it failed."""
    leave_after, lines, done = rng.randint(1, 4), 0, False
    async for line in response.aiter_lines():
        if behaviour == "slow":
            await asyncio.sleep(0.05)
        if not line.startswith("data: "):
            continue
        lines += 1
        if line == "data: [DONE]":
            done = True
        elif "error" in json.loads(line[6:]):
            return "failed: an error event in the stream"
        if behaviour == "leave" and lines >= leave_after:
            return "left"  # leaving the block closes the connection mid-stream
    return "answered" if done else "failed: the stream ended without [DONE]"


async def _one(http, base: str, plan, rng: random.Random, notes: list) -> tuple[str, float]:
    route, body, behaviour = plan
    start = time.perf_counter()
    try:
        async with http.stream("POST", base + route, json=body) as response:
            status = response.status_code
            if status in (429, 503):
                await response.aread()
                return "refused", 0.0
            if status != 200:
                detail = (await response.aread()).decode(errors="replace")[:300]
                notes.append(f"{status} for {json.dumps(body)[:300]}: {detail}")
                return f"failed: HTTP {status}", 0.0
            if body["stream"]:
                outcome = await _stream(response, behaviour, rng)
            else:
                answer = json.loads(await response.aread())
                ok = len(answer.get("choices", [])) == body["n"]
                outcome = "answered" if ok else "failed: wrong number of choices"
    except Exception as err:  # noqa: BLE001 - any transport or parse error is a failure here
        notes.append(f"{type(err).__name__}: {err}"[:300])
        return f"failed: {type(err).__name__}", 0.0
    return outcome, time.perf_counter() - start


async def _soak(
    base: str, context: int, requests: int, seconds: float, concurrency: int, seed: int
) -> dict:
    import httpx

    rng, outcomes, latencies, notes = random.Random(seed), Counter(), [], []
    sent, deadline = 0, time.perf_counter() + seconds

    async def client(http):
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            sent += 1
            plan = request_plan(rng, context)
            while True:  # a refusal is retried after its Retry-After, as clients do
                outcome, latency = await _one(http, base, plan, rng, notes)
                outcomes[outcome] += 1
                if outcome != "refused" or time.perf_counter() > deadline:
                    break
                await asyncio.sleep(1.0)
            if outcome == "answered" and plan[2] == "normal":
                latencies.append(latency)

    limits = httpx.Limits(max_connections=concurrency + 4)
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    pct = lambda q: float(np.percentile(latencies, q)) * 1e3 if latencies else 0.0  # noqa: E731
    failed = sum(n for k, n in outcomes.items() if k.startswith("failed"))
    return {
        "requests": sent,
        "wall_s": time.perf_counter() - start,
        "answered": outcomes["answered"],
        "refused": outcomes["refused"],
        "left": outcomes["left"],
        "failed": failed,
        "failures": {k: n for k, n in outcomes.items() if k.startswith("failed")},
        "failure_examples": notes[:5],
        "latency_p50_ms": pct(50),
        "latency_p99_ms": pct(99),
    }


def run_soak(*args) -> dict:
    return asyncio.run(_soak(*args))


def _rss(*pids: int | None) -> int:
    """Resident bytes of this process and of `pids` (the engine's process, when it has one)."""
    total = 0
    for pid in (os.getpid(), *filter(None, pids)):
        with open(f"/proc/{pid}/statm") as f:
            total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return total


def _settle(engine, timeout: float = 60.0) -> None:
    """Wait until the engine has nothing running or waiting (clients that left are cancelled
    at the next step)."""
    deadline = time.time() + timeout
    while (engine.busy_slots or engine.queue_depth) and time.time() < deadline:
        time.sleep(0.05)


def bench_soak(
    cfg: Config,
    case: str,
    requests: int = 5000,
    seconds: float = 600.0,
    concurrency: int = 32,
    warmup: int = 200,
) -> dict:
    """One soak of the config's model (random weights) and serve section; the report's row."""
    import jax

    from pipeline.bench.loadgen import _LocalServer
    from pipeline.runtime import allocator

    # fewer slots and a shorter queue than clients, so that refusals (429) happen too
    room = max(concurrency // 4, 1)
    serve = replace(cfg.serve, slots=min(cfg.serve.slots, room), max_queue=room)
    server = _LocalServer(cfg, serve, max_queue=room)
    clients = multiprocessing.get_context("spawn").Pool(1)
    base = f"http://127.0.0.1:{server.port}"
    try:
        context = cfg.model.max_seq_len
        clients.apply(run_soak, (base, context, warmup, seconds, concurrency, 1))
        _settle(server.engine)
        rss_start = _rss(server.engine_pid)
        figures = clients.apply(run_soak, (base, context, requests, seconds, concurrency, 2))
        _settle(server.engine)
        engine = server.engine
        row = {
            "case": f"soak/{case}/c{concurrency}",
            "kind": "soak",
            "concurrency": concurrency,
            "slots": serve.slots,
            "max_queue": serve.max_queue,
            **figures,
            "busy_slots_after": engine.busy_slots,
            "queue_after": engine.queue_depth,
            "kv_blocks": engine.kv_blocks,
            "kv_blocks_in_use_after": engine.blocks_used,
            "rss_start_bytes": rss_start,
            "rss_end_bytes": _rss(server.engine_pid),
            "device": jax.devices()[0].device_kind,
            "allocator": allocator(),
        }
        row["rss_growth"] = row["rss_end_bytes"] / rss_start - 1
        return row
    finally:
        clients.close()
        server.close()
