"""`bench serve --cases engine`: the serving engine without its HTTP side, against `generate`.

What the server's figure is made of, one layer at a time, in one process and sitting: `batch`
requests (32-token prompts, 64 greedy tokens, no stop token) submitted to the engine in this
process (its own thread, no HTTP, no tokenising, no clients) wave after wave, and the same
model's jitted `generate` at batch = `batch`, alternated round by round. Each round gives:

- `engine_tokens_per_sec`: tokens the engine alone delivered (`engine_tokens`) per second over
  `waves` waves (prefill included), and `vs_generate`: that over `generate`'s decode tokens/s
  (the ratio `bench serve` reports for the server; the server's own ratio is at most this one);
- `engine_device_ms_per_step`: one more wave where every decode call runs alone (the previous
  call's tokens delivered first, the host blocking on the call's result): the engine's decode
  step with its dispatch, as `generate`'s step is timed inside its loop; `generate_step_ms`
  and `step_vs_generate`, their ratio (the engine's target: within 1.3x);
- `generate_tokens_per_sec` (prefill included) and `generate_decode_tokens_per_sec`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np

from pipeline.config import Config

PROMPT_LEN, MAX_TOKENS = 32, 64


def engine_case(
    cfg: Config, case: str, clients, extra, rounds: int = 3, waves: int = 4, batch: int = 32
):
    """One row per round (engine waves, a timed wave, `generate`) of `batch` requests."""
    import jax

    from pipeline.bench.inference import REPEAT_S, bench_generate
    from pipeline.runtime import allocator
    from pipeline.serving.core import build_engine
    from pipeline.serving.stats import SAMPLE_EVERY

    serve = replace(cfg.serve, slots=batch)
    engine, _, _ = build_engine(cfg.model, serve, background=False)
    engine.start()
    rng = np.random.default_rng(0)
    try:
        _waves(engine, rng, cfg.model.vocab_size, batch, 1)  # warm: every program has run
        for index in range(rounds):
            engine.sample_every = SAMPLE_EVERY
            seconds, tokens = _waves(engine, rng, cfg.model.vocab_size, batch, waves)
            engine.sample_every = 1  # every decode call alone, timed
            before = engine.stats.snapshot()
            _waves(engine, rng, cfg.model.vocab_size, batch, 1)
            after = engine.stats.snapshot()
            timed = after["timed_steps"] - before["timed_steps"]
            step_ms = (after["timed_s"] - before["timed_s"]) / timed * 1e3
            raw = bench_generate(cfg, "raw", PROMPT_LEN, MAX_TOKENS, batch, repeat_s=REPEAT_S)
            engine_tps = tokens / seconds
            generate_step_ms = batch * 1e3 / raw["decode_tokens_per_sec"]
            yield {
                "case": f"serve/{case}/engine/b{batch}",
                "kind": "serve-engine",
                "round": index,
                "batch": batch,
                "prompt_len": PROMPT_LEN,
                "max_tokens": MAX_TOKENS,
                "decode_steps": serve.decode_steps,
                "engine_tokens": tokens,
                "engine_tokens_per_sec": engine_tps,
                "engine_device_ms_per_step": step_ms,
                "generate_runs": raw["runs"],
                "generate_tokens_per_sec": raw["tokens_per_sec"],
                "generate_decode_tokens_per_sec": raw["decode_tokens_per_sec"],
                "generate_step_ms": generate_step_ms,
                "vs_generate": engine_tps / raw["decode_tokens_per_sec"],
                "step_vs_generate": step_ms / generate_step_ms,
                "device": jax.devices()[0].device_kind,
                "allocator": allocator(),
            }
    finally:
        engine.stop(drain=False, timeout=30)


def _waves(engine, rng, vocab: int, batch: int, waves: int) -> tuple[float, int]:
    """(seconds, tokens delivered) for `waves` waves of `batch` requests, each wave submitted
    together and waited for whole."""
    from pipeline.inference.sampling import Sampling
    from pipeline.serving.engine import Request

    start, tokens = time.perf_counter(), [0]
    for _ in range(waves):
        ended = threading.Semaphore(0)

        def emit(token, reason, ended=ended):
            tokens[0] += token is not None
            if reason is not None:
                ended.release()

        for _ in range(batch):
            prompt = rng.integers(1, vocab, PROMPT_LEN).tolist()
            engine.submit(Request(prompt, MAX_TOKENS, Sampling(), emit))
        for _ in range(batch):
            if not ended.acquire(timeout=600):
                raise RuntimeError("bench serve engine: a request did not end in 600 s")
    return time.perf_counter() - start, tokens[0]
