"""`pipeline bench serve`: a bounded load generator against the real server on loopback.

For each concurrency level, `concurrency` clients send streaming completions back to back until
`requests` have been answered; each records its time to first token, the gaps between its
tokens and its latency. The server runs in this process (uvicorn in a thread, the engine in its
own thread) on a random free port, with a randomly initialised model of the given config and
the config's `serve` section: this measures serving, not model quality. The clients run in a
separate process, so that parsing their streams does not compete with the server for this
process's interpreter lock; the server's CPU time over the load gives `cores_busy`. The
baseline is the same server with one slot (one request at a time).

Named cases beside the concurrency levels:

- `prefix`: a 512-token system prompt shared by every request, 32-token user turns, 8 clients;
  with prefix caching and without (time to first token, and the ratio).
- `long`: 16 clients streaming while a 2,048-token prompt arrives; their inter-token latency
  (p50 / p99) shows what the long prefill costs them (chunked prefill bounds it).
- `mixed`: 64 clients with prompts and budgets of mixed lengths up to the context, in the KV
  blocks that 16 full-length slots use: how many ran at once, and the preemptions.
- `startup`: seconds from starting `pipeline serve` (a process of its own, the model saved as a
  run, the config's `serve` section) to its first answered completion, with an empty
  compilation cache (cold) and then twice with the one that start filled (warm).
- `engine`: the engine alone (requests submitted in this process: no HTTP, no clients) and
  its decode step, against `generate` at batch 32, alternated three times (`engine_case.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.config import Config, ServeConfig

NAMED_CASES = ("prefix", "long", "mixed", "startup", "engine")


class _LocalServer:
    """The server under load: the engine in a process of its own (`serve.engine_process`, as
    `pipeline serve` runs it) or on a thread, the HTTP side on a thread of this process."""

    def __init__(self, cfg: Config, serve: ServeConfig, max_queue: int = 4096):
        import uvicorn

        from pipeline.serving.serve import create_app, uvicorn_config
        from pipeline.tokenizer import byte_tokenizer

        serve = replace(serve, max_queue=max_queue)
        self.engine, self._stop = self._engine(cfg, serve)
        app = create_app(self.engine, byte_tokenizer(), "bench", replace(serve, api_key=None))
        self.peak = 0  # the most requests running at once
        observe = self.engine.observe
        self.engine.observe = lambda name, value: self._observe(observe, name, value)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn_config(app, replace(serve, host="127.0.0.1", port=self.port), "warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def _engine(self, cfg: Config, serve: ServeConfig):
        """(the routes' engine, its stop), every program compiled (`compile_s`)."""
        if serve.engine_process:
            from pipeline.serving.core import start_engine

            # (no compilation cache: a benchmark compiles as the thread's engine does)
            engine = start_engine(cfg.model, replace(serve, compilation_cache="off"), None, False)
            self.compile_s, self.engine_pid = engine.compile_s, engine.pid
            self.programs = engine.program_count
            return engine, engine.stop
        from pipeline.serving.client import LocalEngine
        from pipeline.serving.core import build_engine

        local, tokenizer, _ = build_engine(cfg.model, serve, background=False)
        self.compile_s, self.engine_pid = local.compile_seconds, None
        self.programs = local.program_count
        local.start()
        return LocalEngine(local, tokenizer), local.stop

    def _observe(self, observe, name, value):
        if name != "itl":  # at a request's admission and first token, not at every token
            self.peak = max(self.peak, self.engine.busy_slots)
        observe(name, value)

    def _cpu_seconds(self) -> tuple[float, float]:
        """CPU seconds of this process (the HTTP side) and of the engine's (0 on a thread)."""
        if self.engine_pid is None:
            return time.process_time(), 0.0
        return time.process_time(), process_cpu_seconds(self.engine_pid)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/completions"

    def measure(self, clients, load: tuple) -> dict:
        """Run `load` in the client process; its figures, with the server's cores busy and
        where the engine loop's time went (`serving/stats.py`)."""
        from pipeline.serving.stats import per_iteration

        loop = self.engine.stats.snapshot()
        cpu, start = self._cpu_seconds(), time.perf_counter()
        figures = clients.apply(run_load, load)
        wall = time.perf_counter() - start
        server, engine_cpu = (b - a for a, b in zip(cpu, self._cpu_seconds(), strict=True))
        engine = per_iteration(loop, self.engine.stats.snapshot())
        per_request = 1e6 / figures["requests"]
        clients_cpu = figures.pop("cpu_s")
        return {
            **figures,
            "cores_busy": (server + engine_cpu) / wall,
            # CPU microseconds per request of each process: this one (the HTTP side, and the
            # engine when it runs on a thread), the engine's, the clients'
            "server_cpu_us_per_request": server * per_request,
            "engine_cpu_us_per_request": engine_cpu * per_request if self.engine_pid else None,
            "clients_cpu_us_per_request": clients_cpu * per_request,
            **engine,
        }

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        self._stop(drain=False, timeout=30)


async def _stream(http, url, body) -> tuple[float, float, int, list[float]]:
    """One streaming request: (time to first token, latency, tokens, gaps between tokens)."""
    start = time.perf_counter()
    first, tokens, times = None, 0, []
    async with http.post(url, json=body) as response:
        response.raise_for_status()
        async for line in response.content:  # a line at a time
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:  # a token (its text may be held back or empty)
                times.append(time.perf_counter())
                first = first or times[-1]
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    tokens = tokens or len(times)  # a server that reports no usage: a token per chunk
    return (first or end) - start, end - start, tokens, list(np.diff(times))


async def _load(
    url: str, concurrency: int, prompts: list, max_tokens, extra: dict, late=None, model="bench"
):
    """`concurrency` clients send `prompts` (with budgets `max_tokens`: one or one per prompt)
    back to back; with `late` = (delay s, prompt, budget), one more request arrives after the
    delay, outside the figures."""
    import aiohttp

    budgets = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    pending = iter(range(len(prompts)))
    records = []

    def body(prompt, budget):
        return {
            "model": model,
            "prompt": prompt,
            "max_tokens": budget,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **extra,
        }

    async def client(http):
        for i in pending:
            records.append(await _stream(http, url, body(prompts[i], budgets[i])))

    async def latecomer(http):
        await asyncio.sleep(late[0])
        await _stream(http, url, body(late[1], late[2]))

    # aiohttp, as vLLM's serving benchmark uses: with httpx the client process was the limit
    # on the tiny model (57% of its samples opening each request's stream, 47% in the
    # connection pool's choice of a connection)
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        start = time.perf_counter()
        extra_client = [latecomer(http)] if late else []
        await asyncio.gather(*(client(http) for _ in range(concurrency)), *extra_client)
        wall = time.perf_counter() - start
    ttft, latency, tokens, gaps = zip(*records, strict=True)
    ttft, latency, tokens = np.array(ttft), np.array(latency), np.array(tokens)
    gaps = np.concatenate([np.asarray(g) for g in gaps if len(g)] or [np.zeros(1)])
    pct = lambda x, q: float(np.percentile(x, q)) * 1e3  # noqa: E731
    return {
        "requests": len(prompts),
        "wall_s": wall,
        "requests_per_sec": len(prompts) / wall,
        "tokens_per_sec": float(tokens.sum()) / wall,
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p99_ms": pct(ttft, 99),
        "latency_p50_ms": pct(latency, 50),
        "latency_p99_ms": pct(latency, 99),
        "itl_p50_ms": pct(gaps, 50),
        "itl_p99_ms": pct(gaps, 99),
    }


def run_load(*args) -> dict:
    """`_load`'s figures, with the CPU seconds this (the clients') process spent (`cpu_s`)."""
    before = time.process_time()
    figures = asyncio.run(_load(*args))
    return {**figures, "cpu_s": time.process_time() - before}


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds of another process's threads alive now, to the nanosecond (the scheduler's
    own count, /proc/PID/task/*/schedstat: /proc/PID/stat counts in 10 ms ticks, too coarse
    for the hundreds of microseconds a request costs)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz "))


def random_prompts(rng, n: int, length: int) -> list[str]:
    """`n` random texts of `length` characters (one token each for the byte tokenizer)."""
    return ["".join(rng.choice(LETTERS, length)) for _ in range(n)]


def bench_serve(
    cfg: Config,
    case: str,
    levels=(1, 8, 32),
    prompt_len: int = 32,
    max_tokens: int = 64,
    baseline_concurrency: int = 8,
    request: dict | None = None,
):
    """Yield one result per concurrency level, then the one-slot baseline's, then one per named
    case in `levels`. `request`: more fields for every request (e.g. {"logprobs": 5})."""
    extra = dict(request or {})
    named = [c for c in levels if c in NAMED_CASES]
    levels = [int(c) for c in levels if c not in NAMED_CASES]
    clients = multiprocessing.get_context("spawn").Pool(1)
    runs = [("batched", cfg.serve, levels)]
    if baseline_concurrency and levels:
        runs.append(("one-at-a-time", replace(cfg.serve, slots=1), (baseline_concurrency,)))
    try:
        for label, serve, concurrencies in runs:
            if not concurrencies:
                continue
            server = _LocalServer(cfg, serve)
            try:
                clients.apply(
                    run_load,
                    (server.url, 1, random_prompts(np.random.default_rng(9), 2, 4), 4, extra),
                )
                for c in concurrencies:
                    prompts = random_prompts(np.random.default_rng(c), max(8, 4 * c), prompt_len)
                    figures = server.measure(clients, (server.url, c, prompts, max_tokens, extra))
                    if label == "batched":
                        figures.update(_raw_generate(cfg, c, prompt_len, max_tokens, figures))
                    yield _row(server, f"serve/{case}/{label}/c{c}", c, serve, figures, extra)
            finally:
                server.close()
        for name in named:
            yield from CASES[name](cfg, case, clients, extra)
    finally:
        clients.close()


def _raw_generate(cfg: Config, batch: int, prompt_len: int, max_tokens: int, figures) -> dict:
    """The same model's jitted `generate` at batch = concurrency, the same prompt and budget,
    in the same sitting (the server idle meanwhile; the median of `generate_runs` runs): its
    decode tokens/s and the server's tokens/s over it (`vs_generate`), the figure of what the
    serving loop costs; and over
    `generate`'s whole run, its prefill counted (`vs_generate_with_prefill`): the server
    prefills every prompt too, so `vs_generate` cannot pass `generate`'s own share of it."""
    from pipeline.bench.inference import REPEAT_S, bench_generate

    raw = bench_generate(cfg, "raw", prompt_len, max_tokens, batch, repeat_s=REPEAT_S)
    return {
        "generate_runs": raw["runs"],
        "generate_tokens_per_sec": raw["tokens_per_sec"],
        "generate_decode_tokens_per_sec": raw["decode_tokens_per_sec"],
        "vs_generate": figures["tokens_per_sec"] / raw["decode_tokens_per_sec"],
        "vs_generate_with_prefill": figures["tokens_per_sec"] / raw["tokens_per_sec"],
    }


def _row(server, name, concurrency, serve, figures, extra, **more) -> dict:
    import jax

    from pipeline.runtime import allocator

    return {
        "case": name,
        "kind": "serve",
        "concurrency": concurrency,
        "slots": serve.slots,
        "engine_process": serve.engine_process,
        "stream_interval": serve.stream_interval,
        "prefill_wait_ratio": serve.prefill_wait_ratio,
        "kv_blocks": server.engine.kv_blocks,
        "prompt_len": more.pop("prompt_len", 32),
        "max_tokens": more.pop("max_tokens", 64),
        "request": extra,
        **figures,
        **more,
        "peak_running": server.peak,
        "preemptions": server.engine.preemptions,
        "prefix_hit_rate": server.engine.hit_rate,
        "compile_s": server.compile_s,
        "programs": server.programs,
        "device": jax.devices()[0].device_kind,
        "allocator": allocator(),
    }


def _long_context(cfg: Config, length: int) -> Config:
    from pipeline.config import with_overrides

    if cfg.model.max_seq_len >= length:
        return cfg
    return with_overrides(cfg, model={"max_seq_len": length}, data={"seq_len": length})


def _prefix_case(cfg, case, clients, extra):
    """8 clients, a shared 512-token system prompt + 32-token turns: with and without
    prefix caching."""
    cfg = _long_context(cfg, 1024)
    rng = np.random.default_rng(0)
    system = random_prompts(rng, 1, 512)[0]
    prompts = [system + turn for turn in random_prompts(rng, 32, 32)]
    rows = {}
    for caching in (True, False):
        serve = replace(cfg.serve, prefix_caching=caching)
        server = _LocalServer(cfg, serve)
        try:
            clients.apply(run_load, (server.url, 1, random_prompts(rng, 2, 4), 4, extra))
            figures = server.measure(clients, (server.url, 8, prompts, 16, extra))
            name = f"serve/{case}/prefix/{'cached' if caching else 'uncached'}/c8"
            rows[caching] = _row(
                server, name, 8, serve, figures, extra, prompt_len=544, max_tokens=16
            )
        finally:
            server.close()
    rows[True]["ttft_speedup"] = rows[False]["ttft_p50_ms"] / rows[True]["ttft_p50_ms"]
    yield from rows.values()


def _long_case(cfg, case, clients, extra):
    """16 clients streaming 32-token prompts while a 2,048-token prompt arrives."""
    cfg = _long_context(cfg, 2048 + 64)
    rng = np.random.default_rng(0)
    server = _LocalServer(cfg, cfg.serve)
    try:
        clients.apply(run_load, (server.url, 1, random_prompts(rng, 2, 4), 4, extra))
        long_prompt = random_prompts(rng, 1, 2048)[0]
        load = (server.url, 16, random_prompts(rng, 16, 32), 160, extra, (0.5, long_prompt, 8))
        figures = server.measure(clients, load)
        name = f"serve/{case}/long-prompt/c16"
        yield _row(server, name, 16, cfg.serve, figures, extra, max_tokens=160, long_prompt=2048)
    finally:
        server.close()


def _mixed_case(cfg, case, clients, extra):
    """64 clients, prompts and budgets of mixed lengths up to the context, in the KV blocks of
    16 full-length slots."""
    rng = np.random.default_rng(0)
    context = cfg.model.max_seq_len
    lengths = rng.integers(8, context // 2, 64)
    prompts = [random_prompts(rng, 1, int(n))[0] for n in lengths]
    budgets = [int(rng.integers(8, context - n)) for n in lengths]
    width = -(-context // cfg.serve.block_size)
    serve = replace(cfg.serve, slots=64, kv_blocks=16 * width)
    server = _LocalServer(cfg, serve)
    try:
        clients.apply(run_load, (server.url, 1, random_prompts(rng, 2, 4), 4, extra))
        figures = server.measure(clients, (server.url, 64, prompts, budgets, extra))
        name = f"serve/{case}/mixed/c64"
        yield _row(
            server, name, 64, serve, figures, extra, prompt_len=int(lengths.mean()), max_tokens=0
        )
    finally:
        server.close()


def _startup_case(cfg, case, clients, extra):
    """`pipeline serve` from a cold and a warm compilation cache to its first answer."""
    import tempfile

    import jax

    from pipeline.config import dump_config
    from pipeline.inference.runs import save_model
    from pipeline.model import create_model
    from pipeline.runtime import allocator
    from pipeline.tokenizer import byte_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        run = save_model(cfg, create_model(cfg.model), byte_tokenizer(), f"{tmp}/run")
        dump_config(cfg, f"{tmp}/serve.yaml")
        for label in ("cold", "warm", "warm"):
            seconds = _first_answer(run, f"{tmp}/serve.yaml", f"{tmp}/cache")
            yield {
                "case": f"serve/{case}/startup/{label}",
                "kind": "serve-startup",
                "seconds_to_first_answer": seconds,
                "slots": cfg.serve.slots,
                "device": jax.devices()[0].device_kind,
                "allocator": allocator(),
            }


def _first_answer(run, config: str, cache: str) -> float:
    """Seconds from launching `pipeline serve` on `run` to its first answered completion."""
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "pipeline", "serve", "--run", str(run), "--config", config]
    command += ["--port", str(port), "--compilation-cache", cache]
    body = {"model": "run", "prompt": "def f(x):", "max_tokens": 8}
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"pipeline serve exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                url = f"http://127.0.0.1:{port}/v1/completions"
                if httpx.post(url, json=body, timeout=120).status_code == 200:
                    return time.perf_counter() - start
            except httpx.TransportError:
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(60)


def _engine_case(cfg, case, clients, extra):
    from pipeline.bench.engine_case import engine_case

    yield from engine_case(cfg, case, clients, extra)


CASES = {
    "prefix": _prefix_case,
    "long": _long_case,
    "mixed": _mixed_case,
    "startup": _startup_case,
    "engine": _engine_case,
}
