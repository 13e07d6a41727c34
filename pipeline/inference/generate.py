"""Generation: prefill, decode_step and a whole-loop `generate` under `jax.jit`.

`prefill` runs the (right-padded) prompts through the model in one pass and fills the KV cache;
`decode_step` adds one token per row, each row at its own position. `generate` runs the decode
loop on the device (`lax.while_loop`, in phases over a growing cache: a step attends over the
positions the batch can have reached) and stops each row at EOS or its token budget. Sampling
parameters are arrays (one value per row), so new values never recompile; prompt lengths and
token budgets are padded to powers of two, so the number of compilations stays small. Every
program is compiled ahead of time once per shape (`PROGRAMS`), counted and logged. Sampling
is `sampling.py`; speculative decoding, `speculative.py`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pipeline.cpu_forms import compiler_options
from pipeline.inference.sampling import (
    Sampling,
    check_sampling,
    request_keys,
    sample,
    sampling_arrays,
)
from pipeline.model import init_cache

MIN_BUCKET = 16
log = logging.getLogger(__name__)


def bucket(n: int, limit: int, smallest: int = MIN_BUCKET) -> int:
    """The smallest power of two >= n (at least `smallest`), capped at `limit`."""
    size = smallest
    while size < n:
        size *= 2
    return min(size, limit)


def buckets(limit: int, smallest: int = MIN_BUCKET) -> list[int]:
    """Every size `bucket` returns up to `limit`: smallest, 2 x smallest, ..., limit."""
    sizes = [bucket(1, limit, smallest)]
    while sizes[-1] < limit:
        sizes.append(bucket(sizes[-1] + 1, limit, smallest))
    return sizes


def prefill(model, tokens: jax.Array, lengths: jax.Array, cache):
    """Run right-padded prompts (B, P) into the cache; logits of each row's last token (B, V)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, cache = model(tokens, positions, cache, only=lengths - 1)
    return logits[:, 0], cache


def decode_step(model, tokens: jax.Array, positions: jax.Array, cache):
    """One token per row at its own position: tokens, positions (B,) -> logits (B, V)."""
    logits, cache = model(tokens[:, None], positions[:, None], cache)
    return logits[:, 0], cache


class _Decode(NamedTuple):
    """The decode loop's state: the step, the tokens so far (B, max_new), the cache, the last
    logits and which rows are done."""

    step: jax.Array
    out: jax.Array
    cache: list
    logits: jax.Array
    done: jax.Array


def decode_loop(
    model, logits, cache, lengths, budgets, temperature, top_k, top_p, seeds, eos_id, max_new
):
    """Sample and decode until every row has hit EOS or its budget: (tokens (B, max_new), steps).

    The token for step s of a row comes from `request_keys(seed, s)`, so it does not depend
    on the other rows of the batch or on how the loop is driven (see `stream`).

    The loop runs in phases (`live_lengths`), each over a cache cut to its own length: a step
    attends over the positions the batch can have reached in that phase, not over the whole
    budget, and the cache grows (one copy) between phases.
    """
    B = logits.shape[0]
    out = jnp.zeros((B, max_new), jnp.int32)
    full = cache[0]["k"].shape[2]
    furthest = jnp.max(lengths)  # the next position any row writes is furthest + step

    def body(s: _Decode) -> _Decode:
        keys = request_keys(seeds, s.step)
        token = sample(s.logits, keys, temperature, top_k, top_p)
        token = jnp.where(s.done, 0, token)
        out = s.out.at[:, s.step].set(token)
        done = s.done | jnp.isin(token, eos_id) | (s.step + 1 >= budgets)
        logits, cache = decode_step(model, token, lengths + s.step, s.cache)
        return _Decode(s.step + 1, out, cache, logits, done)

    state = _Decode(0, out, cache, logits, budgets <= 0)
    for size in live_lengths(full - max_new, full):

        def cond(s: _Decode, size=size):
            return (s.step < max_new) & ~jnp.all(s.done) & (furthest + s.step < size)

        state = jax.lax.while_loop(
            cond, body, state._replace(cache=resize_cache(state.cache, size))
        )
    return state.out, state.step


# A decode loop of at least this many tokens runs in LIVE_PHASES phases; a shorter one in one.
# Each phase compiles its own step (the small model's decode loop: 1.0 -> 2.4 s; gpt2-124m's
# prefill and decode loop together 2.1 -> 5.5 s), which a loop of 128 steps or more pays back
# when it runs more than once.
LIVE_MIN_TOKENS = 128
LIVE_PHASES = 4


def live_lengths(prompt: int, full: int) -> list[int]:
    """Cache lengths of `decode_loop`'s phases for a prompt bucket of `prompt` positions and a
    cache of `full`: the decoded span cut into `LIVE_PHASES` equal parts (multiples of 8), the
    last one `full`."""
    span = full - prompt
    if span < LIVE_MIN_TOKENS:
        return [full]
    part = -(-span // LIVE_PHASES // 8) * 8
    return [min(prompt + part * i, full) for i in range(1, LIVE_PHASES)] + [full]


def resize_cache(cache, size: int):
    """A (B, K, S, H) KV cache cut or zero-padded to `size` positions."""
    S = cache[0]["k"].shape[2]
    if size == S:
        return cache
    if size < S:
        return jax.tree.map(lambda a: a[:, :, :size], cache)
    return jax.tree.map(lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, size - S), (0, 0))), cache)


@partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill(state, tokens, lengths, *, graphdef, cache_len: int):
    model = nnx.merge(graphdef, state)
    cache = init_cache(model.cfg, tokens.shape[0], cache_len)
    return prefill(model, tokens, lengths, cache)


@partial(jax.jit, static_argnames=("graphdef", "max_new"))
def _decode_loop(state, logits, cache, *args, graphdef, max_new: int):
    return decode_loop(nnx.merge(graphdef, state), logits, cache, *args, max_new)


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _step_one(state, logits, cache, position, seed, step, temperature, top_k, top_p, *, graphdef):
    model = nnx.merge(graphdef, state)
    keys = request_keys(seed[None], step)
    token = sample(logits, keys, temperature[None], top_k[None], top_p[None])
    logits, cache = decode_step(model, token, position[None], cache)
    return token[0], logits, cache


class Programs:
    """Ahead-of-time compiled programs, one per (function, static arguments, argument shapes).

    `get` compiles on first use, logs it and records the seconds it took, so callers can tell
    compilation from execution and tests can count compilations.
    """

    def __init__(self):
        self.compiled: dict = {}
        self.seconds = 0.0

    def get(self, fn, name: str, args: tuple, **static):
        leaves, treedef = jax.tree.flatten(args)
        shapes = tuple((np.shape(x), jnp.result_type(x).name) for x in leaves)
        key = (name, tuple(sorted(static.items(), key=lambda kv: kv[0])), treedef, shapes)
        program = self.compiled.get(key)
        if program is None:
            start = time.perf_counter()
            program = fn.lower(*args, **static).compile(compiler_options(args[0]))
            seconds = time.perf_counter() - start
            self.compiled[key] = program
            self.seconds += seconds
            detail = ", ".join(f"{k}={v}" for k, v in static.items() if k != "graphdef")
            log.info(
                "compiled %s (input %s%s) in %.2f s: %d programs in this process",
                name,
                "x".join(map(str, np.shape(args[1]))) or "scalar",
                f", {detail}" if detail else "",
                seconds,
                len(self.compiled),
            )
        return program

    def __len__(self) -> int:
        return len(self.compiled)


PROGRAMS = Programs()


def compilations() -> int:
    """How many generation programs have been compiled in this process."""
    return len(PROGRAMS)


def check_request(prompt_len: int, max_new_tokens: int, context: int) -> None:
    """The one rule every entry point shares: a prompt, a budget, and both within the context."""
    if prompt_len <= 0:
        raise ValueError("the prompt is empty: it needs at least one token")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if prompt_len + max_new_tokens > context:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) "
            f"exceeds the model's context of {context}"
        )


@dataclass(frozen=True)
class Batch:
    """A checked batch of requests as device arrays: right-padded prompts and per-row values."""

    tokens: jax.Array  # (B, P), P a bucket
    lengths: jax.Array  # (B,)
    budgets: np.ndarray  # (B,) host copy: rows are trimmed to it
    sampling: tuple  # temperature, top_k, top_p, seed: (B,) arrays
    max_new: int  # the budget bucket


def make_batch(prompts, max_new_tokens, sampling, context: int) -> Batch:
    B = len(prompts)
    budgets = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (B,)).copy()
    samplings = sampling if isinstance(sampling, list) else [sampling] * B
    for prompt, budget, s in zip(prompts, budgets, samplings, strict=True):
        check_request(len(prompt), int(budget), context)
        check_sampling(s)
    P = bucket(max(len(p) for p in prompts), context)
    tokens = np.zeros((B, P), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return Batch(
        tokens=jnp.asarray(tokens),
        lengths=jnp.asarray([len(p) for p in prompts], jnp.int32),
        budgets=budgets,
        sampling=sampling_arrays(samplings),
        max_new=bucket(int(budgets.max()), context),
    )


def stop_ids(eos_id) -> tuple[int, ...]:
    """The ids that end a row: one id (-1: none) or several (an imported model's end of turn
    beside its end of text, `Tokenizer.stop_ids`)."""
    ids = (eos_id,) if isinstance(eos_id, int | np.integer) else tuple(eos_id)
    return tuple(sorted(int(i) for i in ids)) or (-1,)


def trim_rows(out: np.ndarray, counts, eos_id) -> list[list[int]]:
    """Each row's first `counts[i]` tokens, cut after its first end id (`stop_ids`)."""
    stops, rows = set(stop_ids(eos_id)), []
    for row, n in zip(out, counts, strict=True):
        ids = [int(t) for t in row[: int(n)]]
        end = next((i for i, t in enumerate(ids) if t in stops), None)
        rows.append(ids if end is None else ids[: end + 1])
    return rows


@dataclass(frozen=True)
class Generation:
    """What `generate` and `speculative_generate` return: the generated ids per row and timings
    (compilation excluded, reported as `compile_s`)."""

    tokens: list[list[int]]
    seconds: float  # prefill and decode
    tokens_per_sec: float  # generated tokens over `seconds`
    compile_s: float = 0.0
    ttft_s: float | None = None  # the prefill: time to the first token's logits
    decode_s: float | None = None  # the decode loop
    steps: int | None = None  # decode-loop iterations
    acceptance: float | None = None  # speculative decoding: the share of draft tokens kept
    iterations: int | None = None  # speculative decoding: draft-and-verify rounds


def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int | list[int],
    sampling: Sampling | list[Sampling] = Sampling(),
    eos_id: int | Iterable[int] = -1,
) -> Generation:
    """Generate for a batch of prompts (token ids). Returns ids per row and timings. A row ends
    at `eos_id` (or any of several ids), which it includes.

    Timings exclude compilation (reported as `compile_s`): `ttft_s` is the prefill (the first
    token's logits), `decode_s` the device loop, `tokens_per_sec` generated tokens over both.
    """
    batch = make_batch(prompts, max_new_tokens, sampling, model.cfg.max_seq_len)
    P, max_new = batch.tokens.shape[1], batch.max_new
    graphdef, state = nnx.split(model)
    loop_args = (
        batch.lengths,
        jnp.asarray(batch.budgets),
        *batch.sampling,
        jnp.asarray(stop_ids(eos_id), jnp.int32),
    )
    compiled_before = PROGRAMS.seconds
    prefill_args = (state, batch.tokens, batch.lengths)
    prefill_fn = PROGRAMS.get(
        _prefill, "prefill", prefill_args, graphdef=graphdef, cache_len=P + max_new
    )
    start = time.perf_counter()
    logits, cache = jax.block_until_ready(prefill_fn(*prefill_args))
    ttft = time.perf_counter() - start
    args = (state, logits, cache, *loop_args)
    loop_fn = PROGRAMS.get(_decode_loop, "decode_loop", args, graphdef=graphdef, max_new=max_new)
    start = time.perf_counter()
    out, steps = loop_fn(*args)
    out = np.asarray(out)
    decode_s = time.perf_counter() - start
    rows = trim_rows(out, batch.budgets, eos_id)
    generated = sum(len(r) for r in rows)
    seconds = ttft + decode_s
    return Generation(
        tokens=rows,
        seconds=seconds,
        tokens_per_sec=generated / seconds if seconds > 0 else 0.0,
        compile_s=PROGRAMS.seconds - compiled_before,
        ttft_s=ttft,
        decode_s=decode_s,
        steps=int(steps),
    )


def stream(
    model,
    prompt: list[int],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos_id: int | Iterable[int] = -1,
):
    """Yield generated token ids one at a time, as they are produced.

    Two programs (prefill, one decode step) per prompt-length bucket; sampling values and the
    step index are arrays, so a new request or token never recompiles. Tokens equal
    `generate`'s for the same inputs.
    """
    cfg = model.cfg
    check_request(len(prompt), max_new_tokens, cfg.max_seq_len)
    check_sampling(sampling)
    stops = set(stop_ids(eos_id))
    P = bucket(len(prompt), cfg.max_seq_len)
    tokens = np.zeros((1, P), np.int32)
    tokens[0, : len(prompt)] = prompt
    graphdef, state = nnx.split(model)
    prefill_args = (state, jnp.asarray(tokens), jnp.asarray([len(prompt)], jnp.int32))
    cache_len = P + bucket(max_new_tokens, cfg.max_seq_len)
    prefill_fn = PROGRAMS.get(
        _prefill, "prefill", prefill_args, graphdef=graphdef, cache_len=cache_len
    )
    logits, cache = prefill_fn(*prefill_args)
    seed = jnp.uint32(sampling.seed)
    params = (
        jnp.float32(sampling.temperature),
        jnp.int32(sampling.top_k),
        jnp.float32(sampling.top_p),
    )
    step_fn = None
    for step in range(max_new_tokens):
        args = (
            state,
            logits,
            cache,
            jnp.int32(len(prompt) + step),
            seed,
            jnp.int32(step),
            *params,
        )
        if step_fn is None:
            step_fn = PROGRAMS.get(_step_one, "decode_step", args, graphdef=graphdef)
        token, logits, cache = step_fn(*args)
        token = int(token)
        yield token
        if token in stops:
            return
