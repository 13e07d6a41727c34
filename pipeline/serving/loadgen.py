"""`pipeline bench serve`: a bounded load generator against the real server on loopback.

For each concurrency level, `concurrency` clients send streaming completions back to back until
`requests` have been answered; each records its time to first token and its latency. The
server runs in this process (uvicorn in a thread, the engine in its own thread) on a random
free port, with a randomly initialised model of the given config: this measures serving, not
model quality. The clients run in a separate process, so that parsing their streams does not
compete with the server for this process's interpreter lock. The baseline is the same server
with one slot (one request at a time).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import socket
import threading
import time

import numpy as np

from pipeline.config import Config


class _LocalServer:
    def __init__(self, cfg: Config, slots: int):
        import uvicorn

        from pipeline.model import create_model
        from pipeline.serving.engine import Engine
        from pipeline.serving.serve import create_app
        from pipeline.tokenizer import byte_tokenizer

        self.engine = Engine(create_model(cfg.model), slots=slots, max_queue=4096)
        self.compile_s = self.engine.warmup()
        self.engine.start()
        app = create_app(self.engine, byte_tokenizer(), "bench")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.stop(drain=False, timeout=30)


async def _load(
    url: str, concurrency: int, requests: int, prompt_len: int, max_tokens: int, extra: dict
):
    import httpx

    rng = np.random.default_rng(concurrency)
    prompts = [rng.integers(0, 256, prompt_len).tolist() for _ in range(requests)]
    pending = iter(range(requests))
    records = []

    async def client(http):
        for i in pending:
            body = {
                "model": "bench",
                "prompt": prompts[i],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
                **extra,
            }
            start = time.perf_counter()
            first, tokens = None, 0
            async with http.stream("POST", url, json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk["choices"]:
                        first = time.perf_counter()
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            end = time.perf_counter()
            records.append((first - start if first else end - start, end - start, tokens))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ttft, latency, tokens = (np.array(x) for x in zip(*records, strict=True))
    return {
        "requests": requests,
        "wall_s": wall,
        "requests_per_sec": requests / wall,
        "tokens_per_sec": float(tokens.sum()) / wall,
        "ttft_p50_ms": float(np.percentile(ttft, 50)) * 1e3,
        "ttft_p99_ms": float(np.percentile(ttft, 99)) * 1e3,
        "latency_p50_ms": float(np.percentile(latency, 50)) * 1e3,
        "latency_p99_ms": float(np.percentile(latency, 99)) * 1e3,
    }


def _run_load(*args) -> dict:
    return asyncio.run(_load(*args))


def bench_serve(
    cfg: Config,
    case: str,
    levels=(1, 8, 32),
    slots: int = 32,
    prompt_len: int = 32,
    max_tokens: int = 64,
    baseline_concurrency: int = 8,
    request: dict | None = None,
):
    """Yield one result per concurrency level, then the one-slot baseline's. `request`: more
    fields for every request (e.g. {"logprobs": 5})."""
    extra = dict(request or {})
    import jax

    from pipeline.runtime import allocator

    clients = multiprocessing.get_context("spawn").Pool(1)

    for label, n_slots, concurrencies in (
        ("batched", slots, levels),
        ("one-at-a-time", 1, (baseline_concurrency,) if baseline_concurrency else ()),
    ):
        if not concurrencies:
            continue
        server = _LocalServer(cfg, n_slots)
        try:
            url = f"http://127.0.0.1:{server.port}/v1/completions"
            clients.apply(_run_load, (url, 1, 2, prompt_len, 4, extra))  # first-request warm-up
            for c in concurrencies:
                load = (url, c, max(8, 4 * c), prompt_len, max_tokens, extra)
                figures = clients.apply(_run_load, load)
                yield {
                    "case": f"serve/{case}/{label}/c{c}",
                    "concurrency": c,
                    "slots": n_slots,
                    "prompt_len": prompt_len,
                    "max_tokens": max_tokens,
                    "request": extra,
                    **figures,
                    "compile_s": server.compile_s,
                    "device": jax.devices()[0].device_kind,
                    "allocator": allocator(),
                }
        finally:
            server.close()
    clients.close()
